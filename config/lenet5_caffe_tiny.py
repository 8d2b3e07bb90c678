"""LeNet-5 (caffe) on MNIST at its smallest within 1.00% decoded validation error: the
lenet5_caffe_ratio settings with sparse variational dropout (Molchanov et al. 2017) in place of
surgery, 100 epochs of it, then 10 of retraining, and 4-bit fc layers.
Result: 549.2x at 0.75% test error (3 seeds, from scratch). docs/experiments.md#lenet5_caffe_tiny"""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "vd", "vd_epochs": 100, "vd_lr": 1e-3, "vd_beta": 1.0,
           "retrain_lr": 0.01, "retrain_epochs": 10, "retrain_weight_decay": 1e-4,
           "group_lasso": {"*": 2e-5}}
quantization = {"bits": {"conv": 5, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
