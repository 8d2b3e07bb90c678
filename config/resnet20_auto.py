"""ResNet-20 on CIFAR-10 by the automatic recipe: the dense training and distillation of
config/resnet20.py, and max_drop = 1.0 point of validation accuracy given up; the densities
(Erdos-Renyi-kernel, the alive fraction bisected on validation) and the bits per layer are
searched, not set; batch-norm folded to float16.
Result: 19.2x at 11.85% test error (1 seed; dense 11.77%). docs/experiments.md#resnet20_auto"""
model = "resnet20"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 60,
           "restart_epochs": 40, "restart_lr": 0.05, "augment": "auto", "precision": "auto",
           "test_batch_size": 250, "distill": 0.9, "retrain_lr": 0.02, "retrain_epochs": 30, "max_drop": 1.0}
quantization = {"max_drop": 1.0, "bias_bits": {"*": 0}, "bn_half": True, "distill": 0.9, "finetune_epochs": 10,
                "lr": 1e-4, "precision": "auto"}
huffman_encode = {"coder": "ans"}
