"""LeNet-5 (caffe) on MNIST pushed for the ratio: the lenet5_caffe settings with a group lasso
(2e-5) while surgery retrains for 40 epochs, fine-tuning at lr 3e-4, and the ANS coder.
Result: 394.3x at 0.74% test error (3 seeds, from scratch). docs/experiments.md#lenet5_caffe_ratio"""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 40,
           "sensitivity": {"conv1": 1.2, "conv2": 2.4, "fc1": 3.6, "fc2": 2.3}, "group_lasso": {"*": 2e-5}}
quantization = {"bits": {"conv": 5, "*": 3}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
