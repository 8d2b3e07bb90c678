"""MobileNetV2 (torchvision's, its own strides on 32x32 inputs) on CIFAR-10: dense training, dynamic
network surgery at the Erdos-Renyi-kernel densities (17% of the weights alive: the depthwise
convs and the classifier stay dense) taught by the dense network (distillation), 4-bit convs,
5-bit classifier, batch-norm folded to float16, ANS coder.
Result: 24.7x at 20.43% test error, dense 20.51% (2 seeds). docs/experiments.md#mobilenet_v2"""
model = "torchvision.mobilenet_v2"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 30,
           "augment": "auto", "precision": "fp32", "test_batch_size": 500, "prune_method": "dns",
           "dns_threshold": "density", "distill": 0.9, "retrain_lr": 0.02, "retrain_epochs": 20,
           "retrain_weight_decay": 5e-4, "erk_alive": 0.17}
quantization = {"bits": {"conv": 4, "fc": 5}, "bias_bits": {"*": 0}, "bn_half": True, "distill": 0.9,
                "finetune_epochs": 4, "lr": 1e-4, "precision": "fp32"}
huffman_encode = {"coder": "ans"}
