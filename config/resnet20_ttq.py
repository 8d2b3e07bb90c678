"""Trained ternary quantization (Zhu, Han, Mao & Dally 2017) of ResNet-20 on CIFAR-10, beside the
Deep Compression recipe of the same dense network (config/resnet20.py, whose dense settings these
are). Stage 1 trains the dense network and prunes nothing (prune_iterations=0); stage 2 starts
from that dense network as the paper does (source=initial) and makes every conv ternary but the
first, with the fc, in float32 (the paper's choice), threshold 0.05 x max|latent| (the paper's),
Adam with a cosine schedule for 30 epochs; the batch-norms are then folded and shared as in the
Deep Compression recipe (8 bits, one table for the network); stage 3 codes each ternary layer as
one symbol per weight. The paper's threshold and float layers; the learning rate chosen on
validation between two runs from seed 0's dense network: lr 1e-3 and 3e-4 both read 87.12%
decoded validation accuracy, and the tie went to the smaller file (1e-3: 60,176 bytes against
61,051). Beyond the paper, the dense network teaches the ternary one (distill 0.9, T = 4, the
values fixed before the run): decoded validation 88.18% against 87.12% without it; 80 epochs
without it read 87.18% (README, "Trained ternary quantization beside Deep Compression")."""
model = "resnet20"
pruning = {"dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "epochs": 60,
           "restart_epochs": 40, "restart_lr": 0.05, "augment": "auto", "precision": "auto",
           "test_batch_size": 250, "prune_iterations": 0}
quantization = {"source": "initial", "method": "ttq", "ttq_threshold": {"*": 0.05}, "finetune_epochs": 30,
                "lr": 1e-3, "distill": 0.9, "bias_bits": {"*": 0}, "bn_bits": 8, "bn_share": "network",
                "precision": "auto"}
huffman_encode = {}
