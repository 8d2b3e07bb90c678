"""Trained ternary quantization (Zhu, Han, Mao & Dally 2017) of ResNet-20 on CIFAR-10, from the
dense networks of config/resnet20.py: nothing pruned, every conv ternary but the first (it and
the fc stay float32), taught by the dense network, batch-norm folded and shared, ANS.
Result: 20.2x at 12.12% test error, dense 11.77% (the shipped seed; 12.55% on the 2 seeds it was chosen
on, 18.0x with Huffman). docs/experiments.md#resnet20_ttq"""
model = "resnet20"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 60,
           "restart_epochs": 40, "restart_lr": 0.05, "augment": "auto", "precision": "auto",
           "test_batch_size": 250, "prune_iterations": 0}
quantization = {"source": "initial", "method": "ttq", "ttq_threshold": {"*": 0.05}, "finetune_epochs": 30,
                "lr": 1e-3, "distill": 0.9, "bias_bits": {"*": 0}, "bn_bits": 8, "bn_share": "network",
                "precision": "auto"}
huffman_encode = {"coder": "ans"}
