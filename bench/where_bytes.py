"""Where a compressed file's bytes go, by kind of layer: depthwise convs, grouped convs,
pointwise (1x1) convs, other convs, fully-connected layers, and the tensors stored whole
(batch-norm, biases), from the {model}_compressed.json that huffman_encode.py writes beside
each .dc file. Compact networks are the hard case of Deep Compression: their depthwise convs
hold few weights, each of which matters.

    python bench/where_bytes.py --runs="['out/mobilenet_v2/seed0', 'out/mobilenet_v2/seed1']" --model=torchvision.mobilenet_v2

Prints one table per run and writes them as JSON (--out)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import util  # noqa: E402
from models import file_stem  # noqa: E402

# -----------------------------------------------------------------------------
runs = ["out"]              # folders holding {model}_compressed.json
model = "lenet_300_100"     # the network the runs compressed (the --model of the stages)
out = ""                    # write the tables here as JSON ('' = print only)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

KINDS = ("depthwise conv", "grouped conv", "pointwise conv", "conv", "fc", "stored whole", "header")


def kind_of(row, groups):
    """The kind of a compressed JSON row: a quantized layer by its weight's shape (out, in /
    groups, kh, kw) and its groups, else 'stored whole'."""
    if row["kind"] != "quantized":
        return "stored whole"
    shape = row["shape"]
    if len(shape) != 4:
        return "fc"
    if groups.get(row["name"], 1) > 1:
        return "depthwise conv" if shape[1] == 1 else "grouped conv"
    return "pointwise conv" if shape[2:] == [1, 1] else "conv"


def layer_groups(path, model):
    """{layer name: groups} of the convs of the network a .dc file names, built on the meta
    device (no memory); `model` is the user's --model, which a factory needs."""
    import torch

    import dcfile
    from models import build_model, check_model

    check_model(model)
    _, header = dcfile.decode_file(path)
    args = dcfile.without_pretrained_download(header["model"])
    with torch.device("meta"):
        net = build_model(args["name"], **args["kwargs"])
    return {n: m.groups for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}


def where(summary, groups):
    """{kind: {'bytes', 'share', 'params', 'nonzero'}} of a compressed summary."""
    table = {k: dict(bytes=0, params=0, nonzero=0) for k in KINDS}
    for row in summary["layers"]:
        t = table[kind_of(row, groups)]
        t["bytes"] += row["bytes"]
        t["params"] += row["params"]
        t["nonzero"] += row.get("nonzero", row["params"])
    table["header"]["bytes"] = summary["header_bytes"]
    total = summary["compressed_bytes"]
    return {k: {**v, "share": v["bytes"] / total} for k, v in table.items() if v["bytes"]}


def main(cfg):
    results = {}
    for folder in cfg["runs"]:
        path = os.path.join(folder, f"{file_stem(cfg['model'])}_compressed.json")
        util.require(os.path.isfile(path), f"no {path}: run huffman_encode.py --out_dir={folder} first")
        summary = json.load(open(path))
        table = where(summary, layer_groups(os.path.join(folder, f"{file_stem(cfg['model'])}.dc"), cfg["model"]))
        results[folder] = dict(compressed_bytes=summary["compressed_bytes"], ratio=summary["ratio"], kinds=table)
        print(f"{folder}: {summary['compressed_bytes']:,} bytes ({summary['ratio']:.1f}x)")
        print(f"{'kind':<16}| {'bytes':>9} | share  | {'non-zeros':>21} | bits / non-zero")
        for k, t in table.items():
            bits = f"{8 * t['bytes'] / t['nonzero']:.2f}" if t["nonzero"] else ""
            print(f"{k:<16}| {t['bytes']:9,} | {100 * t['share']:5.1f}% | {t['nonzero']:9,} / {t['params']:9,} | {bits}")
    if cfg["out"]:
        util.write_json(cfg["out"], dict(machine=util.cpu_model(), runs=results))
        print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
