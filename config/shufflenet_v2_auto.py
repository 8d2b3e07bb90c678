"""ShuffleNetV2 x0.5 (torchvision's, its own strides on 32x32 inputs) on CIFAR-10 by the automatic
recipe: a short dense training, max_drop = 1.0 point of validation accuracy given up, the
densities and bits per layer searched on validation; batch-norm folded to float16, ANS coder.
Result: 21.8x at 33.90% test error, dense 33.42% (1 seed). docs/experiments.md#shufflenet_v2_auto"""
model = "torchvision.shufflenet_v2_x0_5"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 30,
           "augment": "auto", "precision": "fp32", "test_batch_size": 500, "distill": 0.9, "retrain_lr": 0.02,
           "retrain_epochs": 20, "max_drop": 1.0}
quantization = {"max_drop": 1.0, "bias_bits": {"*": 0}, "bn_half": True, "distill": 0.9, "finetune_epochs": 4,
                "lr": 1e-4, "precision": "fp32"}
huffman_encode = {"coder": "ans"}
