"""LeNet-300-100 on MNIST, the default of every stage script (their settings equal this file):
shifted digits, dynamic network surgery, 3-bit fc1 and fc2, 4-bit fc3, shared biases, float32,
the ANS coder (--coder=huffman: the paper's, 99.9x).
Result: 127.9x at 1.23% test error (3 seeds). docs/experiments.md#lenet_300_100"""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 30, "sensitivity": {"*": 2.8, "fc3": 1.4}}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
