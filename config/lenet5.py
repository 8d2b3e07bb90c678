"""The original PyTorch run's LeNet-5 (6 and 16 5x5 convs, fc 256 -> 120 -> 84 -> 10) on MNIST
with the LeNet-5 (caffe) levers: dynamic network surgery, 5-bit convs, 3-bit fc1, 4-bit fc2-3,
shared biases. Result: 85.8x at 0.70% test error (1 seed). `--prune_layers=fc` prunes the fc
layers only, the original run's shape. docs/experiments.md#lenet5"""
model = "lenet5"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 25,
           "sensitivity": {"conv1": 1.0, "conv": 2.0, "fc1": 2.9, "fc2": 1.9}}
quantization = {"bits": {"conv": 5, "fc1": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 1e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "huffman"}
