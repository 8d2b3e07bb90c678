"""Figures of one pipeline run, from the checkpoints and JSON the three stages wrote:

  {model}_weights.png  one layer's weight distribution before pruning, after pruning and
                       retraining, and after quantization with the centroids marked (the
                       paper's Fig. 5 style, Han, Mao & Dally 2016);
  {model}_bytes.png    where the compressed file's bytes go, per layer: cluster indices,
                       relative indices, codebook, and the rest (biases, header, framing).

    python bench/plots.py --model=lenet_300_100 --run=out/bench/lenet_300_100/seed0
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402

# -----------------------------------------------------------------------------
model = "lenet_300_100"     # lenet_300_100 | lenet5 | lenet5_caffe | resnet20 | resnet56 | resnet18
run = "out"                 # folder with {model}_initial.pt, _pruned.pt, _quantized.pt and _compressed.json
layer = ""                  # the layer whose weights are drawn ('' = the one with most weights)
out = "bench/results/plots"  # folder the PNG files go to
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)


def weights_figure(dense, pruned, quantized, codebook, name, path):
    """dense, pruned, quantized: a layer's weight tensors at the three stages; codebook (k,):
    its centroids. Zeros (pruned weights) are left out of the last two histograms."""
    plt = _pyplot()
    d, p, q = (t.detach().float().flatten().cpu() for t in (dense, pruned, quantized))
    p, q = p[p != 0], q[q != 0]
    lo, hi = float(d.min()), float(d.max())
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    axes[0].hist(d.numpy(), bins=200, range=(lo, hi), color="tab:gray")
    axes[0].set_title(f"{name}: before pruning ({d.numel():,} weights)")
    axes[1].hist(p.numpy(), bins=200, range=(lo, hi), color="tab:blue")
    axes[1].set_title(f"after pruning and retraining ({p.numel():,} non-zero, {100 * p.numel() / d.numel():.1f}%)")
    values, counts = torch.unique(q, return_counts=True)
    axes[2].bar(values.numpy(), counts.numpy(), width=(hi - lo) / 250, color="tab:orange")
    for c in codebook.detach().float().cpu():
        axes[2].axvline(float(c), color="tab:red", lw=0.5, alpha=0.6)
    axes[2].set_title(f"after quantization: {len(codebook)} shared values (red: centroids)")
    axes[2].set_xlabel("weight value")
    for ax in axes:
        ax.set_ylabel("count")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def bytes_figure(summary, path):
    """Stacked bars per quantized layer from a {model}_compressed.json summary."""
    plt = _pyplot()
    rows = [r for r in summary["layers"] if r["kind"] == "quantized"]
    names = [r["name"] for r in rows]
    parts = {"cluster indices (Huffman)": [r["weight_bytes"] for r in rows],
             "relative indices (Huffman)": [r["index_bytes"] for r in rows],
             "codebook": [r["codebook_bytes"] for r in rows],
             "framing": [r["bytes"] - r["weight_bytes"] - r["index_bytes"] - r["codebook_bytes"] for r in rows]}
    other = summary["compressed_bytes"] - sum(r["bytes"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0] * len(rows)
    for label, values in parts.items():
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar(["biases, header"], [other], color="tab:gray", label="biases, batch-norm, header")
    for x, total in zip(names + ["biases, header"], bottom + [other]):
        ax.annotate(f"{total:,}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="bytes in the file", title=f"{summary['model']}: {summary['compressed_bytes']:,} bytes, "
           f"{summary['ratio']:.1f}x smaller than dense float32")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)


def byte_groups(summary):
    """Where the file's bytes go, by group of tensors: the quantized layers by stage ('conv1',
    'layer1' ... of a ResNet; each layer alone in a LeNet), batch-norm, biases and the rest,
    the header. -> [{group, nonzero, params, weight_bytes, index_bytes, bytes}]."""
    groups = {}
    for r in summary["layers"]:
        name = r["members"][0] if r["kind"] == "shared" else r["name"]  # a group: its members' kind
        if r["kind"] == "quantized":
            key = name.split(".")[0]
        elif any(part.startswith("bn") for part in name.split(".")):
            key = "batch-norm"
        else:
            key = "biases" if name.endswith(".bias") else "other tensors"
        g = groups.setdefault(key, dict(group=key, nonzero=0, params=0, weight_bytes=0, index_bytes=0, bytes=0))
        g["nonzero"] += r.get("nonzero", r["params"])
        g["params"] += r["params"]
        g["weight_bytes"] += r.get("weight_bytes", 0)
        g["index_bytes"] += r.get("index_bytes", 0)
        g["bytes"] += r["bytes"]
    rest = summary["compressed_bytes"] - sum(g["bytes"] for g in groups.values())
    return list(groups.values()) + [dict(group="header, version, end", nonzero=0, params=0, weight_bytes=0,
                                         index_bytes=0, bytes=rest)]


def byte_groups_table(summary):
    """byte_groups as a markdown table with each group's share of the file."""
    lines = ["| group | weights alive | cluster indices | relative indices | total bytes | share |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for g in byte_groups(summary):
        alive = f"{g['nonzero']:,} / {g['params']:,}" if g["params"] else ""
        lines.append(f"| {g['group']} | {alive} | {g['weight_bytes']:,} | {g['index_bytes']:,} | {g['bytes']:,} "
                     f"| {100 * g['bytes'] / summary['compressed_bytes']:.1f}% |")
    lines.append(f"| **file** | | | | **{summary['compressed_bytes']:,}** | {summary['ratio']:.1f}x smaller |")
    return "\n".join(lines)


def main(cfg):
    from quantize import load_quantized

    stem = os.path.join(cfg["run"], cfg["model"])
    hint = f"run the three stages with --out_dir={cfg['run']} first"
    dense = util.load_checkpoint(stem + "_initial.pt", "initial", "cpu", hint)["state_dict"]
    pruned = util.load_checkpoint(stem + "_pruned.pt", "pruned", "cpu", hint)["state_dict"]
    net, _ = load_quantized(stem + "_quantized.pt", "cpu")
    layers = {n: m for n, m in net.named_modules() if hasattr(m, "codebook")}
    name = cfg["layer"] or max(layers, key=lambda n: layers[n].index.numel())
    util.require(name in layers, f"no quantized layer {name!r}; choose one of {', '.join(layers)}")
    os.makedirs(cfg["out"], exist_ok=True)
    paths = [os.path.join(cfg["out"], f"{cfg['model']}_weights.png"), os.path.join(cfg["out"], f"{cfg['model']}_bytes.png")]
    weights_figure(dense[f"{name}.weight"], pruned[f"{name}.weight"], layers[name].weight, layers[name].codebook,
                   f"{cfg['model']} {name}", paths[0])
    summary = json.load(open(stem + "_compressed.json"))
    bytes_figure(summary, paths[1])
    table = byte_groups_table(summary)
    print(table)
    paths.append(os.path.join(cfg["out"], f"{cfg['model']}_bytes.md"))
    util.write_bytes(paths[-1], (table + "\n").encode())
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
