"""LeNet-5 as in Caffe (20 and 50 5x5 convs, fc 800 -> 500 -> 10) on MNIST, the paper's Table 1
network: shifted digits, dynamic network surgery, 5-bit convs, 3-bit fcs, shared biases.
Result: 179.9x at 0.62% test error (2 seeds). docs/experiments.md#lenet5_caffe"""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 25,
           "sensitivity": {"conv1": 1.2, "conv2": 2.4, "fc1": 3.6, "fc2": 2.3}}
quantization = {"bits": {"conv": 5, "*": 3}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 1e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "huffman"}
