"""VGG-16 on ImageNet, torchvision's pretrained weights, with the paper's settings (Han, Mao &
Dally 2016 Table 5: each layer pruned to the paper's share of surviving weights, 8-bit convs,
5-bit fcs). Not run here (no ImageNet, days of GPU time), so no result:
docs/experiments.md#vgg16. On GPUs: torchrun --nproc_per_node=8 pruning.py config/vgg16.py
--data_root=/data, the same for quantization.py, then python huffman_encode.py config/vgg16.py."""
model = "vgg16"
pruning = {"dataset": "imagenet", "pretrained": True, "epochs": 0, "batch_size": 32, "test_batch_size": 100,
           "val_split": 0.01, "workers": 8, "precision": "auto", "optimizer": "sgd", "weight_decay": 5e-4,
           "prune_method": "percentile", "percent": {
               "features.0": 42.0, "features.2": 78.0, "features.5": 66.0, "features.7": 64.0, "features.10": 47.0,
               "features.12": 76.0, "features.14": 58.0, "features.17": 68.0, "features.19": 73.0,
               "features.21": 66.0, "features.24": 65.0, "features.26": 71.0, "features.28": 64.0,
               "classifier.0": 96.0, "classifier.3": 96.0, "classifier.6": 77.0},
           "retrain_lr": 0.001, "retrain_epochs": 20}
quantization = {"bits": {"conv": 8, "fc": 5}, "bias_bits": {"*": 0}, "finetune_epochs": 2, "lr": 1e-5,
                "precision": "auto"}
huffman_encode = {"coder": "huffman"}
