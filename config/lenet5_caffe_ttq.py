"""Trained ternary quantization (Zhu, Han, Mao & Dally 2017) of LeNet-5 (caffe) on MNIST, beside
the Deep Compression recipe of the same dense network (config/lenet5_caffe.py, whose dense
settings these are). Stage 1 prunes nothing; stage 2 starts from the dense network
(source=initial) and makes every layer ternary, threshold 0.05 x max|latent|, 10 epochs of Adam
from lr 1e-3 with a cosine schedule. Chosen on validation among four variants from the same
dense network (seed 1's): lr 1e-3 with the first and last layers float32 (the paper's choice)
99.350%, lr 3e-4 99.367%, threshold 0.1 99.350%, every layer ternary 99.383% (and the smallest
file): README, "Trained ternary quantization"."""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_iterations": 0}
quantization = {"source": "initial", "method": "ttq", "ttq_threshold": {"*": 0.05}, "ttq_float": {"*": False},
                "finetune_epochs": 10, "lr": 1e-3, "bias_bits": {"*": 5}, "precision": "fp32"}
huffman_encode = {}
