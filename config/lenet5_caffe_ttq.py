"""Trained ternary quantization (Zhu, Han, Mao & Dally 2017) of LeNet-5 (caffe) on MNIST, from the
dense network of config/lenet5_caffe.py: nothing pruned, every layer ternary, threshold 0.05.
Result: 19.9x at 0.53% test error (1 seed). docs/experiments.md#lenet5_caffe_ttq"""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_iterations": 0}
quantization = {"source": "initial", "method": "ttq", "ttq_threshold": {"*": 0.05}, "ttq_float": {"*": False},
                "finetune_epochs": 10, "lr": 1e-3, "bias_bits": {"*": 5}, "precision": "fp32"}
huffman_encode = {"coder": "huffman"}
