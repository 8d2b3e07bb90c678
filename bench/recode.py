"""Re-encode every shipped .dc file in the current format version: decode it, encode the same
tensors with the settings its header records (coder, span bits), check that the new file
decodes to the old one's tensors bit for bit, and write it in place with its bytes, ratio and
sha256 in bench/results/results.json and the README's results table.

    python bench/recode.py                  # every shipped file
    python bench/recode.py --dry_run=True   # print the table of sizes only

The weights are the same bit for bit, so every error figure stands; bench/verify.py then
re-tests the files on the data. A file the current encoder would make no smaller is left as
it is (a newer version can cost a flag byte where it saves nothing)."""
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import dcfile  # noqa: E402
import util  # noqa: E402
from pipeline import summarise  # noqa: E402
from results_table import replace_block, table  # noqa: E402

# -----------------------------------------------------------------------------
results = "bench/results/results.json"  # the recorded runs, whose 'file' entries are re-encoded
readme = "README.md"        # whose results table is regenerated ('' = leave it)
dry_run = False             # print what would change, write nothing
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def recode(blob):
    """The bytes of one file -> the same tensors and header encoded by the current version."""
    state, header = dcfile.decode_bytes(blob)
    info = {k: v for k, v in header.items() if k not in ("model", "quantized")}
    settings = header.get("settings", {})
    new, _ = dcfile.encode_model(state, header["model"], header["quantized"], index_bits=settings.get("index_bits", 0),
                                 info=info, coder=settings.get("coder", "huffman"))
    again, header_again = dcfile.decode_bytes(new)
    same = list(again) == list(state) and all(dcfile.bit_equal(state[k], again[k]) for k in state)
    if header_again != header or not same:
        raise util.UserError("the re-encoded file does not decode to the same tensors and header: not written")
    return new


def main(cfg):
    path = os.path.join(ROOT, cfg["results"])
    util.require(os.path.isfile(path), f"no results at {cfg['results']}: run bench/pipeline.py first")
    recorded = json.load(open(path))
    runs, lines = [], []
    for run in recorded["runs"]:
        if "file" not in run:
            runs.append(run)
            continue
        file = os.path.join(ROOT, run["file"])
        with open(file, "rb") as f:
            blob = f.read()
        new = recode(blob)
        kept = len(new) >= len(blob)
        lines.append(f"| {run['file']} | {blob[8]} | {len(blob):,} | {len(new):,} | {100 * (len(new) / len(blob) - 1):+.1f}% | "
                     f"{'kept' if kept else 'recoded'} |")
        if kept:
            runs.append(run)
            continue
        if not cfg["dry_run"]:
            util.write_bytes(file, new)
        runs.append({**run, "compressed_bytes": len(new), "ratio": run["dense_bytes"] / len(new),
                     "sha256": hashlib.sha256(new).hexdigest()})
    print("| file | version | bytes | now | change | |\n| --- | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(lines))
    if cfg["dry_run"]:
        return
    rows = summarise(runs)
    util.write_json(path, {**recorded, "rows": rows, "runs": runs})
    if cfg["readme"]:
        replace_block(os.path.join(ROOT, cfg["readme"]), table(rows))
    print(f"wrote {cfg['results']}" + (f" and the table in {cfg['readme']}" if cfg["readme"] else ""))


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
