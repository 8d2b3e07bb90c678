"""Stage 1 of Deep Compression (Han, Mao & Dally 2016, section 2; Han et al. 2015):
train a network, prune its small-magnitude connections, retrain the survivors.

    python pruning.py                                   # LeNet-300-100, config/lenet_300_100.py
    python pruning.py --model=lenet5_caffe              # that model's recipe, config/lenet5_caffe.py
    python pruning.py config/lenet5_caffe_iterative.py --data_root=../shared/data

Settings: the defaults below (equal to config/lenet_300_100.py), then the recipe (the file given
first, else config/<model>.py when there is one), then --key=value overrides. What each does,
with its paper and section: docs/method.md.

Writes {out_dir}/{model}_initial.pt (dense, trained), {out_dir}/{model}_pruned.pt (pruned and
retrained, the input of quantization.py) and {out_dir}/{model}_pruned.json.
"""
import functools
import math
import os
import time

import training
import util
from datasets import AUGMENTS, DATASETS, DataSpec, data_shape, folder_classes, imagenet_folders, load_data
from models import PRETRAINED, build_model, check_model, file_stem, model_kind, recorded_name, teacher_from, unmaskable
from prune import (GRANULARITIES, LOG_ALPHA_RANGE, PRUNE_METHODS, GradualSurgery, VariationalDropout, erk_densities,
                   finish_surgery, group_lasso_penalty, masked_layers, per_layer, prune_by_percentile, surgery_step)

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # a network of models.MODELS, torchvision.<builder>, path/to/file.py:factory or
                            # package.module:factory (docs/method.md#your-own-network)
model_args = {}             # torchvision and factory networks: keywords of the builder, e.g. {'width_mult': 0.5}
dataset = "mnist"           # mnist | fashion_mnist | cifar10 | cifar100 | svhn | imagenet | folder (yours:
                            # data_root/{train,test}/<class>/<images>, see datasets.py)
data_root = "data"          # folder holding the data set (MNIST/raw, CIFAR10/, ...); downloaded into if absent
out_dir = "out"             # checkpoints and JSON summaries go here
pretrained = False          # resnet18, alexnet, vgg16, torchvision.<builder>: start from torchvision's weights
cifar_stem = False          # resnet18: 3x3 stride-1 first conv, no max-pool (32x32 inputs)
batch_size = 128            # training minibatch
test_batch_size = 1000      # evaluation minibatch
val_split = 0.1             # fraction of the training set held out: settings are chosen on it
augment = "shift"           # none | shift (up to 2 px) | crop_flip | auto (cifar10 crop_flip, mnist none)
subset = 0                  # use only this many train and test images (0 = all); for quick runs
image_size = 224            # imagenet, folder: the size the networks see (folder: resized and centre-cropped)
workers = 4                 # imagenet, a folder too large for memory: DataLoader processes decoding images
init_from = ""              # a {model}_initial.pt to prune instead of training anew ('' = train)
epochs = 20                 # dense training epochs
lr = 0.05                   # dense training learning rate
restart_epochs = 0          # then a warm restart (SGDR) of this many epochs from restart_lr (0 = none)
restart_lr = 0.05           # the warm restart's learning rate
retrain_epochs = 30         # retraining epochs after each pruning step
retrain_lr = 0.01           # retraining learning rate
distill = 0.0               # retraining: weight of the teacher's softened outputs in the loss (0 = labels only)
distill_temperature = 4.0   # softmax temperature of that term
teacher = "dense"           # distill's teacher: dense | snapshots (with the networks before each warm restart)
group_lasso = {"*": 0.0}    # per layer: group-lasso strength on whole units while retraining (0 = off)
weight_decay = 5e-4         # L2 penalty in dense training
retrain_weight_decay = 5e-4 # L2 penalty while the pruned network retrains
optimizer = "sgd"           # adam | sgd (momentum 0.9, Nesterov)
schedule = "cosine"         # learning-rate schedule within each phase: cosine | constant
prune_method = "dns"        # std | percentile | global | dns (dynamic network surgery) | vd (variational dropout)
prune_layers = "all"        # all | fc | conv: the layers pruned
sensitivity = {"*": 2.8, "fc3": 1.4}  # per layer, std and dns: threshold = sensitivity x std of the weights
percent = {"*": 90.0}       # per layer, percentile and global: percent of surviving weights pruned
prune_iterations = 1        # prune -> retrain cycles
dns_band = 0.1              # dns: weights within +-band x threshold keep their mask state
dns_threshold = "fixed"     # dns: fixed | scaled (with the weights' std) | density (held per layer)
dns_ramp = 0.0              # dns, density: fraction of retraining over which the density falls to its target
erk_alive = 0.0             # dns, density: > 0 holds the Erdos-Renyi-kernel densities, this fraction alive
granularity = {"*": "weight"}  # per layer, std, percentile, dns: what pruning and surgery keep or prune whole:
                            # weight | kernel (a conv's kh x kw kernel per filter and input channel, Mao et al. 2017)
                            # | a number as a string, fc layers: the inputs in runs of n (one channel's h x w map
                            # after a conv: --granularity="{'fc1': '16', '*': 'weight'}")
vd_epochs = 30              # vd: epochs of variational training (Adam) that learn the masks; retraining follows
vd_lr = 1e-3                # vd: its learning rate
vd_sigma_lr = 0.0           # vd: learning rate of the log variances (0 = vd_lr); higher prunes in fewer epochs
vd_beta = 1.0               # vd: weight of the KL term (1 = the evidence lower bound; more = sparser)
vd_threshold = 3.0          # vd: at the end, prune the weights whose log alpha (noise / signal) is at or above this
vd_ramp = 0.1               # vd: fraction of vd_epochs over which the KL term's weight rises from 0
max_drop = 0.0              # > 0: the automatic recipe: erk_alive searched on validation, the sparsest whose network
                            # stays within max_drop / 2 points of dense (quantization.py spends the other half)
search_probes = 4           # max_drop: densities tried, each retrained retrain_epochs / search_probes epochs
seed = 0                    # torch seed (weights, batch order)
resume = False              # continue a killed run from {out_dir}/{model}_pruning.resume.pt (same settings)
precision = "fp32"          # training arithmetic: auto | fp32 | bf16 (autocast); all else stays float32
device = "auto"             # auto (CUDA if available) | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


METHODS = (*PRUNE_METHODS, "vd")  # vd: a VariationalDropout, which learns the masks while it trains


def check_settings(cfg):
    """Reject bad settings before any work, each with one line that names the fix."""
    kind = check_model(cfg["model"])
    util.require(kind != "registered" or not cfg["model_args"],
                 f"model_args applies to torchvision.<builder> and factory networks, not {cfg['model']}")
    util.require(cfg["dataset"] in DATASETS, f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(DATASETS)}")
    util.require(cfg["prune_method"] in METHODS,
                 f"unknown prune_method {cfg['prune_method']!r}; choose one of {', '.join(METHODS)}")
    util.require(cfg["prune_layers"] in ("all", "fc", "conv"),
                 f"unknown prune_layers {cfg['prune_layers']!r}; choose all, fc or conv")
    util.require(all(v >= 0 for v in cfg["sensitivity"].values()),
                 f"sensitivity must be >= 0, got {cfg['sensitivity']}")
    util.require(all(0 <= v <= 100 for v in cfg["percent"].values()),
                 f"percent must be in 0..100, got {cfg['percent']}")
    util.require(cfg["prune_method"] != "global" or set(cfg["percent"]) == {"*"},
                 "prune_method=global uses one percent for all layers: give --percent=<number>")
    for key in ("epochs", "restart_epochs", "retrain_epochs", "prune_iterations", "batch_size", "test_batch_size",
                "image_size", "workers"):
        util.require(cfg[key] >= (1 if "batch" in key or key == "image_size" else 0),
                     f"{key} must be positive, got {cfg[key]}")
    util.require(cfg["model"] in PRETRAINED or kind == "torchvision" or not cfg["pretrained"],
                 f"pretrained applies to {', '.join(PRETRAINED)} and torchvision.<builder> only")
    util.require(cfg["model"] == "resnet18" or not cfg["cifar_stem"], "cifar_stem applies to resnet18 only")
    util.require(cfg["augment"] in ("auto",) + AUGMENTS,
                 f"unknown augment {cfg['augment']!r}; choose auto, {', '.join(AUGMENTS)}")
    util.require(all(v >= 0 for v in cfg["group_lasso"].values()),
                 f"group_lasso must be >= 0 (0 = off), got {cfg['group_lasso']}")
    util.require(cfg["weight_decay"] >= 0 and cfg["retrain_weight_decay"] >= 0,
                 f"weight decay must be >= 0, got {cfg['weight_decay']} and {cfg['retrain_weight_decay']}")
    util.require(0 <= cfg["dns_band"] < 1, f"dns_band must be in [0, 1), got {cfg['dns_band']}")
    training.check_settings(cfg)
    util.require(cfg["teacher"] == "dense" or cfg["restart_epochs"] or cfg["init_from"],
                 "teacher=snapshots needs a warm restart to keep a snapshot before: set --restart_epochs, or "
                 "--init_from a {model}_initial.pt trained with one")
    util.require(0 <= cfg["erk_alive"] <= 1, f"erk_alive must be in [0, 1] (0 = off), got {cfg['erk_alive']}")
    util.require(not cfg["erk_alive"] or (cfg["prune_method"] == "dns" and cfg["dns_threshold"] == "density"
                                          and cfg["prune_iterations"] == 1),
                 "erk_alive sets the densities that surgery holds: set --prune_method=dns --dns_threshold=density "
                 "(one iteration)")
    util.require(all(g in GRANULARITIES or (g.isdigit() and int(g) > 0) for g in cfg["granularity"].values()),
                 f"unknown granularity in {cfg['granularity']}; choose {', '.join(GRANULARITIES)} or a number of an "
                 "fc layer's inputs ('16')")
    util.require(set(cfg["granularity"].values()) == {"weight"}
                 or cfg["prune_method"] in ("std", "percentile", "dns") or cfg["max_drop"],
                 f"granularity other than weight applies to prune_method std, percentile or dns, not "
                 f"{cfg['prune_method']} (global pools single weights; vd learns each weight's noise)")
    util.require(0 <= cfg["dns_ramp"] <= 1, f"dns_ramp must be in [0, 1], got {cfg['dns_ramp']}")
    util.require(cfg["max_drop"] >= 0, f"max_drop must be >= 0 points (0 = the recipe's densities), got {cfg['max_drop']}")
    util.require(not cfg["max_drop"] or (not cfg["erk_alive"] and cfg["prune_iterations"] == 1),
                 "max_drop searches erk_alive itself: leave erk_alive at 0 and prune_iterations at 1")
    if cfg["prune_method"] == "vd":
        util.require(cfg["prune_iterations"] == 1 and not cfg["erk_alive"] and not cfg["max_drop"],
                     "prune_method=vd chooses each layer's density itself: leave prune_iterations at 1 and erk_alive "
                     "and max_drop at 0")
        util.require(cfg["vd_beta"] > 0, f"vd_beta must be > 0, got {cfg['vd_beta']}")
        util.require(0 <= cfg["vd_ramp"] <= 1, f"vd_ramp must be in [0, 1], got {cfg['vd_ramp']}")
        util.require(cfg["vd_epochs"] >= 1, f"vd_epochs must be at least 1, got {cfg['vd_epochs']}")
        lo, hi = LOG_ALPHA_RANGE
        util.require(lo < cfg["vd_threshold"] < hi, f"vd_threshold must be inside log alpha's range ({lo:g}, {hi:g}), "
                     f"where it can prune some weights and keep others, got {cfg['vd_threshold']}")
        util.require(cfg["vd_lr"] > 0, f"vd_lr must be > 0, got {cfg['vd_lr']}")
        util.require(cfg["vd_sigma_lr"] >= 0, f"vd_sigma_lr must be >= 0 (0 = vd_lr), got {cfg['vd_sigma_lr']}")
    util.require(cfg["search_probes"] >= 1, f"search_probes must be >= 1, got {cfg['search_probes']}")
    util.require(cfg["dns_ramp"] == 0 or cfg["dns_threshold"] == "density",
                 f"dns_ramp ramps the held density: set --dns_threshold=density (got {cfg['dns_threshold']})")
    util.require(cfg["dns_threshold"] in ("fixed", "scaled", "density"),
                 f"unknown dns_threshold {cfg['dns_threshold']!r}; choose fixed, scaled or density")
    if cfg["dataset"] == "imagenet":  # before a pretrained network downloads
        imagenet_folders(cfg["data_root"])
    if cfg["dataset"] == "folder":
        folder_classes(cfg["data_root"])
    util.require(not cfg["init_from"] or os.path.isfile(cfg["init_from"]),
                 f"no checkpoint at {cfg['init_from']}: give init_from a {{model}}_initial.pt written by pruning.py")
    util.require(not (cfg["init_from"] and cfg["restart_epochs"]) or os.path.abspath(cfg["init_from"])
                 != os.path.abspath(os.path.join(cfg["out_dir"], file_stem(cfg["model"]) + "_initial.pt")),
                 "restart_epochs with init_from writes a new {model}_initial.pt: give an out_dir other than "
                 "init_from's folder (a stage never overwrites its input)")


def network(cfg, dev):
    """The model the settings name, its last layer fitted to the data set's classes, and the
    {'name', 'kwargs'} that rebuild it (without a pretrained download)."""
    in_shape, classes = data_shape(DataSpec.from_settings(cfg))
    kwargs = dict(in_shape=list(in_shape), num_classes=classes)
    kind = model_kind(cfg["model"])
    if cfg["model"] in PRETRAINED or kind == "torchvision":
        kwargs.update(pretrained=cfg["pretrained"])
    if kind != "registered":
        kwargs.update(model_args=cfg["model_args"])
    if cfg["model"] == "resnet18":
        kwargs.update(cifar_stem=cfg["cifar_stem"])
    try:
        net = build_model(cfg["model"], **kwargs).to(dev)
    except (RuntimeError, ValueError, TypeError) as e:  # a download that failed, a factory's bad arguments
        raise util.UserError(f"cannot build {cfg['model']}: {e}") from None
    for name, cls in unmaskable(net):
        print(f"{name} ({cls}) stays dense: the stages mask nn.Linear and nn.Conv2d only")
    arch = dict(name=recorded_name(cfg["model"]), kwargs={**kwargs, "pretrained": False} if "pretrained" in kwargs else kwargs)
    for key in ("sensitivity", "percent"):  # every pruned layer needs a value ('*' is the default)
        per_layer(net, cfg[key], key, cfg["prune_layers"])
    layers = dict(net.named_modules())
    for name, g in per_layer(net, cfg["granularity"], "granularity", cfg["prune_layers"]).items():
        shape = tuple(layers[name].weight.shape)
        util.require(not g.isdigit() or (len(shape) == 2 and shape[1] % int(g) == 0),
                     f"granularity {g!r} of layer {name} {shape}: a number groups an fc layer's inputs in runs and "
                     "must divide them")
    return net, arch


def dense_network(net, cfg, arch, train, val, options, history, progress, dev):
    """Step 1 (Han 2015 section 3: learn which connections matter): train `net` dense, or load
    the one init_from names, then run the warm restart if set. -> (what the dense training
    cost, the snapshots kept before each warm restart)."""
    if cfg["init_from"]:
        initial = util.load_checkpoint(cfg["init_from"], "initial", dev,
                                       "give init_from a {model}_initial.pt written by pruning.py")
        util.require(initial["model"] == arch,
                     f"{cfg['init_from']} holds {initial['model']}, not the {arch} these settings build")
        net.load_state_dict(initial["state_dict"])
        snapshots = initial.get("snapshots", [])
        util.require(cfg["teacher"] == "dense" or snapshots or cfg["restart_epochs"],
                     f"teacher=snapshots: {cfg['init_from']} holds no snapshot (it was trained without a warm "
                     "restart): set --restart_epochs, or --teacher=dense")
        print(f"dense network from {cfg['init_from']}" + (f" and {len(snapshots)} snapshot(s)" if snapshots else ""))
        dense = initial["metrics"].get("dense")  # what training it cost, for the results table
    else:
        t0 = time.time()
        history["train"] = training.fit(net, net.parameters(), train, val, cfg["epochs"], cfg["lr"], options,
                                        label="train", progress=progress)
        dense = dict(epochs=cfg["epochs"], seconds=round(time.time() - t0, 1), precision=options.precision)
        snapshots = []
    if cfg["restart_epochs"]:
        # The end of each cycle is a network of its own; kept, it can teach beside the last one.
        snapshots = snapshots + [{k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}]
        # A warm restart: the learning rate jumps back up and anneals again, which leaves the first
        # cycle's minimum for a better one (SGDR, section 3); the dense cost adds up both cycles.
        t0, before = time.time(), dense or {}
        history["restart"] = training.fit(net, net.parameters(), train, val, cfg["restart_epochs"], cfg["restart_lr"],
                                          options, label="restart", progress=progress)
        dense = dict(epochs=before.get("epochs", 0) + cfg["restart_epochs"],
                     seconds=round(before.get("seconds", 0) + time.time() - t0, 1),
                     precision=options.precision, restart_epochs=cfg["restart_epochs"])
    return dense, snapshots


def retraining_terms(net, cfg, arch, snapshots, dev):
    """What retraining adds to the loss -> (Distillation or None, penalty or None). The dense
    network, frozen, teaches the pruned one (distill > 0; with teacher=snapshots, beside the
    networks at the ends of its earlier cosine cycles, logits averaged): its softened outputs
    carry more of what the pruned weights knew than the labels alone. The group lasso
    (group_lasso > 0, Wen et al. 2016) pulls the weakest units' survivors under the threshold
    together, so that surgery takes those units whole."""
    distill = None
    if cfg["distill"]:
        teacher = teacher_from(dict(model=arch, state_dict=net.state_dict(), snapshots=snapshots),
                               cfg["teacher"]).to(dev)
        distill = training.Distillation(teacher, cfg["distill"], cfg["distill_temperature"])
    strengths = per_layer(net, cfg["group_lasso"], "group_lasso")
    return distill, group_lasso_penalty(net, strengths) if any(strengths.values()) else None


def prune(net, cfg):
    """One pruning step with the configured rule, or at the Erdos-Renyi-kernel densities
    (Evci et al. 2020) that surgery then holds. Returns {layer name: threshold}."""
    if cfg["erk_alive"]:
        erk = erk_densities(net, cfg["erk_alive"], cfg["prune_layers"])
        return prune_by_percentile(net, {n: 100 * (1 - d) for n, d in erk.items()}, cfg["prune_layers"], surgery=True,
                                   granularity=cfg["granularity"])
    if cfg["prune_method"] == "global":  # one percentile of single weights pooled across layers
        return PRUNE_METHODS["global"](net, cfg["percent"]["*"], cfg["prune_layers"])
    amount = cfg["sensitivity"] if cfg["prune_method"] in ("std", "dns") else cfg["percent"]
    return PRUNE_METHODS[cfg["prune_method"]](net, amount, cfg["prune_layers"], granularity=cfg["granularity"])


def variational_dropout(net, cfg, train, val, precision, distill, penalty, progress):
    """Prune by sparse variational dropout (Molchanov et al. 2017): vd_epochs of training in
    which each weight of the pruned layers is a Gaussian with a learned variance, under the KL
    term that pulls the variances of the weights the data do not need up; those whose log alpha
    ends at or above vd_threshold are pruned, and retraining follows with the masks fixed. The log
    variances move by about the learning rate per step whatever their gradient's scale (Adam, as
    the paper), so the epochs a weight needs to cross the threshold from VD_INIT_LOG_SIGMA2 go as
    1 / rate: vd_sigma_lr gives the log variances their own rate, apart from the weights'. No
    weight decay (the KL is the weights' prior). Returns the phase's history."""
    vd = VariationalDropout(masked_layers(net, cfg["prune_layers"]), cfg["vd_threshold"], cfg["vd_beta"],
                            len(train.y), round(cfg["vd_ramp"] * cfg["vd_epochs"] * len(train)))
    print(f"Variational dropout on {len(vd.layers)} layers for {cfg['vd_epochs']} epochs: KL weight {cfg['vd_beta']}, "
          f"prune at log alpha >= {cfg['vd_threshold']}")
    options = training.TrainOptions("adam", cfg["schedule"], 0.0, precision)
    kl = vd.penalty if penalty is None else lambda: penalty() + vd.penalty()
    sigmas = [m.log_sigma2 for _, m in vd.layers]
    ids = {id(p) for p in sigmas}
    groups = [{"params": [p for p in net.parameters() if id(p) not in ids]},
              {"params": sigmas, "lr": cfg["vd_sigma_lr"] or cfg["vd_lr"]}]
    history = training.fit(net, groups, train, val, cfg["vd_epochs"], cfg["vd_lr"], options, label="vd",
                           after_step=vd, distill=distill, penalty=kl, progress=progress)
    vd.finish()
    return history


def surgery(net, cfg, thresholds, steps_per_epoch):
    """Dynamic network surgery's mask update after every retraining step (Guo et al. 2016), or
    None for the other rules, whose masks stay fixed while the survivors retrain."""
    if cfg["prune_method"] != "dns":
        return None
    granularity = per_layer(net, cfg["granularity"], "granularity", cfg["prune_layers"])  # resolved once, not a step
    if cfg["dns_threshold"] == "density":  # held at what pruning left, reached over dns_ramp of the steps
        held = {name: float(m.mask.mean()) for name, m in masked_layers(net, cfg["prune_layers"])}
        return GradualSurgery(net, thresholds, cfg["dns_band"], held,
                               round(cfg["dns_ramp"] * cfg["retrain_epochs"] * steps_per_epoch), granularity)
    scaled = per_layer(net, cfg["sensitivity"], "sensitivity", cfg["prune_layers"]) \
        if cfg["dns_threshold"] == "scaled" else None
    return functools.partial(surgery_step, net, thresholds, cfg["dns_band"], scaled, granularity=granularity)


SEARCH_RANGE = (0.01, 1.0)  # the automatic recipe's bracket of erk_alive (1.0: dense, always within)


def search_alive(net, cfg, train, val, options, distill, penalty, progress, dev):
    """The automatic recipe's densities (max_drop > 0): the fewest weights alive, as the fraction
    `alive` of the Erdos-Renyi-kernel allocation (Evci et al. 2020), whose network, pruned there
    and retrained briefly with density-held surgery, keeps its validation accuracy within
    max_drop / 2 points of the dense network's (stage 2 spends the other half). Bisection on
    log(alive) within SEARCH_RANGE, search_probes probes of retrain_epochs / search_probes epochs:
    the search costs about one retraining. A short retraining recovers less than the full one
    after it, so the choice errs dense. Each probe starts from the dense network, which `net`
    holds again at the end. -> {'alive', 'target', 'dense', 'probes': [{alive, validation,
    epochs, within}]}"""
    dense_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    _, correct, total = training.evaluate(net, val)
    correct, total = util.all_sum([correct, total], dev)  # under torchrun every rank takes the same branch
    dense = training.percent(correct, total)
    target, (lo, hi) = dense - cfg["max_drop"] / 2, SEARCH_RANGE
    epochs = max(1, round(cfg["retrain_epochs"] / cfg["search_probes"]))
    probe_cfg = {**cfg, "prune_method": "dns", "dns_threshold": "density", "dns_ramp": 0.0}
    probes = []
    for i in range(1, cfg["search_probes"] + 1):
        alive = math.sqrt(lo * hi)
        thresholds = prune(net, {**probe_cfg, "erk_alive": alive})
        training.fit(net, net.parameters(), train, val, epochs, cfg["retrain_lr"], options, label=f"probe{i}",
                     after_step=surgery(net, probe_cfg, thresholds, len(train)), distill=distill, penalty=penalty,
                     progress=progress)
        finish_surgery(net)
        _, correct, total = training.evaluate(net, val)
        correct, total = util.all_sum([correct, total], dev)
        accuracy = training.percent(correct, total)
        probes.append(dict(alive=alive, validation=accuracy, epochs=epochs, within=accuracy >= target))
        print(f"search {i}/{cfg['search_probes']}: {100 * alive:6.2f}% alive -> validation {accuracy:.2f}% "
              f"({'within' if accuracy >= target else 'below'} {target:.2f}%: dense {dense:.2f}% less "
              f"max_drop / 2)", flush=True)
        lo, hi = (lo, alive) if accuracy >= target else (alive, hi)
        net.load_state_dict(dense_state)
    print(f"search: {100 * hi:.2f}% alive, the sparsest within" if hi < 1 else
          "search: no density tried stayed within: the network stays dense")
    return dict(alive=hi, target=target, dense=dense, probes=probes)


def main(cfg):
    t_start = time.time()
    dev, precision = util.start_stage(cfg, check_settings, "training")
    stem, settings = os.path.join(cfg["out_dir"], file_stem(cfg["model"])), training.recorded(cfg)
    progress = training.Progress(stem + "_pruning.resume.pt", cfg, cfg["resume"])
    if progress.resumed:
        print(f"resuming from {progress.path}: {progress.where()}")
    net, arch = network(cfg, dev)
    train, val, test = load_data(DataSpec.from_settings(cfg), dev)
    print(f"data: {cfg['dataset']} train {len(train.y)}, validation {len(val.y)}, test {len(test.y)}")
    options = training.TrainOptions(cfg["optimizer"], cfg["schedule"], cfg["weight_decay"], precision)
    report, history = training.Report(net, val, test, table=True), {}

    # 1. Train the dense network, or take one trained before: pruning recipes then share it.
    dense, snapshots = dense_network(net, cfg, arch, train, val, options, history, progress, dev)
    report("Before pruning", "dense")
    # Every run folder holds its dense network (stage 2 can start from it: source=initial),
    # unless that file is the one it was read from.
    if not cfg["init_from"] or os.path.realpath(cfg["init_from"]) != os.path.realpath(stem + "_initial.pt"):
        util.save_checkpoint(stem + "_initial.pt", "initial", net, arch, settings,
                             dict(accuracy=dict(report.accuracy), validation=dict(report.validation), dense=dense),
                             **({"snapshots": snapshots} if snapshots else {}))

    # 2-3. Prune the small weights, then retrain the survivors; iterating with the threshold
    # recomputed on the survivors prunes further each cycle (section 3.3). Dynamic network
    # surgery instead re-evaluates the masks after every step of retraining.
    distill, penalty = retraining_terms(net, cfg, arch, snapshots, dev)
    retrain_options = training.TrainOptions(cfg["optimizer"], cfg["schedule"], cfg["retrain_weight_decay"], precision)
    # The automatic recipe first finds the densities on validation, then prunes there as a recipe would.
    search = search_alive(net, cfg, train, val, retrain_options, distill, penalty, progress, dev) \
        if cfg["max_drop"] else None
    if search:
        cfg = {**cfg, "erk_alive": search["alive"], "prune_method": "dns", "dns_threshold": "density"}
    for it in range(1, cfg["prune_iterations"] + 1):
        if cfg["prune_method"] == "vd":
            history["vd"] = variational_dropout(net, cfg, train, val, precision, distill, penalty, progress)
            thresholds = {}
        else:
            thresholds = prune(net, cfg)
        for name, t in thresholds.items():
            print(f"Pruning with threshold : {t} for layer {name}")
        report("After pruning" + (f" (iteration {it})" if cfg["prune_iterations"] > 1 else ""), "pruned")
        after_step = surgery(net, cfg, thresholds, len(train))
        history[f"retrain{it}"] = training.fit(net, net.parameters(), train, val, cfg["retrain_epochs"],
                                               cfg["retrain_lr"], retrain_options, label=f"retrain{it}",
                                               after_step=after_step, distill=distill, penalty=penalty,
                                               progress=progress)
        if after_step:
            finish_surgery(net)
        util.same_on_every_rank([m.mask for _, m in masked_layers(net)], "the pruning masks")  # under torchrun
        report("After Retraining", "retrained")

    stats = util.layer_stats(net)
    masked = {n + ".weight" for n, _ in masked_layers(net)}
    summary = dict(
        model=cfg["model"], dataset=cfg["dataset"], stage="pruned", accuracy=report.accuracy,
        validation=report.validation, dense=dense,
        params=dict(total=sum(s["total"] for s in stats), nonzero=sum(s["nonzero"] for s in stats)),
        layers=[{**s, "masked": s["name"] in masked} for s in stats],
        history=history, search=search, settings=settings, device=str(dev), precision=precision,
        seconds=round(time.time() - t_start, 1))
    util.save_checkpoint(stem + "_pruned.pt", "pruned", net, arch, settings, summary)
    util.write_json(stem + "_pruned.json", summary)
    progress.close()
    print(f"saved {stem}_pruned.pt and {stem}_pruned.json ({summary['seconds']} s)")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS, stage="pruning")
