"""AlexNet on ImageNet, torchvision's pretrained weights, with the paper's settings (Han, Mao &
Dally 2016 Table 4: each layer pruned to the paper's share of surviving weights, 8-bit convs,
5-bit fcs). Not run here (no ImageNet, days of GPU time), so no result:
docs/experiments.md#alexnet. On GPUs: torchrun --nproc_per_node=8 pruning.py config/alexnet.py
--data_root=/data, the same for quantization.py, then python huffman_encode.py config/alexnet.py."""
model = "alexnet"
pruning = {"dataset": "imagenet", "pretrained": True, "epochs": 0, "batch_size": 64, "test_batch_size": 250,
           "val_split": 0.01, "workers": 8, "precision": "auto", "optimizer": "sgd", "weight_decay": 5e-4,
           "prune_method": "percentile", "percent": {"features.0": 16.0, "features.3": 62.0, "features.6": 65.0,
                                                      "features.8": 63.0, "features.10": 63.0, "classifier.1": 91.0,
                                                      "classifier.4": 91.0, "classifier.6": 75.0},
           "retrain_lr": 0.001, "retrain_epochs": 20}
quantization = {"bits": {"conv": 8, "fc": 5}, "bias_bits": {"*": 0}, "finetune_epochs": 2, "lr": 1e-5,
                "precision": "auto"}
huffman_encode = {"coder": "huffman"}
