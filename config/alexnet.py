"""AlexNet on ImageNet with the paper's settings (Han, Mao & Dally 2016, Table 4; Han et al. 2015
Table 4): NOT RUN HERE (no ImageNet on this project's machines, and days of GPU time), so this
recipe is the paper's, not one chosen on a validation split. Starts from torchvision's
pretrained weights (no dense training), prunes each layer to the paper's share of surviving
weights in one step (conv1 84%, conv2 38%, conv3 35%, conv4-5 37%, fc6-7 9%, fc8 25%),
retrains, then 8-bit convs and 5-bit fcs. Run on a GPU machine, on several with torchrun:

    torchrun --nproc_per_node=8 pruning.py config/alexnet.py --data_root=/data
    torchrun --nproc_per_node=8 quantization.py config/alexnet.py --data_root=/data
    python huffman_encode.py config/alexnet.py"""
model = "alexnet"
pruning = {"dataset": "imagenet", "pretrained": True, "epochs": 0, "batch_size": 64, "test_batch_size": 250,
           "val_split": 0.01, "workers": 8, "precision": "auto", "optimizer": "sgd", "weight_decay": 5e-4,
           "prune_method": "percentile", "percent": {"features.0": 16.0, "features.3": 62.0, "features.6": 65.0,
                                                      "features.8": 63.0, "features.10": 63.0, "classifier.1": 91.0,
                                                      "classifier.4": 91.0, "classifier.6": 75.0},
           "retrain_lr": 0.001, "retrain_epochs": 20}
quantization = {"bits": {"conv": 8, "fc": 5}, "bias_bits": {"*": 0}, "finetune_epochs": 2, "lr": 1e-5,
                "precision": "auto"}
huffman_encode = {}
