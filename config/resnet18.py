"""ResNet-18 (torchvision's, with the CIFAR stem: 3x3 stride-1 first conv, no max-pool) on CIFAR-10.

Run once on one GPU (an NVIDIA H200 lent for 15 minutes; on 2 CPU cores one epoch takes over half
an hour), so every setting here was fixed before the run from what ResNet-20 taught, and none was
chosen on any split of this network's data: SGD + Nesterov, lr 0.1 with a cosine decay over 30
epochs, batch 256, weight decay 5e-4, crop + flip, bf16 autocast. Pruning: dynamic network surgery
with thresholds that follow each layer's weight std (as ResNet-20); the wide layers 3 and 4 hold
94% of the weights and are pruned hardest. Quantization: 4-bit convs (one bit more than ResNet-20's,
no lever search was possible), 5-bit fc, batch-norm scale and shift shared among 64 values."""
model = "resnet18"
pruning = {"dataset": "cifar10", "cifar_stem": True, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
           "epochs": 30, "batch_size": 256, "augment": "auto", "precision": "auto", "test_batch_size": 500,
           "prune_method": "dns", "dns_threshold": "scaled", "retrain_lr": 0.02, "retrain_epochs": 15,
           "sensitivity": {"*": 1.5, "conv1": 1.0, "layer3.*": 2.0, "layer4.*": 2.0}}
quantization = {"bits": {"conv": 4, "fc": 5}, "bias_bits": {"*": 0}, "bn_bits": 6, "finetune_epochs": 4, "lr": 1e-4,
                "precision": "auto"}
huffman_encode = {}
