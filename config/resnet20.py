"""ResNet-20 (He et al. 2016, option A shortcuts) on CIFAR-10: dense training with a warm restart,
dynamic network surgery at the Erdos-Renyi-kernel densities taught by the dense network
(distillation), 3-bit convs, 5-bit fc, batch-norm folded to float16, ANS.
Result: 27.5x at 12.66% test error, dense 11.77% (the shipped seed; 12.25% on the 2 seeds it was chosen
on). docs/experiments.md#resnet20"""
model = "resnet20"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 60,
           "restart_epochs": 40, "restart_lr": 0.05, "augment": "auto", "precision": "auto",
           "test_batch_size": 250, "prune_method": "dns", "dns_threshold": "density", "distill": 0.9,
           "retrain_lr": 0.02, "retrain_epochs": 30, "erk_alive": 0.195}
quantization = {"bits": {"conv": 3, "fc": 5}, "bias_bits": {"*": 0}, "bn_half": True, "distill": 0.9,
                "finetune_epochs": 10, "lr": 1e-4, "precision": "auto"}
huffman_encode = {"coder": "ans"}
