"""Check the results table in a minute: decode every shipped .dc file (bench/results/dc/), check
its sha256, test the decoded model again on the test and validation sets, and compare every
figure with bench/results/results.json, and results.json's rows with the README's table.

    python bench/verify.py --data_root=../shared/data
    python bench/verify.py --data_root=        # no data at hand: hashes, decoding and bytes only

Prints one table, a row per shipped file, then one line per difference, and exits with status 1
when there is any (a file that is missing, altered or decodes to other figures; a row of
results.json or of the README that its runs do not give). Runs recorded without a file are
listed as not shipped.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import dcfile  # noqa: E402
import training  # noqa: E402
import util  # noqa: E402
from datasets import DataSpec, load_data  # noqa: E402
from pipeline import summarise  # noqa: E402
from quantize import build_quantized_model  # noqa: E402
from results_table import BEGIN, END, table  # noqa: E402

# -----------------------------------------------------------------------------
results = "bench/results/results.json"  # the recorded runs and rows
readme = "README.md"        # whose results table must be the one results.json gives ('' = skip)
data_root = "data"          # folder holding MNIST/raw and CIFAR10/; '' = decode and check bytes only
recipes = []                # only the files of these recipes ([] = all)
device = "cpu"              # where the decoded models are tested: cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())
TOLERANCE = 1e-9  # figures are recomputed by the same arithmetic; this only forgives float printing


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def error_on(net, batches):
    """Test error in percent of `net` on `batches`, as the stages compute it."""
    _, correct, total = training.evaluate(net, batches)
    return 100 - training.percent(correct, total)


def check_file(run, cfg, data, dev):
    """Decode one shipped file and compare it with its run -> (figures now, [differences])."""
    name, path = run["file"], os.path.join(ROOT, run["file"])
    if not os.path.isfile(path):
        return {}, [f"{name}: missing (results.json lists it)"]
    problems, now, digest = [], dict(bytes=os.path.getsize(path)), sha256(path)
    if digest != run["sha256"]:
        problems.append(f"{name}: sha256 {digest[:16]}... differs from results.json's {run['sha256'][:16]}...")
    try:
        state, header = dcfile.decode_file(path)
    except ValueError as e:
        return now, problems + [f"{name}: does not decode ({e})"]
    now["ratio"] = run["dense_bytes"] / now["bytes"]
    if now["bytes"] != run["compressed_bytes"]:
        problems.append(f"{name}: {now['bytes']:,} bytes where results.json records {run['compressed_bytes']:,}")
    if not math.isclose(now["ratio"], run["ratio"], rel_tol=TOLERANCE):
        problems.append(f"{name}: ratio {now['ratio']:.4f}x where results.json records {run['ratio']:.4f}x")
    if not cfg["data_root"]:
        return now, problems
    net = build_quantized_model(dcfile.without_pretrained_download(header["model"]), header["quantized"])
    net.load_state_dict(state)
    # Validation and test images depend on neither the training seed, augmentation nor batch
    # sizes: files that differ only there share one load (CIFAR-10 is 60,000 JPEGs to decode),
    # and each file is tested in the minibatches it recorded.
    own = DataSpec.from_settings(header["data"], data_root=cfg["data_root"], val_split=run["val_split"])
    spec = dataclasses.replace(own, seed=0, augment="none", batch_size=DataSpec.batch_size,
                               test_batch_size=DataSpec.test_batch_size)
    if spec not in data:  # one load per data set and split, shared by its files
        data[spec] = load_data(spec, dev)[1:]
    val, test = (copy.copy(b) for b in data[spec])
    val.batch_size = test.batch_size = own.test_batch_size
    net = net.to(dev)
    now.update(error=error_on(net, test), val_error=error_on(net, val))
    for key, recorded in (("error", run["error"]["decoded"]), ("val_error", run["val_error"])):
        if not math.isclose(now[key], recorded, abs_tol=TOLERANCE):
            what = "test" if key == "error" else "validation"
            problems.append(f"{name}: decoded {what} error {now[key]:.2f}% where results.json records {recorded:.2f}%")
    return now, problems


def check_rows(recorded, cfg):
    """results.json's rows against the ones its runs give, and the README's table against
    those rows -> [differences]."""
    problems = []
    given = summarise(recorded["runs"])
    if len(given) != len(recorded["rows"]):
        problems.append(f"results.json holds {len(recorded['rows'])} rows where its runs give {len(given)}")
    for want, got in zip(given, recorded["rows"]):
        for key, value in want.items():
            other = got.get(key)
            same = (all(math.isclose(value[k], other.get(k, math.nan), abs_tol=TOLERANCE) for k in value)
                    if isinstance(value, dict) else
                    math.isclose(value, other, abs_tol=TOLERANCE) if isinstance(value, float) and
                    isinstance(other, (int, float)) else value == other)
            if not same:
                problems.append(f"results.json row {want['recipe']}: {key} {other} where its runs give {value}")
    if cfg["readme"]:
        text = open(os.path.join(ROOT, cfg["readme"])).read()
        block = text.split(BEGIN, 1)[-1].split(END, 1)[0].strip() if BEGIN in text else None
        if block != table(recorded["rows"]):
            problems.append(f"{cfg['readme']}: the results table is not the one results.json gives "
                            "(python bench/results_table.py --runs=[] rewrites it)" if block is not None
                            else f"{cfg['readme']}: no results table between {BEGIN} and {END}")
    return problems


def main(cfg):
    t0 = time.time()
    dev = util.pick_device(cfg["device"])
    path = os.path.join(ROOT, cfg["results"])
    util.require(os.path.isfile(path), f"no results at {path}: give --results=bench/results/results.json")
    with open(path) as f:
        recorded = json.load(f)
    runs = [r for r in recorded["runs"] if not cfg["recipes"] or r["recipe"] in cfg["recipes"]]
    print(f"{len([r for r in runs if 'file' in r])} shipped files; "
          + ("accuracies re-tested on " + cfg["data_root"] if cfg["data_root"] else "accuracies not re-tested")
          + f"; {util.cpu_model()}, {os.cpu_count()} cores")
    print(f"{'file':<50} | {'bytes':>7} | {'ratio':>7} | {'test error: recorded -> now':>27} "
          f"| {'validation error: recorded -> now':>33} | check")
    problems, data = check_rows(recorded, cfg), {}
    for run in runs:
        if "file" not in run:
            print(f"{run['recipe'] + ' seed ' + str(run['seed']):<50} | not shipped")
            continue
        now, found = check_file(run, cfg, data, dev)
        problems += found
        fmt = lambda key: f"{now[key]:.2f}%" if key in now else "-"  # noqa: E731
        print(f"{run['file']:<50} | {now.get('bytes', 0):>7,} | {now.get('ratio', 0):>6.1f}x | "
              f"{run['error']['decoded']:>17.2f}% -> {fmt('error'):>6} | "
              f"{run['val_error']:>23.2f}% -> {fmt('val_error'):>6} | {'DIFFERS' if found else 'ok'}")
    print(f"{time.time() - t0:.1f} s")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("every shipped file and figure agrees with results.json and the README")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
