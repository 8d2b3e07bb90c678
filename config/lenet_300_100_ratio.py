"""LeNet-300-100 on MNIST, the ratio push past config/lenet_300_100.py (whose settings these are,
from the same pruned networks): the ANS coder, and stage 2's dead-unit pass. Chosen on seed 0's
validation split by the one-standard-error rule (the highest ratio whose decoded validation
error is within one standard error of the lowest, 0.15 points on 6,000 images) among the
recipe, 5-bit layers, entropy-constrained clustering at weights 0.01 / 0.02 / 0.03 / 0.05 /
0.1 / 0.2 / 0.4 (and at 0.05 / 0.1 / 0.2 from 5 bits), and a group lasso of 1e-5 / 3e-5 / 1e-4
while surgery retrains: the lowest validation error was 5-bit layers' 1.35%, and only the recipe
was within 1.50% (entropy weights 0.01 and 0.02 read 1.500%; README, "Past Huffman")."""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 30, "sensitivity": {"*": 2.8, "fc3": 1.4}}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
