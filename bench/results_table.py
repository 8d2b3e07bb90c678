"""Regenerate README.md's results table from the JSON summaries the three stages wrote.

    python bench/results_table.py --runs="['out']"

For each folder in `runs` and each model with all three summaries there
({model}_pruned.json, {model}_quantized.json, {model}_compressed.json), one row: test error
dense -> retrained -> quantized -> decoded from the file, weights alive, dense float32 bytes,
bytes of the compressed file on disk, ratio, epochs, the stages' own timings summed (training, k-means, coding,
testing; not the interpreter start-up; plus the dense training of a run that pruned an earlier network), hardware.
Writes bench/results/results.json and the table between the README's result markers.
"""
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402

# -----------------------------------------------------------------------------
runs = ["out"]                          # folders holding the stages' JSON summaries
readme = "README.md"                    # whose table between the markers is replaced ('' = leave it)
out = "bench/results/results.json"      # where the rows are written
hardware = ""                           # what the runs ran on ('' = this machine's CPU and core count)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def this_machine():
    return f"{util.cpu_model()}, {os.cpu_count()} cores"


def row(folder, model):
    """One result row from a run folder's three summaries."""
    load = lambda stage: json.load(open(os.path.join(folder, f"{model}_{stage}.json")))
    p, q, c = load("pruned"), load("quantized"), load("compressed")
    s = p["settings"]
    # A run that pruned a dense checkpoint trained before (init_from) counts that training's
    # epochs and time, which the checkpoint records; the time spent in this run (a warm
    # restart of it, or the whole dense training of a run that trained its own) is in its
    # stage-1 seconds already.
    dense = dict(p.get("dense") or dict(epochs=s["epochs"]))
    dense["seconds"] = dense.get("seconds", 0) - sum(h["seconds"] for h in p.get("history", {}).get("restart", [])) \
        if s.get("init_from") else 0
    epochs = dense.get("epochs", 0) + s["prune_iterations"] * s["retrain_epochs"] + q["settings"]["finetune_epochs"] \
        + len(p.get("history", {}).get("vd", [])) \
        + sum(probe["epochs"] for probe in (p.get("search") or {}).get("probes", []))  # the automatic recipe's
    quantized = q["accuracy"]["quantized"]
    dense_accuracy = p["accuracy"].get("dense", p["accuracy"].get("initial"))  # "initial": runs before the rename
    # Weights alive in the file: stage 2 can zero more (ternary layers, dead units, a zero centroid).
    pruned_nonzero = {l["name"]: l["nonzero"] for l in p["layers"]}
    alive = p["params"]["nonzero"] - sum(pruned_nonzero[l["name"] + ".weight"] - l["nonzero"] for l in q["layers"])
    return dict(model=model, folder=folder, dataset=s["dataset"], params=p["params"]["total"],
                # a run that prunes nothing (prune_iterations=0: TTQ) retrains nothing: its dense network
                error=dict(dense=100 - dense_accuracy, retrained=100 - p["accuracy"].get("retrained", dense_accuracy),
                           quantized=100 - quantized, decoded=100 - c["accuracy"]["decoded"]),
                # the decoded model is the quantized one bit for bit: its validation error is stage 2's
                val_error=100 - q["validation"]["quantized"], val_split=s["val_split"],
                alive=100 * alive / p["params"]["total"],
                dense_bytes=c["dense_bytes"], compressed_bytes=c["compressed_bytes"], ratio=c["ratio"],
                epochs=epochs, minutes=(dense.get("seconds", 0) + p["seconds"] + q["seconds"] + c["encode_seconds"]
                                        + c["decode_seconds"]) / 60,
                device=p.get("device", "cpu"))


def table(rows):
    """The README's results table, each row labelled with its own 'hardware'. A row with
    'seeds' > 1 holds means over seeds, and the decoded error and the ratio carry their
    standard deviation."""
    lines = ["| model | parameters | test error: dense -> retrained -> quantized -> decoded | validation error (decoded) "
             "| weights alive | dense bytes | compressed bytes | ratio | epochs | stage time | hardware |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        e, many = r["error"], r.get("seeds", 1) > 1
        decoded = f"**{e['decoded']:.2f}% ± {r['error_sd']:.2f}**" if many else f"**{e['decoded']:.2f}%**"
        ratio = f"**{r['ratio']:.1f}x ± {r['ratio_sd']:.1f}**" if many else f"**{r['ratio']:.1f}x**"
        name = r.get("recipe", r["model"])
        model = f"{name} ({r['seeds']} seeds)" if many else name
        val = "-" if r.get("val_error") is None else f"{r['val_error']:.2f}%"
        lines.append(f"| {model} | {r['params']:,} | {e['dense']:.2f}% -> {e['retrained']:.2f}% -> "
                     f"{e['quantized']:.2f}% -> {decoded} | {val} | {r['alive']:.2f}% | {r['dense_bytes']:,} "
                     f"| {r['compressed_bytes']:,} | {ratio} | {r['epochs']} | {r['minutes']:.1f} min "
                     f"| {r['hardware']} ({r['device']}) |")
    return "\n".join(lines)


def replace_block(readme, text, begin=BEGIN, end=END):
    """Put `text` between the README's markers (the results table's by default)."""
    doc = open(readme).read()
    util.require(begin in doc and end in doc, f"{readme} has no {begin} ... {end} block")
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", doc, flags=re.S)
    util.write_bytes(readme, doc.encode())


def main(cfg):
    rows, hw = [], cfg["hardware"] or this_machine()
    for folder in cfg["runs"]:
        for path in sorted(glob.glob(os.path.join(folder, "*_compressed.json"))):
            rows.append({**row(folder, os.path.basename(path)[:-len("_compressed.json")]), "hardware": hw})
    util.require(rows, f"no *_compressed.json in {cfg['runs']}: run the three stages first")
    text = table(rows)
    print(text)
    util.write_json(cfg["out"], dict(rows=rows))
    if cfg["readme"]:
        replace_block(cfg["readme"], text)
        print(f"updated {cfg['readme']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
