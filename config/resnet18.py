"""ResNet-18 (torchvision's, CIFAR stem: 3x3 stride-1 first conv, no max-pool) on CIFAR-10:
dynamic network surgery with scaled thresholds, 4-bit convs, 5-bit fc, batch-norm folded and
shared; settings fixed from ResNet-20's, without a search. Needs a GPU.
Result: 66.6x at 11.80% test error (1 seed, one NVIDIA H200). docs/experiments.md#resnet18"""
model = "resnet18"
pruning = {"dataset": "cifar10", "cifar_stem": True, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
           "epochs": 30, "batch_size": 256, "augment": "auto", "precision": "auto", "test_batch_size": 500,
           "prune_method": "dns", "dns_threshold": "scaled", "retrain_lr": 0.02, "retrain_epochs": 15,
           "sensitivity": {"*": 1.5, "conv1": 1.0, "layer3.*": 2.0, "layer4.*": 2.0}}
quantization = {"bits": {"conv": 4, "fc": 5}, "bias_bits": {"*": 0}, "bn_bits": 6, "finetune_epochs": 4, "lr": 1e-4,
                "precision": "auto"}
huffman_encode = {"coder": "huffman"}
