"""Benchmark: the file's coders side by side on real quantized networks, Huffman (the paper's)
against ANS under context models (huffman_encode.py --coder=ans).

    python bench/coders.py
    python bench/coders.py --checkpoints="['out/bench/lenet5_caffe/seed0/lenet5_caffe_quantized.pt']"

For each stage-2 checkpoint, encodes the same tensors with each coder (the same untimed warm-up
call, then `repeats` timed calls, the best kept), decodes each file and checks it bit for bit
against the checkpoint, and splits the bytes into cluster indices (weights), positions (relative
indices, presence bits and counts), codebooks, the other tensors and the header. Prints a table,
writes bench/results/coders.json with the CPU model and load average, and the table between the
coders markers of docs/experiments.md (block() renders it from that JSON).
"""
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcfile  # noqa: E402
import util  # noqa: E402
from results_table import replace_block  # noqa: E402
from quantize import load_quantized  # noqa: E402

# -----------------------------------------------------------------------------
checkpoints = ["out/bench/lenet_300_100/seed[0-9]/lenet_300_100_quantized.pt",
               "out/bench/lenet5_caffe/seed[0-9]/lenet5_caffe_quantized.pt",
               "out/bench/resnet20/seed[0-9]/resnet20_quantized.pt",
               "out/bench/lenet5_caffe_ttq/seed[0-9]/lenet5_caffe_quantized.pt",
               "out/bench/resnet20_ttq/seed[0-9]/resnet20_quantized.pt"]  # stage-2 checkpoints (globs)
doc = "docs/experiments.md"  # whose table between the coders markers is replaced ('' = leave it)
repeats = 3                 # timed encodes and decodes per coder (the best is kept), after one untimed call
out = "bench/results/coders.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def split(report):
    """Bytes of a file by kind: weights (cluster codes), positions, codebooks, other tensors, header."""
    q = [r for r in report["layers"] if r["kind"] == "quantized"]
    return dict(weights=sum(r["weight_bytes"] for r in q), positions=sum(r["index_bytes"] for r in q),
                codebooks=sum(r["codebook_bytes"] for r in q),
                framing=sum(r["bytes"] - r["weight_bytes"] - r["index_bytes"] - r["codebook_bytes"] for r in q),
                other=sum(r["bytes"] for r in report["layers"] if r["kind"] != "quantized"),
                header=report["header_bytes"])


BEGIN, END = "<!-- coders:begin -->", "<!-- coders:end -->"


def block(result):
    """The text between the coders markers, from the JSON main writes: the table and the machine."""
    return (table(result["rows"]) + f"\n\n{result['cpu']}, {result['cpus']} cores, load average "
            f"{result['load_average']['before'][0]:.1f}; best of {result['repeats']}.")


def table(rows):
    """The README's coder table: a row per checkpoint, its accuracy on test and on validation
    (what a lever is chosen by; the file holds the same tensors under either coder) and each
    coder's bytes, split into positions and cluster codes."""
    lines = ["| checkpoint | test / validation accuracy | Huffman: bytes (ratio) | positions / weights | ANS: bytes (ratio) "
             "| positions / weights | change | encode / decode ms, Huffman -> ANS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        h, a = r["huffman"], r["ans"]
        cell = lambda c: f"{c['bytes']:,} ({c['ratio']:.1f}x)"  # noqa: E731
        split = lambda c: f"{c['split']['positions']:,} / {c['split']['weights']:,}"  # noqa: E731
        ms = lambda c: f"{1e3 * c['encode_s']:.0f} / {1e3 * c['decode_s']:.0f}"  # noqa: E731
        val = "-" if r.get("validation") is None else f"{r['validation']:.2f}%"
        lines.append(f"| `{r['label']}` | {r['accuracy']:.2f}% / {val} | {cell(h)} | {split(h)} | {cell(a)} | {split(a)} "
                     f"| {100 * (a['bytes'] / h['bytes'] - 1):+.1f}% | {ms(h)} -> {ms(a)} |")
    return "\n".join(lines)


def main(cfg):
    paths = list(dict.fromkeys(p for pattern in cfg["checkpoints"] for p in sorted(glob.glob(pattern))))
    util.require(paths, f"no checkpoint matches {cfg['checkpoints']}: run the pipeline first")
    load_before = os.getloadavg()
    rows = []
    for path in paths:
        _, ckpt = load_quantized(path, "cpu")
        quantized = {n: dict(bits=q["bits"], clusters=q["clusters"]) for n, q in ckpt["quantized"].items()}
        label = os.path.relpath(os.path.dirname(path), "out")
        row = dict(checkpoint=path, label=label, model=ckpt["model"]["name"],
                   accuracy=ckpt["metrics"]["accuracy"]["quantized"],
                   validation=ckpt["metrics"].get("validation", {}).get("quantized"))
        for coder in dcfile.CODERS:
            encode = lambda: dcfile.encode_model(ckpt["state_dict"], ckpt["model"], quantized, coder=coder)
            encode()
            t_enc, (blob, report) = util.best_time(encode, cfg["repeats"])
            dcfile.decode_bytes(blob)
            t_dec, (state, _) = util.best_time(lambda: dcfile.decode_bytes(blob), cfg["repeats"])
            util.require(all(dcfile.bit_equal(state[k], ckpt["state_dict"][k]) for k in ckpt["state_dict"]),
                         f"{path}: the {coder} file does not decode to the checkpoint")
            row[coder] = dict(bytes=len(blob), ratio=report["dense_bytes"] / len(blob), encode_s=t_enc,
                              decode_s=t_dec, split=split(report),
                              ans_layers=[r["name"] for r in report["layers"] if r.get("coder") == "ans"])
        rows.append(row)
        h, a = row["huffman"], row["ans"]
        print(f"{path}\n  huffman {h['bytes']:8d} B ({h['ratio']:6.1f}x)  ans {a['bytes']:8d} B ({a['ratio']:6.1f}x)  "
              f"{100 * (a['bytes'] / h['bytes'] - 1):+5.1f}%  encode {h['encode_s']:.3f} / {a['encode_s']:.3f} s  "
              f"decode {h['decode_s']:.3f} / {a['decode_s']:.3f} s")
        for key in h["split"]:
            print(f"    {key:10} {h['split'][key]:8d} -> {a['split'][key]:8d}")
    result = dict(rows=rows, repeats=cfg["repeats"], cpu=util.cpu_model(), cpus=os.cpu_count(),
                  load_average=dict(before=load_before, after=os.getloadavg()), time=time.strftime("%Y-%m-%d %H:%M"))
    util.write_json(cfg["out"], result)
    print(table(rows))
    if cfg["doc"]:
        replace_block(cfg["doc"], block(result), BEGIN, END)
    print(f"CPU: {result['cpu']}, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
