"""LeNet-300-100 on MNIST by the automatic recipe: the training of config/lenet_300_100.py, and
max_drop = 0.5 points of validation accuracy given up; the densities (Erdos-Renyi-kernel, the
alive fraction bisected on validation) and the bits per layer are searched, not set.
Result: 79.9x at 1.11% test error (3 seeds). docs/experiments.md#lenet_300_100_auto"""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "retrain_lr": 0.01, "retrain_epochs": 30, "max_drop": 0.5}
quantization = {"max_drop": 0.5, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4, "precision": "fp32"}
huffman_encode = {"coder": "ans"}
