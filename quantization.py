"""Stage 2 of Deep Compression (Han, Mao & Dally 2016, section 3): trained quantization and
weight sharing. Each layer's surviving weights are clustered by k-means into 2**bits shared
values; the network then keeps a codebook of centroids per layer and a fixed index per weight,
and the centroids are fine-tuned with the cluster assignment and the pruning mask fixed.
With method=ttq, trained ternary quantization instead (Zhu, Han, Mao & Dally 2017): each layer
becomes {-wn, 0, wp} with both scales and the latent weights trained.

    python quantization.py --model=lenet5_caffe --data_root=../shared/data   # config/lenet5_caffe.py

Settings: the defaults below (equal to config/lenet_300_100.py), then the recipe (the file given
first, else config/<model>.py when there is one), then --key=value overrides. What each does,
with its paper and section: docs/method.md.

Reads {out_dir}/{model}_pruned.pt (or _initial.pt with source=initial; written by pruning.py);
writes {out_dir}/{model}_quantized.pt (the input of stage 3) and {out_dir}/{model}_quantized.json. The data set, batch sizes,
validation split and subset are those stage 1 used, so the three test figures compare with its.
"""
import copy
import os
import time

import torch
import torch.nn as nn

import training
import util
from datasets import DataSpec, load_data
from models import build_model, check_model, file_stem, teacher_from
from prune import drop_dead_units, layer_kind, layer_value, masked_layers, per_layer
from quantize import (KMEANS_INITS, MAX_BITS, fold_batch_norm, layer_rows, quantize_layer, quantize_model, round_to_grid,
                      round_to_half, share_values, to_ternary, ternary_to_quantized)

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # the network pruning.py was given: reads {out_dir}/{model}_{source}.pt
source = "pruned"           # stage 1's checkpoint to start from: pruned | initial (the dense network)
method = "kmeans"           # kmeans (2**bits shared values per layer, centroids fine-tuned) | ttq (ternary)
data_root = "data"          # folder holding the data set; which one is stage 1's
out_dir = "out"             # where stage 1 wrote its checkpoint; the quantized one goes there too
bits = {"fc1": 3, "fc2": 3, "*": 4}  # per layer: 2**bits shared values
bias_bits = {"*": 5}        # per layer: share the biases among 2**bias_bits values after fine-tuning (0 = float32)
fold_bn = True              # fold each batch-norm's running statistics into its scale and shift
bn_bits = 0                 # with fold_bn: share each scale and shift among 2**bn_bits values (0 = float32)
bn_half = False             # with fold_bn and bn_bits 0: round each folded scale and shift to float16
bn_share = "layer"          # with bn_bits: layer (a table per vector) | network (one for all scales, one for shifts)
codebook_bits = 8           # round each codebook and shared bias table to a power-of-two grid, the largest |value|
                            # held in this many bits (stage 3 stores the integers); 0 = float32 as fine-tuned
ttq_threshold = {"*": 0.05} # ttq, per layer: a weight is 0 where |latent| <= t x max|latent|
ttq_float = {"*": False, "first": True, "last": True}  # ttq, per layer: keep it float32 ('first', 'last')
drop_dead = True            # first prune the weights of units that cannot change the output (lossless)
entropy_weight = {"*": 0.0} # per layer: entropy-constrained clustering after k-means (0 = off)
init = "linear"             # centroid initialisation: linear | density | random | kmeans++
max_drop = 0.0              # kmeans, > 0: the automatic recipe's bits, searched on validation (bits is ignored): per
                            # layer the fewest whose clustered network stays within max_drop points of stage 1's dense
finetune_epochs = 10        # epochs of centroid fine-tuning (kmeans) or ternary training (ttq)
lr = 3e-4                   # its learning rate (Adam, cosine schedule)
distill = 0.0               # weight of the teacher's softened outputs in the loss (0 = labels only)
distill_temperature = 4.0   # softmax temperature of that term
teacher = "dense"           # distill's teacher: dense | snapshots (stage 1's, see pruning.py)
seed = 0                    # torch seed (batch order) and k-means seed (random and kmeans++ inits)
resume = False              # continue a killed run from {out_dir}/{model}_quantization.resume.pt (same settings)
precision = "fp32"          # training arithmetic: auto | fp32 | bf16 (autocast); all else stays float32
device = "auto"             # auto (CUDA if available) | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

def ternary_layers(net, cfg):
    """{layer name: threshold t} of the layers TTQ makes ternary: every masked layer that the
    per-layer ttq_float leaves out ('first' / 'last' there name the first and last layer)."""
    names = [n for n, _ in masked_layers(net)]
    keep = {names[0] if k == "first" else names[-1] if k == "last" else k: v for k, v in cfg["ttq_float"].items()}
    keep = per_layer(net, keep, "ttq_float")
    thresholds = per_layer(net, cfg["ttq_threshold"], "ttq_threshold")
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
    check_model(cfg["model"])
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
    util.require(cfg["codebook_bits"] == 0 or 2 <= cfg["codebook_bits"] <= 23,
                 f"codebook_bits must be 0 (float32) or 2..23, got {cfg['codebook_bits']}")
    util.require(cfg["fold_bn"] or not cfg["bn_bits"], "bn_bits shares folded batch-norms: set --fold_bn=True")
    util.require(cfg["fold_bn"] or not cfg["bn_half"], "bn_half rounds folded batch-norms: set --fold_bn=True")
    util.require(not (cfg["bn_half"] and cfg["bn_bits"]), "bn_half and bn_bits both store the batch-norms: set one")
    util.require(cfg["bn_share"] in ("layer", "network"), f"unknown bn_share {cfg['bn_share']!r}; choose layer or network")
    util.require(cfg["max_drop"] >= 0, f"max_drop must be >= 0 points (0 = the bits setting), got {cfg['max_drop']}")
    util.require(not cfg["max_drop"] or cfg["method"] == "kmeans", "max_drop searches k-means bits: set --method=kmeans")
    util.require(cfg["finetune_epochs"] >= 0, f"finetune_epochs must be >= 0, got {cfg['finetune_epochs']}")
    util.require(cfg["lr"] > 0, f"lr must be positive, got {cfg['lr']}")
    training.check_settings(cfg)


def dense_teacher(cfg, stem, dev):
    """The dense network of stage 1, frozen, as the teacher of the quantized one (distill > 0,
    beyond the paper): its softened outputs carry more than the labels of what the
    full-precision weights knew. -> a Distillation, or None."""
    if not cfg["distill"]:
        return None
    dense = util.load_checkpoint(f"{stem}_initial.pt", "initial", dev,
                                 f"distill needs stage 1's dense network: run pruning.py --out_dir={cfg['out_dir']}")
    util.require(cfg["teacher"] == "dense" or dense.get("snapshots"),
                 f"teacher=snapshots: {stem}_initial.pt holds no snapshot (stage 1 ran without a warm restart): "
                 "set --teacher=dense")
    return training.Distillation(teacher_from(dense, cfg["teacher"]).to(dev), cfg["distill"], cfg["distill_temperature"])


SEARCH_BITS = range(2, 9)  # the automatic recipe's uniform start: the fewest of these within max_drop


def search_bits(net, cfg, val, floor, dev):
    """The automatic recipe's bits (max_drop > 0), chosen on validation without fine-tuning
    (which only recovers accuracy, so the choice errs wide): the fewest uniform bits of
    SEARCH_BITS whose clustered network's validation accuracy is at least `floor`, then layer by
    layer, the most non-zeros first, one bit fewer while it stays at least `floor`. Each trial
    evaluates `net` with its weights replaced by their k-means values (each layer clustered once
    per bit width). -> ({layer: bits}, [{bits, validation, within}] of every trial)"""
    layers = dict(masked_layers(net))
    pristine = {name: copy.deepcopy(m) for name, m in layers.items()}  # the trials overwrite the weights
    cache = {}

    def shared(name, b):  # the layer's weight with 2**b shared values, clustered as quantize_layer does
        if (name, b) not in cache:
            layer = copy.deepcopy(pristine[name])
            quantize_layer(layer, b, cfg["init"], cfg["seed"], layer_value(cfg["entropy_weight"], name,
                                                                           layer_kind(layer)))
            cache[name, b] = layer.weight.detach()
        return cache[name, b]

    trials = []

    def within(bits):
        with torch.no_grad():
            for name, m in layers.items():
                m.weight.copy_(shared(name, bits[name]))
        _, correct, total = training.evaluate(net, val)
        correct, total = util.all_sum([correct, total], dev)  # under torchrun every rank decides alike
        accuracy = training.percent(correct, total)
        trials.append(dict(bits=dict(bits), validation=accuracy, within=accuracy >= floor))
        return accuracy >= floor

    for b in SEARCH_BITS:
        bits = {name: b for name in layers}
        if within(bits):
            break
    print(f"search: {bits[next(iter(layers))]} bits everywhere -> validation {trials[-1]['validation']:.2f}% "
          f"(at least {floor:.2f}%: stage 1's dense less max_drop)", flush=True)
    for name in sorted(layers, key=lambda n: -int(layers[n].mask.sum())):
        while bits[name] > 1 and within({**bits, name: bits[name] - 1}):
            bits[name] -= 1
    with torch.no_grad():
        for name, m in layers.items():
            m.weight.copy_(pristine[name].weight)
    print(f"search: {len(trials)} trials; bits " + ", ".join(f"{n} {b}" for n, b in bits.items()), flush=True)
    return bits, trials


def kmeans(net, cfg, data, options, distill, report, progress, bits):
    """Steps 1-2 of section 3: weight sharing at `bits` ({layer: bits}), then fine-tuning the
    centroids. -> ({layer: {bits, clusters}}, the fine-tuning history)."""
    train, val = data
    # 1. k-means on each layer's surviving weights (section 3.1); with entropy_weight, then
    # traded for shorter codes (stage 3 entropy-codes the indices, so what a layer costs is
    # the entropy of its index stream, not its bits).
    quantized = quantize_model(net, bits, cfg["init"], cfg["seed"],
                               per_layer(net, cfg["entropy_weight"], "entropy_weight"))
    util.same_on_every_rank([t for _, m in masked_layers(net) for t in (m.codebook, m.index)], "the codebooks")
    report(f"After clustering ({cfg['init']} init)", "clustered")
    # 2. Fine-tune the centroids (section 3.3: a centroid's gradient is the sum of its weights').
    # Biases and batch-norm train too (batch-norm's running statistics follow the new weights)
    # and absorb part of the quantization error; indices and masks are buffers and do not move.
    history = training.fit(net, net.parameters(), train, val, cfg["finetune_epochs"], cfg["lr"], options,
                           label="finetune", distill=distill, progress=progress)
    report("After fine-tuning the centroids", "finetuned")
    return quantized, history


def ttq(net, cfg, data, options, distill, report, progress, bits=None):
    """Steps 1-2 by trained ternary quantization instead (Zhu et al. 2017, section 3): each
    chosen layer becomes {-wn, 0, wp}; the latent weights, the two scales per layer and
    everything left in float32 train together, the zeros moving as latent weights cross the
    threshold. Then each ternary layer is frozen into a quantized one: a 2-value codebook, the
    zeros in its mask. -> ({layer: {bits, clusters}}, the training history)."""
    train, val = data
    ternary = ternary_layers(net, cfg)
    for name, m in masked_layers(net):
        if name in ternary:
            to_ternary(m, ternary[name])
    report("Ternary (scales fitted, before training)", "clustered")
    history = training.fit(net, net.parameters(), train, val, cfg["finetune_epochs"], cfg["lr"], options,
                           label="ttq", distill=distill, progress=progress)
    quantized = {}
    for name, m in masked_layers(net):
        if name in ternary:
            ternary_to_quantized(m)
            quantized[name] = dict(bits=2, clusters=2)  # 3 levels: 2 bits a weight, dense
    util.same_on_every_rank([t for _, m in masked_layers(net) if hasattr(m, "index")
                             for t in (m.codebook, m.index, m.mask)], "the ternary layers")
    report("After training the ternary network", "finetuned")
    return quantized, history


def share_biases(net, cfg, quantized, bias_bits, report):
    """Step 3 (beyond the paper, which stores biases raw): a LeNet fc layer has a bias per
    output, a tenth of a 20 KB file; a few shared values per layer cost almost nothing in
    accuracy. Done after fine-tuning, which could undo it."""
    if not any(bias_bits.values()):
        return
    for name, m in masked_layers(net):
        if name in quantized and bias_bits[name] and m.bias is not None:
            quantized[name].update(bias_bits=bias_bits[name],
                                   bias_values=share_values(m.bias, bias_bits[name], cfg["init"], cfg["seed"]))
    report("After sharing the biases", "bias_shared")


def fold_norms(net, cfg, report):
    """Step 4 (beyond the paper, whose networks had none): at inference a batch-norm needs two
    of its four vectors (fold_batch_norm), and those can be shared like the biases, per
    vector or across the network (one table for every scale is stored once), or rounded to
    float16 (each value moves by at most 2**-11 of itself)."""
    norms = [bn for bn in net.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    if not (norms and cfg["fold_bn"]):
        return
    for bn in norms:
        fold_batch_norm(bn)
    if cfg["bn_bits"]:
        vectors = [bn.weight for bn in norms], [bn.bias for bn in norms]
        network = cfg["bn_share"] == "network"
        for group in vectors if network else [[v] for vs in vectors for v in vs]:
            share_values(group, cfg["bn_bits"], cfg["init"], cfg["seed"], relative=network)
    elif cfg["bn_half"]:
        for bn in norms:
            round_to_half(bn.weight, bn.bias)
    how = (f" ({cfg['bn_bits']}-bit, shared per {cfg['bn_share']})" if cfg["bn_bits"]
           else " (float16 values)" if cfg["bn_half"] else "")
    report("After folding the batch-norms" + how, "bn_folded")


def grid_tables(net, cfg, quantized, report):
    """Step 5 (beyond the paper, which stores its centroids as 32-bit floats): each layer's
    codebook, and its shared biases, rounded to a power-of-two grid on which its largest value
    takes codebook_bits bits (quantize.round_to_grid); stage 3 then stores a table as small
    integers. LeNet-5's 32-centroid convs spend 128 bytes a codebook on 178 and 1,444 weights;
    on an 8-bit grid about 40. Done last, so that what is evaluated is what the file holds."""
    if not cfg["codebook_bits"]:
        return
    for name, m in masked_layers(net):
        if name in quantized:
            round_to_grid(m.codebook, cfg["codebook_bits"])
            if "bias_values" in quantized[name]:  # (shared values closer than a step become one)
                round_to_grid(m.bias, cfg["codebook_bits"])
                quantized[name]["bias_values"] = len(m.bias.detach().unique())
    report(f"After rounding the tables to {cfg['codebook_bits']}-bit grids", "gridded")


def main(cfg):
    t_start = time.time()
    dev, precision = util.start_stage(cfg, check_settings, "fine-tuning")
    stem = os.path.join(cfg["out_dir"], file_stem(cfg["model"]))
    progress = training.Progress(stem + "_quantization.resume.pt", cfg, cfg["resume"])
    if progress.resumed:
        print(f"resuming from {progress.path}: {progress.where()}")
    pruned = util.load_checkpoint(f"{stem}_{cfg['source']}.pt", cfg["source"], dev,
                                  f"run pruning.py --model={cfg['model']} --out_dir={cfg['out_dir']} first")
    net = build_model(pruned["model"]["name"], **pruned["model"]["kwargs"]).to(dev)
    net.load_state_dict(pruned["state_dict"])
    distill = dense_teacher(cfg, stem, dev)
    per_layer(net, cfg["bits"], "bits")  # a layer without a value is an error before any work
    if cfg["method"] == "ttq":
        ternary_layers(net, cfg)
    bias_bits = per_layer(net, cfg["bias_bits"], "bias_bits")
    p = pruned["settings"]  # stage 1's data, so that the accuracies compare with its own
    train, val, test = load_data(DataSpec.from_settings(p, data_root=cfg["data_root"], seed=cfg["seed"]), dev)
    print(f"data: {p['dataset']} train {len(train.y)}, validation {len(val.y)}, test {len(test.y)}")
    report = training.Report(net, val, test)
    start = "retrained" if cfg["source"] == "pruned" else "dense"
    report("Pruned and retrained (stage 1)" if start == "retrained" else "Dense (stage 1)", start)

    # 0. Whole units that compute nothing (beyond the paper): element-wise pruning leaves neurons
    # whose outputs nothing reads and neurons without inputs, whose weights still cost bytes.
    try:
        dead = drop_dead_units(net) if cfg["drop_dead"] else None
    except ValueError as e:
        raise util.UserError(str(e)) from None
    if dead is not None:
        print(f"dead units: {dead['unread']} unread, {dead['constant']} constant (folded into the next bias): "
              f"{dead['weights']} weights pruned, {dead['biases']} biases of idle units zeroed, the same function")
    elif cfg["drop_dead"]:
        print(f"dead units: not looked for ({cfg['model']} declares no chain of layers, as models.py's networks do)")
    zeros = {name: m.weight.detach() == 0 for name, m in masked_layers(net)}  # what stays 0 from here on
    # 1-2. Weight sharing and fine-tuning (or TTQ); 3-4. biases and batch-norm shared.
    options = training.TrainOptions(precision=precision)
    steps = kmeans if cfg["method"] == "kmeans" else ttq
    search, bits = None, per_layer(net, cfg["bits"], "bits")
    if cfg["max_drop"]:  # the automatic recipe: bits chosen on validation against stage 1's dense network
        dense = pruned["metrics"]["validation"].get("dense")
        util.require(dense is not None, f"max_drop: {stem}_{cfg['source']}.pt records no dense validation accuracy")
        bits, trials = search_bits(net, cfg, val, dense - cfg["max_drop"], dev)
        search = dict(floor=dense - cfg["max_drop"], dense=dense, bits=bits, trials=trials)
    quantized, history = steps(net, cfg, (train, val), options, distill, report, progress, bits)
    share_biases(net, cfg, quantized, bias_bits, report)
    fold_norms(net, cfg, report)
    grid_tables(net, cfg, quantized, report)
    accuracy, validation = report.accuracy, report.validation
    accuracy["quantized"] = accuracy[list(accuracy)[-1]]  # what the checkpoint computes
    validation["quantized"] = validation[list(validation)[-1]]

    if search:  # what the file will hold, on validation, against the accuracy the user gave up
        search["within"] = validation["quantized"] >= search["floor"]
        print(f"automatic recipe: validation {validation['quantized']:.2f}% against the dense {search['dense']:.2f}% "
              f"({validation['quantized'] - search['dense']:+.2f} points; max_drop {cfg['max_drop']}): "
              + ("within" if search["within"] else "NOT within: raise max_drop, or retrain longer"))
    rows = layer_rows(net, quantized, zeros)
    print(quant_table(rows))
    names = dict(clustered="ternary" if cfg["method"] == "ttq" else "after clustering",
                 finetuned="after fine-tuning", bias_shared="biases shared", bn_folded="batch-norm folded",
                 gridded="on grids")
    print(f"Accuracy: {start} {accuracy[start]:.2f}% | "
          + " | ".join(f"{names[k]} {accuracy[k]:.2f}%" for k in names if k in accuracy)
          + f" ({accuracy['quantized'] - accuracy[start]:+.2f} points)")
    settings = {**training.recorded(cfg), "pruning": p}
    summary = dict(
        model=cfg["model"], dataset=p["dataset"], stage="quantized", accuracy=accuracy, validation=validation,
        layers=rows, dead_units=dead, history=dict(finetune=history), search=search, settings=settings, device=str(dev),
        precision=precision, seconds=round(time.time() - t_start, 1))
    util.save_checkpoint(stem + "_quantized.pt", "quantized", net, pruned["model"], settings,
                         {**summary, "pruning": pruned["metrics"]}, quantized=quantized)
    util.write_json(stem + "_quantized.json", summary)
    progress.close()
    print(f"saved {stem}_quantized.pt and {stem}_quantized.json ({summary['seconds']} s)")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS, stage="quantization")
