"""LeNet-300-100 on MNIST, the ratio push past config/lenet_300_100.py (whose settings these are,
from the same pruned networks): the ANS coder, and stage 2's dead-unit pass. Chosen on seed 0's
validation split by the one-standard-error rule (the highest ratio whose decoded validation
error is within one standard error of the lowest, 0.15 points on 6,000 images) among the
recipe, 5-bit layers, entropy-constrained clustering at weights 0.01 / 0.02 / 0.03 / 0.05 /
0.1 / 0.2 / 0.4 (and at 0.05 / 0.1 / 0.2 from 5 bits), and a group lasso of 1e-5 / 3e-5 / 1e-4
while surgery retrains: the lowest validation error was 5-bit layers' 1.35%, and only the recipe
was within 1.50% (entropy weights 0.01 and 0.02 read 1.500%; README, "Past Huffman"). Later
runs by the same rule: 45 epochs of surgery read 1.32% (the lowest, so the bound fell to
1.46%) at 93.9x; surgery holding the Erdos-Renyi-kernel rule's densities (erk_alive, Evci et
al. 2020: fc1 3.8%, fc2 10.9%, fc3 90% at 4.9% in all; fc1 2.7%, fc2 7.8%, fc3 64% at 3.5%)
read 1.37% at 94.9x, 1.43% at 111.7x (4.0%), 1.37% at 122.7x (3.5%) and 1.65% at 137.5x (3.0%):
the rule takes 3.5% (out/erk300). File format 7 (ANS's neighbours models) codes the same runs
in 110.9x, 130.3x, 142.2x and 159.6x: within the bound, 3.5% is still the highest ratio."""
model = "lenet_300_100"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "dns_threshold": "density", "erk_alive": 0.035, "retrain_lr": 0.01,
           "retrain_epochs": 30}
quantization = {"bits": {"fc1": 3, "fc2": 3, "*": 4}, "bias_bits": {"*": 5}, "finetune_epochs": 10, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
