"""LeNet-5 (caffe) on MNIST by the paper's method (Han 2015: two prune -> retrain cycles with the
std rule, no augmentation), with this project's bit widths and shared biases.
Result: 46.0x at 0.73% test error (1 seed). docs/experiments.md#lenet5_caffe_iterative"""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "none",
           "prune_method": "std", "epochs": 15, "retrain_lr": 0.005, "retrain_epochs": 10, "prune_iterations": 2,
           "sensitivity": {"conv1": 0.3, "conv2": 0.8, "fc1": 1.05, "fc2": 0.6}}
quantization = {"bits": {"conv": 5, "fc1": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 1e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "huffman"}
