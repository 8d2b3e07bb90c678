"""Sensitivity analysis (Han et al. 2015, section 3 and Fig. 6): prune one layer at a time of a
trained dense network over a range of sensitivities, without retraining, and record the
accuracy; the curves show which layers tolerate pruning, and so the per-layer sensitivities
to give pruning.py.

    python pruning.py --model=lenet5_caffe ...      # writes out/lenet5_caffe_initial.pt
    python bench/sensitivity.py --model=lenet5_caffe --data_root=../shared/data

Accuracy is measured on the validation split stage 1 held out, not on the test set, so that
choosing sensitivities from the curves does not tune on the test set. Writes the curves as
JSON and as a PNG (accuracy against the fraction pruned, and the fraction alive against the
sensitivity, one line per layer).
"""
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import training  # noqa: E402
import util  # noqa: E402
from models import build_model  # noqa: E402
from prune import apply_threshold, masked_layers, std_threshold  # noqa: E402

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # reads {out_dir}/{model}_initial.pt (the dense network pruning.py trains)
out_dir = "out"             # where that checkpoint is
data_root = "data"          # folder holding the data set stage 1 used
sensitivities = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0]  # threshold = s x std
tolerance = 2.0             # suggest, per layer, the largest sensitivity of the scan whose pruning (that layer
                            # alone, no retraining) costs at most this many points of validation accuracy
out = "bench/results/sensitivity_{model}.json"  # the curves ({model} is filled in); the PNG goes beside it
device = "auto"             # auto (CUDA if available) | cpu | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def sensitivity_scan(net, data, sensitivities):
    """For each masked layer of `net` alone and each sensitivity s, prune the layer with
    threshold s x std of its weights (the std rule of prune.py) and evaluate on `data`.
    `net` is left as it was. -> {layer: [{sensitivity, threshold, alive (fraction),
    accuracy (percent)}]}, and the unpruned accuracy."""
    _, correct, total = training.evaluate(net, data)
    base = training.percent(correct, total)
    curves = {}
    for name, layer in masked_layers(net):
        curves[name] = []
        weight, mask = layer.weight.detach().clone(), layer.mask.clone()
        for s in sensitivities:
            t = std_threshold(weight, mask, s)
            apply_threshold(layer, t)
            _, correct, total = training.evaluate(net, data)
            curves[name].append(dict(sensitivity=s, threshold=t, alive=float(layer.mask.mean()),
                                     accuracy=training.percent(correct, total)))
            with torch.no_grad():  # undo the pruning before the next trial
                layer.weight.copy_(weight)
                layer.mask.copy_(mask)
    return curves, base


def suggest(curves, base, tolerance):
    """{layer: the largest scanned sensitivity whose validation accuracy (that layer alone
    pruned, no retraining) stays within `tolerance` points of `base`}; 0.0 where none does."""
    return {name: max([r["sensitivity"] for r in rows if r["accuracy"] >= base - tolerance], default=0.0)
            for name, rows in curves.items()}


def plot(curves, base, title, path):
    """Two panels: accuracy against the percent of the layer pruned (Han 2015 Fig. 6), and
    percent alive against the sensitivity. Written to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 10  # a residual network: one colour per layer along a colour map, legend outside
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.5 if many else 11, 4.6 if many else 4.2))
    colours = plt.cm.viridis([i / max(len(curves) - 1, 1) for i in range(len(curves))]) if many else [None] * len(curves)
    for (name, rows), colour in zip(curves.items(), colours):
        left.plot([100 * (1 - r["alive"]) for r in rows], [r["accuracy"] for r in rows], "o-", ms=3, label=name,
                  color=colour)
        right.plot([r["sensitivity"] for r in rows], [100 * r["alive"] for r in rows], "o-", ms=3, label=name,
                   color=colour)
    left.axhline(base, color="gray", lw=0.8, ls="--", label="unpruned")
    left.set(xlabel="parameters pruned away (%)", ylabel="validation accuracy (%)",
             title=f"{title}: one layer pruned, no retraining", ylim=(max(0, base - 20), min(100, base + 1)))
    right.set(xlabel="sensitivity (threshold / std of the layer's weights)", ylabel="weights alive (%)",
              yscale="log", title="what each sensitivity keeps")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if many:
        right.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        for ax in (left, right):
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(cfg):
    util.require(cfg["sensitivities"] and all(s >= 0 for s in cfg["sensitivities"]),
                 f"sensitivities must be a non-empty list of numbers >= 0, got {cfg['sensitivities']}")
    dev = util.pick_device(cfg["device"])
    path = os.path.join(cfg["out_dir"], f"{cfg['model']}_initial.pt")
    ckpt = util.load_checkpoint(path, "initial", dev, f"run pruning.py --model={cfg['model']} first")
    net = build_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"]).to(dev)
    net.load_state_dict(ckpt["state_dict"])
    s = ckpt["settings"]
    util.require(s["val_split"] > 0, f"{path} was trained with val_split=0: no validation set to scan on")
    _, val, _ = datasets.load_data(datasets.DataSpec.from_settings(s, data_root=cfg["data_root"]), dev)
    print(f"device: {util.describe_device(dev)}; {len(val.y)} validation images")
    curves, base = sensitivity_scan(net.eval(), val, cfg["sensitivities"])
    print(f"unpruned validation accuracy {base:.2f}%")
    width = max(len(name) for name in ["layer", *curves]) + 1
    print(f"{'layer':<{width}}" + "".join(f"{f's={x:g}':>14}" for x in cfg["sensitivities"]))
    for name, rows in curves.items():
        print(f"{name:<{width}}" + "".join(f"{r['accuracy']:6.2f}% {100 * r['alive']:5.1f}%" for r in rows))
    print("(each cell: validation accuracy with that layer alone pruned, and the percent of it alive)")
    suggested = suggest(curves, base, cfg["tolerance"])
    print(f"largest sensitivity within {cfg['tolerance']:g} points of the unpruned validation accuracy: {suggested}")
    json_path = cfg["out"].format(model=cfg["model"])
    util.write_json(json_path, dict(model=cfg["model"], checkpoint=path, unpruned_accuracy=base, curves=curves,
                                    tolerance=cfg["tolerance"], suggested=suggested,
                                    data=dict(dataset=s["dataset"], split="validation", images=len(val.y))))
    png = os.path.splitext(json_path)[0] + ".png"
    plot(curves, base, cfg["model"], png)
    print(f"wrote {json_path} and {png}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
