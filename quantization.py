"""Stage 2 of Deep Compression (Han, Mao & Dally 2016, section 3): trained quantization and
weight sharing. Each layer's surviving weights are clustered by k-means into 2**bits shared
values; the network then keeps a codebook of centroids per layer and a fixed index per weight,
and the centroids are fine-tuned with the cluster assignment and the pruning mask fixed.
With method=ttq, trained ternary quantization instead (Zhu, Han, Mao & Dally 2017): each layer
becomes {-wn, 0, wp} with both scales and the latent weights trained.

    python quantization.py --model=lenet5_caffe --data_root=../shared/data   # config/lenet5_caffe.py

Settings: the defaults below (equal to config/lenet_300_100.py), then the recipe (the file given
first, else config/<model>.py when there is one), then --key=value overrides.

Reads {out_dir}/{model}_pruned.pt (or _initial.pt with source=initial; written by pruning.py);
writes {out_dir}/{model}_quantized.pt (the input of stage 3) and {out_dir}/{model}_quantized.json. The data set, batch sizes,
validation split and subset are those stage 1 used, so the three test figures compare with its.
"""
import os
import time

import torch.nn as nn

import util
from models import MODELS, build_model, teacher_from
from prune import drop_dead_units, masked_layers
from quantize import (KMEANS_INITS, MAX_BITS, fold_batch_norm, layer_rows, quantize_model, round_to_half, share_values,
                      to_ternary, ternary_to_quantized)

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # lenet_300_100 | lenet5 | lenet5_caffe | resnet20 | resnet56 | resnet18: reads {out_dir}/{model}_{source}.pt
source = "pruned"           # stage 1's checkpoint to start from: pruned (Deep Compression) | initial (the dense
                            # network: TTQ's paper starts there)
method = "kmeans"           # kmeans (Deep Compression: 2**bits shared values per layer, centroids fine-tuned)
                            # | ttq (trained ternary quantization, Zhu et al. 2017: {-wn, 0, wp} per layer, the
                            # two scales and the latent weights trained)
data_root = "data"          # folder holding MNIST/raw or CIFAR10/{train,test}; the data set is stage 1's
out_dir = "out"             # where stage 1 wrote its checkpoint; the quantized one goes there too
bits = {"fc1": 3, "fc2": 3, "*": 4}  # bits per layer, 2**bits shared values (section 3 used 8 for conv, 5 for fc layers)
bias_bits = {"*": 5}        # per layer: after fine-tuning, share the bias among 2**bias_bits values (stage 3
                            # then stores a value table and Huffman-coded indices); 0 = keep float32 biases
fold_bn = True              # after fine-tuning, fold each batch-norm's running statistics into its scale and
                            # shift (same function at inference; stage 3 then stores 2 vectors of 4)
bn_bits = 0                 # with fold_bn: share each batch-norm's scale and shift among 2**bn_bits values
                            # (0 = float32); stage 3 stores a value table and Huffman-coded indices
bn_half = False             # with fold_bn and bn_bits 0: round each folded scale and shift to float16 (11
                            # significant bits; the tensors stay float32, stage 3 stores 2 bytes a value)
bn_share = "layer"          # with bn_bits: layer (a table per scale and per shift vector) | network (one
                            # table for every scale, one for every shift, clustered on a log scale: stage 3
                            # stores each table once)
ttq_threshold = {"*": 0.05} # ttq, per layer: a weight is 0 where |latent| <= t x max|latent| (the paper: 0.05)
ttq_float = {"*": False, "first": True, "last": True}  # ttq, per layer: keep it float32 ('first' / 'last' name
                            # the first and last quantizable layer; the paper keeps both)
drop_dead = True            # first prune the weights of units that cannot change the output: units no weight
                            # reads, and units without inputs (constant: folded into the next layer's bias);
                            # lossless, on chain networks (the LeNets)
entropy_weight = {"*": 0.0} # per layer, beyond the paper: entropy-constrained clustering (Chou et al. 1989) after
                            # k-means, each weight to the centroid minimising (w - c)^2 + entropy_weight x var(w)
                            # x its code's length in bits; shorter index streams for a little more error (0 = off)
init = "linear"             # centroid initialisation (section 3.2): linear (the best) | density | random | kmeans++
finetune_epochs = 10        # epochs of centroid fine-tuning (section 3.3); 0 keeps the k-means centroids
lr = 3e-4                   # fine-tuning (kmeans) or training (ttq) learning rate (Adam, cosine schedule)
distill = 0.0               # fine-tuning / ttq training: weight of the dense network's softened outputs in the loss
                            # (knowledge distillation, Hinton et al. 2015, from stage 1's {model}_initial.pt; 0 = off)
distill_temperature = 4.0   # softmax temperature of that term
teacher = "dense"           # distill's teacher: dense (stage 1's dense network) | snapshots (it and the snapshots
                            # stage 1 kept before its warm restarts, logits averaged: a snapshot ensemble)
seed = 0                    # torch seed (batch order) and k-means seed (random and kmeans++ inits)
precision = "fp32"          # fine-tuning arithmetic: auto (bf16 on CUDA and on CPUs with AMX / AVX512-BF16) | fp32
                            # | bf16 (autocast); codebooks, k-means, checkpoints and evaluation stay float32
device = "auto"             # auto (CUDA if available) | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

def ternary_layers(net, cfg):
    """{layer name: threshold t} of the layers TTQ makes ternary: every masked layer that the
    per-layer ttq_float leaves out ('first' / 'last' there name the first and last layer)."""
    names = [n for n, _ in masked_layers(net)]
    keep = {names[0] if k == "first" else names[-1] if k == "last" else k: v for k, v in cfg["ttq_float"].items()}
    keep = util.per_layer(net, keep, "ttq_float")
    thresholds = util.per_layer(net, cfg["ttq_threshold"], "ttq_threshold")
    return {n: thresholds[n] for n in names if not keep[n]}


def quant_table(rows):
    """The per-layer table of this stage, as one string."""
    width = max([6] + [len(r["name"]) + 1 for r in rows])
    lines = [f"{'layer':<{width}}| {'shape':<18}| {'non-zeros':^19} | bits | clusters | distinct | pruned stay 0"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}| {str(tuple(r['shape'])):<18}| {r['nonzero']:8} / {r['total']:8} "
                     f"| {r['bits']:4} | {r['clusters']:8} | {r['distinct']:8} | {'yes' if r['zeros_kept'] else 'NO'}")
    return "\n".join(lines)


# --- the stage ------------------------------------------------------------------------------

def check_settings(cfg):
    """Reject bad settings before any work, each with one line that names the fix."""
    util.require(cfg["model"] in MODELS, f"unknown model {cfg['model']!r}; choose one of {', '.join(MODELS)}")
    util.require(cfg["source"] in ("pruned", "initial"),
                 f"unknown source {cfg['source']!r}; choose pruned or initial")
    util.require(cfg["method"] in ("kmeans", "ttq"), f"unknown method {cfg['method']!r}; choose kmeans or ttq")
    util.require(all(0 <= v < 1 for v in cfg["ttq_threshold"].values()),
                 f"ttq_threshold must be in [0, 1), got {cfg['ttq_threshold']}")
    util.require(cfg["init"] in KMEANS_INITS,
                 f"unknown init {cfg['init']!r}; choose one of {', '.join(KMEANS_INITS)}")
    util.require(all(1 <= v <= MAX_BITS for v in cfg["bits"].values()),
                 f"bits must be in 1..{MAX_BITS}, got {cfg['bits']}")
    util.require(all(v >= 0 for v in cfg["entropy_weight"].values()),
                 f"entropy_weight must be >= 0 (0 = plain k-means), got {cfg['entropy_weight']}")
    util.require(all(0 <= v <= MAX_BITS for v in cfg["bias_bits"].values()),
                 f"bias_bits must be 0 (float32 biases) or 1..{MAX_BITS}, got {cfg['bias_bits']}")
    util.require(0 <= cfg["bn_bits"] <= MAX_BITS, f"bn_bits must be 0 (float32) or 1..{MAX_BITS}, got {cfg['bn_bits']}")
    util.require(cfg["fold_bn"] or not cfg["bn_bits"], "bn_bits shares folded batch-norms: set --fold_bn=True")
    util.require(cfg["fold_bn"] or not cfg["bn_half"], "bn_half rounds folded batch-norms: set --fold_bn=True")
    util.require(not (cfg["bn_half"] and cfg["bn_bits"]), "bn_half and bn_bits both store the batch-norms: set one")
    util.require(cfg["bn_share"] in ("layer", "network"), f"unknown bn_share {cfg['bn_share']!r}; choose layer or network")
    util.require(cfg["finetune_epochs"] >= 0, f"finetune_epochs must be >= 0, got {cfg['finetune_epochs']}")
    util.require(cfg["lr"] > 0, f"lr must be positive, got {cfg['lr']}")
    util.require(0 <= cfg["distill"] <= 1, f"distill must be in [0, 1], got {cfg['distill']}")
    util.require(cfg["distill_temperature"] > 0, f"distill_temperature must be > 0, got {cfg['distill_temperature']}")
    util.require(cfg["teacher"] in ("dense", "snapshots"),
                 f"unknown teacher {cfg['teacher']!r}; choose dense or snapshots")
    util.require(cfg["teacher"] == "dense" or cfg["distill"] > 0,
                 "teacher=snapshots teaches through distillation: set --distill (0.9 in the ResNet-20 recipe)")
    util.require(cfg["precision"] in util.PRECISIONS,
                 f"unknown precision {cfg['precision']!r}; choose one of {', '.join(util.PRECISIONS)}")


def main(cfg):
    t_start = time.time()
    dev, precision = util.start_stage(cfg, check_settings, "fine-tuning")

    stem = os.path.join(cfg["out_dir"], cfg["model"])
    pruned = util.load_checkpoint(f"{stem}_{cfg['source']}.pt", cfg["source"], dev,
                                  f"run pruning.py --model={cfg['model']} --out_dir={cfg['out_dir']} first")
    net = build_model(pruned["model"]["name"], **pruned["model"]["kwargs"]).to(dev)
    net.load_state_dict(pruned["state_dict"])
    teacher = None
    if cfg["distill"]:
        # The dense network, frozen, teaches the quantized one (beyond the paper): its softened
        # outputs carry more than the labels of what the full-precision weights knew.
        dense = util.load_checkpoint(
            f"{stem}_initial.pt", "initial", dev,
            f"distill needs stage 1's dense network: run pruning.py --out_dir={cfg['out_dir']}")
        util.require(cfg["teacher"] == "dense" or dense.get("snapshots"),
                     f"teacher=snapshots: {stem}_initial.pt holds no snapshot (stage 1 ran without a warm restart): "
                     "set --teacher=dense")
        teacher = teacher_from(dense, cfg["teacher"]).to(dev)
    train_kw = dict(weight_decay=0.0, precision=precision, teacher=teacher, distill=cfg["distill"],
                    temperature=cfg["distill_temperature"])
    layer_bits = util.per_layer(net, cfg["bits"], "bits")
    ternary = ternary_layers(net, cfg) if cfg["method"] == "ttq" else {}
    bias_bits = util.per_layer(net, cfg["bias_bits"], "bias_bits")

    p = pruned["settings"]  # stage 1's data, so that the accuracies compare with its own
    train, val, test = util.load_data(p["dataset"], cfg["data_root"], p["batch_size"], p["test_batch_size"],
                                      p["val_split"], p["subset"], dev, cfg["seed"], p.get("augment", "auto"),
                                      p.get("image_size", util.IMAGE_SIZE), p.get("workers", 4))
    print(f"data: {p['dataset']} train {len(train.y)}, validation {len(val.y)}, test {len(test.y)}")
    accuracy, validation = {}, {}

    def report(header, key):
        # Validation accuracy is what settings are chosen by; the test line is reported only.
        _, val_correct, val_total = util.evaluate(net, val)
        validation[key] = util.percent(val_correct, val_total)
        loss, correct, total = util.evaluate(net, test)
        accuracy[key] = util.percent(correct, total)
        print(f"--- {header} ---")
        print(util.test_line(loss, correct, total))

    start = "retrained" if cfg["source"] == "pruned" else "dense"
    report("Pruned and retrained (stage 1)" if start == "retrained" else "Dense (stage 1)", start)

    # 0. Whole units that compute nothing (beyond the paper): element-wise pruning leaves neurons
    # whose outputs nothing reads and neurons without inputs, whose weights still cost bytes.
    dead = drop_dead_units(net) if cfg["drop_dead"] else None
    if dead is not None:
        print(f"dead units: {dead['unread']} unread, {dead['constant']} constant (folded into the next bias): "
              f"{dead['weights']} weights pruned, {dead['biases']} biases of idle units zeroed, the same function")
    zeros = {name: m.weight.detach() == 0 for name, m in masked_layers(net)}  # what stays 0 from here on

    if cfg["method"] == "kmeans":
        # 1. Weight sharing (section 3.1): k-means on each layer's surviving weights; with
        # entropy_weight, then traded for shorter codes (stage 3 entropy-codes the indices, so
        # what a layer costs is the entropy of its index stream, not its bits).
        quantized = quantize_model(net, layer_bits, cfg["init"], cfg["seed"],
                                   util.per_layer(net, cfg["entropy_weight"], "entropy_weight"))
        util.same_on_every_rank([t for _, m in masked_layers(net) for t in (m.codebook, m.index)], "the codebooks")
        report(f"After clustering ({cfg['init']} init)", "clustered")

        # 2. Fine-tune the centroids (section 3.3). The parameters left are the codebooks, the
        # biases and batch-norm's scales and shifts; the biases and batch-norm are trained too
        # (batch-norm's running statistics follow the new weights): stage 3 stores them
        # uncompressed, so tuning them costs no space and lets them absorb part of the
        # quantization error. Indices and masks are buffers and do not move.
        history = util.fit(net, net.parameters(), train, val, cfg["finetune_epochs"], cfg["lr"], label="finetune",
                           **train_kw)
        report("After fine-tuning the centroids", "finetuned")
    else:
        # 1-2 (TTQ instead). Each chosen layer becomes {-wn, 0, wp}; the latent weights, the two
        # scales per layer and everything left in float32 train together, the zeros moving as
        # latent weights cross the threshold (Zhu et al. 2017, section 3). Then each ternary
        # layer is frozen into a quantized one: a 2-value codebook, the zeros in its mask.
        for name, m in masked_layers(net):
            if name in ternary:
                to_ternary(m, ternary[name])
        report("Ternary (scales fitted, before training)", "clustered")
        history = util.fit(net, net.parameters(), train, val, cfg["finetune_epochs"], cfg["lr"], label="ttq",
                           **train_kw)
        quantized = {}
        for name, m in masked_layers(net):
            if name in ternary:
                ternary_to_quantized(m)
                quantized[name] = dict(bits=2, clusters=2)  # 3 levels: 2 bits a weight, dense
        util.same_on_every_rank([t for _, m in masked_layers(net) if hasattr(m, "index")
                                 for t in (m.codebook, m.index, m.mask)], "the ternary layers")
        report("After training the ternary network", "finetuned")

    # 3. Share the biases too (beyond the paper, which stores them raw): an fc layer of LeNet
    # has a bias per output, 1.6-2.4 KB in all, a tenth of a 20 KB file; a few shared values
    # per layer cost almost nothing in accuracy. Done last so that fine-tuning cannot undo it.
    if any(bias_bits.values()):
        for name, m in masked_layers(net):
            if name in quantized and bias_bits[name] and m.bias is not None:
                quantized[name].update(bias_bits=bias_bits[name],
                                       bias_values=share_values(m.bias, bias_bits[name], cfg["init"], cfg["seed"]))
        report("After sharing the biases", "bias_shared")

    # 4. Batch-norm (beyond the paper, whose networks had none): a residual network's
    # batch-norms hold four float32 vectors per conv, 11 KB of ResNet-20, a quarter of a
    # 25x file. At inference two of them suffice (fold_batch_norm), and those can be shared
    # like the biases: per vector, or across the network (ResNet-20's 19 layers hold 688
    # scales; a table per 16-channel vector costs as much as its codes, one table for all
    # costs 4 bytes a value once).
    norms = [bn for bn in net.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    if norms and cfg["fold_bn"]:
        for bn in norms:
            fold_batch_norm(bn)
        if cfg["bn_bits"]:
            vectors = [bn.weight for bn in norms], [bn.bias for bn in norms]
            network = cfg["bn_share"] == "network"
            for group in vectors if network else [[v] for vs in vectors for v in vs]:
                share_values(group, cfg["bn_bits"], cfg["init"], cfg["seed"], relative=network)
        elif cfg["bn_half"]:
            # 688 scales and shifts in half precision cost 2.7 KB, what one 8-bit table across
            # the network costs, but without clustering each value moves by at most 2**-11 of itself
            for bn in norms:
                round_to_half(bn.weight, bn.bias)
        how = (f" ({cfg['bn_bits']}-bit, shared per {cfg['bn_share']})" if cfg["bn_bits"]
               else " (float16 values)" if cfg["bn_half"] else "")
        report("After folding the batch-norms" + how, "bn_folded")
    accuracy["quantized"] = accuracy[list(accuracy)[-1]]  # what the checkpoint computes
    validation["quantized"] = validation[list(validation)[-1]]

    rows = layer_rows(net, quantized, zeros)
    print(quant_table(rows))
    final = accuracy["quantized"]
    print(f"Accuracy: {start} {accuracy[start]:.2f}% | {'ternary' if ternary else 'after clustering'} "
          f"{accuracy['clustered']:.2f}% | "
          f"after fine-tuning {accuracy['finetuned']:.2f}%"
          + (f" | biases shared {accuracy['bias_shared']:.2f}%" if "bias_shared" in accuracy else "")
          + (f" | batch-norm folded {accuracy['bn_folded']:.2f}%" if "bn_folded" in accuracy else "")
          + f" ({final - accuracy[start]:+.2f} points)")

    settings = {**cfg, "pruning": p}
    summary = dict(
        model=cfg["model"], dataset=p["dataset"], stage="quantized", accuracy=accuracy, validation=validation, layers=rows,
        dead_units=dead,
        history=dict(finetune=history), settings=settings, device=str(dev), precision=precision, seconds=round(time.time() - t_start, 1))
    util.save_checkpoint(stem + "_quantized.pt", "quantized", net, pruned["model"], settings,
                         {**summary, "pruning": pruned["metrics"]}, quantized=quantized)
    util.write_json(stem + "_quantized.json", summary)
    print(f"saved {stem}_quantized.pt and {stem}_quantized.json ({summary['seconds']} s)")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS, stage="quantization")
