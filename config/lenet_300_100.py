"""LeNet-300-100 on MNIST, the default of every stage script (their settings at the top equal
this file). Ours, past the paper: digits shifted by up to 2 pixels in training, dynamic network
surgery (one prune -> splice cycle from the dense network), 3-bit fc1 and fc2, 4-bit fc3, biases
shared among 32 values. float32 training, so that the figures do not depend on the CPU.
How each value was chosen, on the validation split: README, "How the settings were chosen"."""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 30, "sensitivity": {"*": 2.8, "fc3": 1.4}}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {}
