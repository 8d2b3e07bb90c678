"""LeNet-300-100 on MNIST pushed for the ratio: the lenet_300_100 settings with surgery holding
the Erdos-Renyi-kernel densities at 3.5% alive, and the ANS coder.
Result: 153.6x at 1.17% test error (3 seeds). docs/experiments.md#lenet_300_100_ratio"""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "dns_threshold": "density", "erk_alive": 0.035, "retrain_lr": 0.01,
           "retrain_epochs": 30}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
