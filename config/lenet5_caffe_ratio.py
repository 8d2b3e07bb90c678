"""LeNet-5 (caffe) on MNIST, the ratio push past config/lenet5_caffe.py (whose settings these are,
from the same dense networks): a group lasso on every layer while surgery retrains (strength
2e-5), so that units go whole; the ANS coder. (Until format 7: group lasso 3e-5 and entropy-
constrained clustering after k-means, weight 0.01, so that the index streams shorten.) Chosen on
seed 0's validation split among the recipe, entropy weights 0.01 / 0.02 / 0.05, group lasso 3e-5
/ 5e-5 and group lasso 3e-5 with entropy weight 0.01, by the one-standard-error rule: the
highest ratio whose decoded validation error is within one standard error (0.12 points on 6,000
images) of the lowest (README, "Past Huffman"). Later, 40 epochs of surgery instead of 25, by
the same rule among the same runs: seed 0 336.1x at 0.90% decoded validation error against
331.3x at 0.87%, both within the rule's 0.97% (out/ratio_e40). File format 7 (ANS's neighbours
models) codes them in 380.6x and 375.6x: the choice stands. With format 7 the 300x target left
bytes to spare, so the settings were chosen again for error (out/v7q; rule written before the
runs: among variants at 300x or more on each of seeds 0-2, the lowest mean decoded validation
error over the three). Stage 2 from the recipe's pruned networks: no entropy-constrained
clustering 0.900% (the recipe 0.961%), fine-tuning lr 3e-4 0.944%, 4-bit fc layers 0.967%, 10
fine-tuning epochs 0.961%; both of the first two 0.894%. Then stage 1 from each seed's dense
network with that stage 2: group lasso 2e-5 0.867% at 320-352x, 60 epochs of surgery 0.900%,
sensitivities x 0.9 0.933%: the rule takes the group lasso at 2e-5."""
model = "lenet5_caffe"
pruning = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4, "precision": "fp32", "augment": "shift",
           "prune_method": "dns", "retrain_lr": 0.01, "retrain_epochs": 40,
           "sensitivity": {"conv1": 1.2, "conv2": 2.4, "fc1": 3.6, "fc2": 2.3}, "group_lasso": {"*": 2e-5}}
quantization = {"bits": {"conv": 5, "*": 3}, "bias_bits": {"*": 5}, "finetune_epochs": 5, "lr": 3e-4,
                "precision": "fp32"}
huffman_encode = {"coder": "ans"}
