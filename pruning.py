"""Stage 1 of Deep Compression (Han, Mao & Dally 2016, section 2; Han et al. 2015):
train a network, prune its small-magnitude connections, retrain the survivors.

    python pruning.py                                   # LeNet-300-100, config/lenet_300_100.py
    python pruning.py --model=lenet5_caffe              # that model's recipe, config/lenet5_caffe.py
    python pruning.py config/lenet5_caffe_iterative.py --data_root=../shared/data

Settings: the defaults below (equal to config/lenet_300_100.py), then the recipe (the file given
first, else config/<model>.py when there is one), then --key=value overrides.

Writes {out_dir}/{model}_initial.pt (dense, trained), {out_dir}/{model}_pruned.pt (pruned and
retrained, the input of quantization.py) and {out_dir}/{model}_pruned.json.
"""
import functools
import os
import time

import util
from models import MODELS, PRETRAINED, build_model, teacher_from
from prune import (PRUNE_METHODS, erk_densities, finish_surgery, gradual_surgery, group_lasso_penalty, masked_layers,
                   prune_by_percentile, surgery_step)

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # lenet_300_100 | lenet5 | lenet5_caffe | resnet20 | resnet56 | resnet18 | alexnet | vgg16
dataset = "mnist"           # mnist | cifar10 | imagenet (data_root/imagenet/{train,val}/<class>/*.JPEG)
data_root = "data"          # folder holding MNIST/raw or CIFAR10/{train,test}; downloaded into if absent
out_dir = "out"             # checkpoints and JSON summaries go here
pretrained = False          # resnet18, alexnet, vgg16: start from torchvision's ImageNet weights
cifar_stem = False          # resnet18: 3x3 stride-1 first conv, no max-pool (32x32 inputs)
batch_size = 128            # training minibatch
test_batch_size = 1000      # evaluation minibatch
val_split = 0.1             # fraction of the training set held out for per-epoch validation
augment = "shift"           # training images: none | shift (up to 2 px) | crop_flip | auto (cifar10 crop_flip,
                            # mnist none); stage 2 fine-tunes with the same
subset = 0                  # use only this many train and test images (0 = all); for quick runs
image_size = 224            # imagenet: the crop the networks see (RandomResizedCrop in training, resize + centre
                            # crop in evaluation)
workers = 4                 # imagenet: DataLoader processes decoding JPEGs (the other data sets sit in memory)
init_from = ""              # a {model}_initial.pt to prune instead of training anew ('' = train; epochs unused)
epochs = 20                 # dense training epochs
lr = 0.05                   # dense training learning rate
restart_epochs = 0          # then a second cosine cycle of this many epochs from restart_lr (a warm restart,
restart_lr = 0.05           # SGDR, Loshchilov & Hutter 2017); with init_from, continues that network (0 = none)
retrain_epochs = 30         # retraining epochs after each pruning step
retrain_lr = 0.01           # Han 2015 retrains at 1/10 of the training rate (surgery splices better at 1/5)
distill = 0.0               # retraining: weight of the dense network's softened outputs in the loss (knowledge
                            # distillation, Hinton et al. 2015; 0 = cross-entropy only, as the paper)
distill_temperature = 4.0   # softmax temperature of that term
teacher = "dense"           # distill's teacher: dense (the network pruned) | snapshots (it and the snapshots kept
                            # before its warm restarts, logits averaged: a snapshot ensemble, Huang et al. 2017)
group_lasso = {"*": 0.0}    # per layer, beyond the paper: group-lasso strength on whole units (rows and columns
                            # of an fc, filters and input channels of a conv) while retraining, so that pruning
                            # takes units whole (stage 2 then drops them); 0 = off
weight_decay = 5e-4         # L2 penalty (Han 2015 section 3.1: L2 + retraining prunes best)
retrain_weight_decay = 5e-4 # L2 penalty while the pruned network retrains (ResNet-20's surgery at 1e-4 read
                            # 0.7 points lower on validation: README)
optimizer = "sgd"           # adam | sgd (momentum 0.9, Nesterov)
schedule = "cosine"         # learning-rate schedule within each phase: cosine | constant
prune_method = "dns"        # std (threshold = sensitivity x std) | percentile (per layer) | global
                            # | dns (std threshold, masks re-evaluated every step: pruned weights can return)
prune_layers = "all"        # all (convs and fcs, as the paper) | fc | conv
sensitivity = {"*": 2.8, "fc3": 1.4}  # std: threshold = sensitivity x std of the layer's surviving weights
percent = {"*": 90.0}       # percentile / global: percent of surviving weights pruned per iteration
prune_iterations = 1        # prune -> retrain cycles (Han 2015 section 3.3: iterative pruning)
dns_band = 0.1              # dns: weights within +-band x threshold keep their mask state (Guo et al. 2016)
dns_threshold = "fixed"     # dns: fixed (set when surgery starts, Guo et al.) | scaled (sensitivity x the layer's
                            # current weight std at every update: for batch-norm networks, whose weight scale drifts)
                            # | density (each layer keeps the fraction of weights alive that the sensitivity left
                            # when surgery started; surgery chooses which)
dns_ramp = 0.0              # dns, density: fraction of the retraining steps over which each layer's density falls
                            # from 100% to that (gradual pruning, Zhu & Gupta 2017); 0 = all of it at the start
erk_alive = 0.0             # dns, density: > 0 sets the held densities by the Erdos-Renyi-kernel rule (Evci et al.
                            # 2020: small layers denser), this fraction of the pruned layers' weights alive in all,
                            # instead of by the sensitivities; 0 = off
seed = 0                    # torch seed (weights, batch order)
precision = "fp32"          # training arithmetic: auto (bf16 on CUDA and on CPUs with AMX / AVX512-BF16) | fp32
                            # | bf16 (autocast); weights, masks, checkpoints and evaluation stay float32
device = "auto"             # auto (CUDA if available) | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def check_settings(cfg):
    """Reject bad settings before any work, each with one line that names the fix."""
    util.require(cfg["model"] in MODELS, f"unknown model {cfg['model']!r}; choose one of {', '.join(MODELS)}")
    util.require(cfg["dataset"] in util.DATASETS,
                 f"unknown dataset {cfg['dataset']!r}; choose one of {', '.join(util.DATASETS)}")
    util.require(cfg["prune_method"] in PRUNE_METHODS,
                 f"unknown prune_method {cfg['prune_method']!r}; choose one of {', '.join(PRUNE_METHODS)}")
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
    util.require(cfg["model"] in PRETRAINED or not cfg["pretrained"],
                 f"pretrained applies to {', '.join(PRETRAINED)} only")
    util.require(cfg["model"] == "resnet18" or not cfg["cifar_stem"], "cifar_stem applies to resnet18 only")
    util.require(cfg["augment"] in ("auto",) + util.AUGMENTS,
                 f"unknown augment {cfg['augment']!r}; choose auto, {', '.join(util.AUGMENTS)}")
    util.require(all(v >= 0 for v in cfg["group_lasso"].values()),
                 f"group_lasso must be >= 0 (0 = off), got {cfg['group_lasso']}")
    util.require(cfg["weight_decay"] >= 0 and cfg["retrain_weight_decay"] >= 0,
                 f"weight decay must be >= 0, got {cfg['weight_decay']} and {cfg['retrain_weight_decay']}")
    util.require(0 <= cfg["dns_band"] < 1, f"dns_band must be in [0, 1), got {cfg['dns_band']}")
    util.require(0 <= cfg["distill"] <= 1, f"distill must be in [0, 1], got {cfg['distill']}")
    util.require(cfg["distill_temperature"] > 0,
                 f"distill_temperature must be > 0, got {cfg['distill_temperature']}")
    util.require(cfg["teacher"] in ("dense", "snapshots"),
                 f"unknown teacher {cfg['teacher']!r}; choose dense or snapshots")
    util.require(cfg["teacher"] == "dense" or cfg["distill"] > 0,
                 "teacher=snapshots teaches through distillation: set --distill (0.9 in the ResNet-20 recipe)")
    util.require(cfg["teacher"] == "dense" or cfg["restart_epochs"] or cfg["init_from"],
                 "teacher=snapshots needs a warm restart to keep a snapshot before: set --restart_epochs, or "
                 "--init_from a {model}_initial.pt trained with one")
    util.require(0 <= cfg["erk_alive"] <= 1, f"erk_alive must be in [0, 1] (0 = off), got {cfg['erk_alive']}")
    util.require(not cfg["erk_alive"] or (cfg["prune_method"] == "dns" and cfg["dns_threshold"] == "density"
                                          and cfg["prune_iterations"] == 1),
                 "erk_alive sets the densities that surgery holds: set --prune_method=dns --dns_threshold=density "
                 "(one iteration)")
    util.require(0 <= cfg["dns_ramp"] <= 1, f"dns_ramp must be in [0, 1], got {cfg['dns_ramp']}")
    util.require(cfg["dns_ramp"] == 0 or cfg["dns_threshold"] == "density",
                 f"dns_ramp ramps the held density: set --dns_threshold=density (got {cfg['dns_threshold']})")
    util.require(cfg["dns_threshold"] in ("fixed", "scaled", "density"),
                 f"unknown dns_threshold {cfg['dns_threshold']!r}; choose fixed, scaled or density")
    util.require(cfg["precision"] in util.PRECISIONS,
                 f"unknown precision {cfg['precision']!r}; choose one of {', '.join(util.PRECISIONS)}")
    util.require(cfg["optimizer"] in util.OPTIMIZERS,
                 f"unknown optimizer {cfg['optimizer']!r}; choose one of {', '.join(util.OPTIMIZERS)}")
    util.require(cfg["schedule"] in util.SCHEDULES,
                 f"unknown schedule {cfg['schedule']!r}; choose one of {', '.join(util.SCHEDULES)}")
    if cfg["dataset"] == "imagenet":  # before a pretrained network downloads
        util.imagenet_folders(cfg["data_root"])
    util.require(not cfg["init_from"] or os.path.isfile(cfg["init_from"]),
                 f"no checkpoint at {cfg['init_from']}: give init_from a {{model}}_initial.pt written by pruning.py")
    util.require(not (cfg["init_from"] and cfg["restart_epochs"]) or os.path.abspath(cfg["init_from"])
                 != os.path.abspath(os.path.join(cfg["out_dir"], cfg["model"] + "_initial.pt")),
                 "restart_epochs with init_from writes a new {model}_initial.pt: give an out_dir other than "
                 "init_from's folder (a stage never overwrites its input)")


def prune(net, cfg):
    """One pruning step with the configured rule. Returns {layer name: threshold}."""
    amount = cfg["sensitivity"] if cfg["prune_method"] in ("std", "dns") else cfg["percent"]
    if cfg["prune_method"] == "global":
        amount = amount["*"]
    return PRUNE_METHODS[cfg["prune_method"]](net, amount, cfg["prune_layers"])


def main(cfg):
    t_start = time.time()
    dev, precision = util.start_stage(cfg, check_settings, "training")

    # The last layer is fitted to the data set's classes when the model is built.
    in_shape, classes = util.DATASETS[cfg["dataset"]][:2]
    kwargs = dict(in_shape=list(in_shape), num_classes=classes)
    if cfg["model"] in PRETRAINED:
        kwargs.update(pretrained=cfg["pretrained"])
    if cfg["model"] == "resnet18":
        kwargs.update(cifar_stem=cfg["cifar_stem"])
    try:
        net = build_model(cfg["model"], **kwargs).to(dev)
    except RuntimeError as e:
        raise util.UserError(str(e)) from None
    model_args = dict(name=cfg["model"], kwargs={**kwargs, "pretrained": False} if "pretrained" in kwargs else kwargs)
    for key in ("sensitivity", "percent"):  # every pruned layer needs a value ('*' is the default)
        util.per_layer(net, cfg[key], key, cfg["prune_layers"])
    train, val, test = util.load_data(cfg["dataset"], cfg["data_root"], cfg["batch_size"], cfg["test_batch_size"],
                                      cfg["val_split"], cfg["subset"], dev, cfg["seed"], cfg["augment"],
                                      cfg["image_size"], cfg["workers"])
    print(f"data: {cfg['dataset']} train {len(train.y)}, validation {len(val.y)}, test {len(test.y)}")
    stem = os.path.join(cfg["out_dir"], cfg["model"])
    train_kw = dict(weight_decay=cfg["weight_decay"], optimizer=cfg["optimizer"], schedule=cfg["schedule"],
                    precision=precision)
    accuracy, validation, history = {}, {}, {}

    def report(header, key):
        # Validation accuracy is what settings are chosen by; the test line is reported only.
        _, val_correct, val_total = util.evaluate(net, val)
        validation[key] = util.percent(val_correct, val_total)
        loss, correct, total = util.evaluate(net, test)
        accuracy[key] = util.percent(correct, total)
        print(util.test_line(loss, correct, total))
        print(f"--- {header} ---")
        print(util.layer_table(util.layer_stats(net)))

    # 1. Train the dense network (Han 2015 section 3, step 1: learn which connections matter),
    # or take one trained before: sensitivity scans and pruning recipes then share it.
    if cfg["init_from"]:
        initial = util.load_checkpoint(cfg["init_from"], "initial", dev,
                                       "give init_from a {model}_initial.pt written by pruning.py")
        util.require(initial["model"] == model_args,
                     f"{cfg['init_from']} holds {initial['model']}, not the {model_args} these settings build")
        net.load_state_dict(initial["state_dict"])
        snapshots = initial.get("snapshots", [])
        util.require(cfg["teacher"] == "dense" or snapshots or cfg["restart_epochs"],
                     f"teacher=snapshots: {cfg['init_from']} holds no snapshot (it was trained without a warm "
                     "restart): set --restart_epochs, or --teacher=dense")
        print(f"dense network from {cfg['init_from']}" + (f" and {len(snapshots)} snapshot(s)" if snapshots else ""))
        dense = initial["metrics"].get("dense")  # what training it cost, for the results table
    else:
        t_dense = time.time()
        history["train"] = util.fit(net, net.parameters(), train, val, cfg["epochs"], cfg["lr"], label="train",
                                    **train_kw)
        dense = dict(epochs=cfg["epochs"], seconds=round(time.time() - t_dense, 1), precision=precision)
        snapshots = []
    if cfg["restart_epochs"]:
        # The end of each cycle is a network of its own; kept, it can teach beside the last one.
        snapshots = snapshots + [{k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}]
        # A warm restart: the learning rate jumps back up and anneals again, which leaves the first
        # cycle's minimum for a better one (SGDR, section 3); the dense cost adds up both cycles.
        t_restart, before = time.time(), dense or {}
        history["restart"] = util.fit(net, net.parameters(), train, val, cfg["restart_epochs"], cfg["restart_lr"],
                                      label="restart", **train_kw)
        dense = dict(epochs=before.get("epochs", 0) + cfg["restart_epochs"],
                     seconds=round(before.get("seconds", 0) + time.time() - t_restart, 1),
                     precision=precision, restart_epochs=cfg["restart_epochs"])
    report("Before pruning", "dense")
    # Every run folder holds its dense network (stage 2 can start from it: source=initial),
    # unless that file is the one it was read from.
    if not cfg["init_from"] or os.path.realpath(cfg["init_from"]) != os.path.realpath(stem + "_initial.pt"):
        util.save_checkpoint(stem + "_initial.pt", "initial", net, model_args, cfg,
                             dict(accuracy=dict(accuracy), validation=dict(validation), dense=dense),
                             **({"snapshots": snapshots} if snapshots else {}))

    # The dense network, frozen, teaches the pruned one while it retrains (distill > 0): its
    # softened outputs carry more of what the pruned weights knew than the labels alone. With
    # teacher=snapshots the networks at the ends of the earlier cosine cycles teach beside it:
    # their average is a better network than either (ResNet-20's 60- and 100-epoch networks:
    # 89.26% / 89.18% validation against 88.44% / 88.84% for the last one, seeds 0 / 1), at the
    # cost of one more forward pass a step.
    teacher = None
    if cfg["distill"]:
        teacher = teacher_from(dict(model=model_args, state_dict=net.state_dict(), snapshots=snapshots),
                               cfg["teacher"]).to(dev)
    retrain_kw = dict(teacher=teacher, distill=cfg["distill"], temperature=cfg["distill_temperature"])
    # The group lasso (group_lasso > 0) acts while the pruned network retrains, from a dense
    # network trained without it: it pulls the weakest units' surviving weights under the
    # pruning threshold together, so surgery takes those units whole.
    strengths = util.per_layer(net, cfg["group_lasso"], "group_lasso")
    if any(strengths.values()):
        retrain_kw["penalty"] = group_lasso_penalty(net, strengths)

    # 2-3. Prune the small weights, then retrain the survivors with the masks fixed; iterating
    # with the threshold recomputed on the survivors prunes further each cycle (section 3.3).
    # Dynamic network surgery instead re-evaluates the masks after every step of retraining.
    for it in range(1, cfg["prune_iterations"] + 1):
        if cfg["erk_alive"]:  # the densities by the layers' shapes (Evci et al. 2020), surgery holds them
            erk = erk_densities(net, cfg["erk_alive"], cfg["prune_layers"])
            thresholds = prune_by_percentile(net, {n: 100 * (1 - d) for n, d in erk.items()}, cfg["prune_layers"],
                                             surgery=True)
        else:
            thresholds = prune(net, cfg)
        for name, t in thresholds.items():
            print(f"Pruning with threshold : {t} for layer {name}")
        report("After pruning" + (f" (iteration {it})" if cfg["prune_iterations"] > 1 else ""), "pruned")
        surgery = None
        if cfg["prune_method"] == "dns":
            scaled = util.per_layer(net, cfg["sensitivity"], "sensitivity", cfg["prune_layers"]) \
                if cfg["dns_threshold"] == "scaled" else None
            if cfg["dns_threshold"] == "density":  # held at what pruning left, reached over dns_ramp of the steps
                held = {name: float(m.mask.mean()) for name, m in masked_layers(net, cfg["prune_layers"])}
                surgery = gradual_surgery(net, thresholds, cfg["dns_band"], held,
                                          round(cfg["dns_ramp"] * cfg["retrain_epochs"] * len(train)))
            else:
                surgery = functools.partial(surgery_step, net, thresholds, cfg["dns_band"], scaled)
        history[f"retrain{it}"] = util.fit(net, net.parameters(), train, val, cfg["retrain_epochs"],
                                           cfg["retrain_lr"], label=f"retrain{it}", after_step=surgery,
                                           **{**train_kw, "weight_decay": cfg["retrain_weight_decay"]}, **retrain_kw)
        if surgery:
            finish_surgery(net)
        util.same_on_every_rank([m.mask for _, m in masked_layers(net)], "the pruning masks")  # under torchrun
        report("After Retraining", "retrained")

    stats = util.layer_stats(net)
    masked = {n + ".weight" for n, _ in masked_layers(net)}
    summary = dict(
        model=cfg["model"], dataset=cfg["dataset"], stage="pruned", accuracy=accuracy, validation=validation,
        dense=dense,
        params=dict(total=sum(s["total"] for s in stats), nonzero=sum(s["nonzero"] for s in stats)),
        layers=[{**s, "masked": s["name"] in masked} for s in stats],
        history=history, settings=cfg, device=str(dev), precision=precision, seconds=round(time.time() - t_start, 1))
    util.save_checkpoint(stem + "_pruned.pt", "pruned", net, model_args, cfg, summary)
    util.write_json(stem + "_pruned.json", summary)
    print(f"saved {stem}_pruned.pt and {stem}_pruned.json ({summary['seconds']} s)")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS, stage="pruning")
