"""LeNet-300-100 on MNIST at its smallest within 1.60% test error: the lenet_300_100_ratio
settings with the Erdos-Renyi-kernel densities held at 2.5% alive, surgery at lr 0.03 with weight
decay 1e-4 (the sparse network fits its training set better), and 3-bit shared biases.
Result: 206.3x at 1.35% test error (3 seeds, from scratch). docs/experiments.md#lenet_300_100_tiny"""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "dns_threshold": "density", "erk_alive": 0.025, "retrain_lr": 0.03,
           "retrain_weight_decay": 1e-4, "retrain_epochs": 30}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 3}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
