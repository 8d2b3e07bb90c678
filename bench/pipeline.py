"""Run the whole pipeline, pruning.py -> quantization.py -> huffman_encode.py, for each recipe
in config/ (the files the stage scripts read), for one or more seeds; then write
bench/results/results.json and regenerate the README's results table from the stages' JSON summaries.

    python bench/pipeline.py --data_root=../shared/data                     # every recipe, seed 0
    python bench/pipeline.py --recipes="['lenet_300_100']" --seeds=3 --jobs=2

Each run goes to {out_dir}/{recipe}/seed{N}/ with the three stages' checkpoints, JSON and logs
(stage.log). The recipes are the settings that made the README's rows; each run prints as the
three shell commands it runs (`python pruning.py config/<recipe>.py --seed=...`), so a row can
be reproduced by hand too.
"""
import concurrent.futures
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import util  # noqa: E402
from models import file_stem  # noqa: E402
from results_table import replace_block, row, table, this_machine  # noqa: E402

# -----------------------------------------------------------------------------
recipes = ["lenet5_caffe", "lenet5_caffe_iterative", "lenet_300_100", "lenet_300_100_iterative", "lenet5"]
                            # (and resnet20, on CIFAR-10: data_root must hold CIFAR10/ too)
                            # which recipes to run (files {recipe_dir}/<recipe>.py), longest first for jobs > 1
recipe_dir = "config"       # the recipe files, which the stage scripts read too
seeds = 1                   # runs per model, with seeds 0..seeds-1 (training and k-means)
data_root = "data"          # folder holding MNIST/raw (downloaded into if absent)
out_dir = "out/bench"       # runs go to {out_dir}/{recipe}/seed{N}
jobs = 1                    # pipelines run at once
threads = 0                 # torch threads per pipeline (0 = cores / jobs)
readme = "README.md"        # whose table between the result markers is replaced ('' = leave it)
out = "bench/results/results.json"  # the rows, per seed and per model
hardware = ""               # what this invocation's runs ran on ('' = this machine's CPU and core count); each
                            # run keeps its own in the results, so rows from another machine stay labelled
dry_run = False             # print the commands only
reuse = False               # keep what a run's folder already holds: each stage whose summary (and those of the
                            # stages before it) was made with the recipe's settings and seed is not run again
ship = "bench/results/dc"   # each run's .dc file is copied here as {recipe}-seed{N}.dc, its sha256 recorded
                            # (bench/verify.py checks them); '' = not shipped
overrides = {}              # {stage: {setting: value}} over the recipe for every run: collecting runs that took
                            # an earlier dense network, e.g. "{'pruning': {'restart_epochs': 0}}"; '{seed}' in a
                            # string becomes the run's seed: "{'pruning': {'init_from': 'out/a/seed{seed}/x.pt'}}"
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# Recipes are the files config/<recipe>.py (a stage given `--model=X` runs config/X.py). Four
# kinds: '<model>' is ours, past the paper; '<model>_iterative' is the paper's method (Han 2015
# iterative pruning, no augmentation) with our bits and shared biases; '<model>_ttq' is trained
# ternary quantization (Zhu et al. 2017) of the same dense network; '<model>_auto' is the
# automatic recipe (max_drop: densities and bits searched on validation).
ORDER = ("lenet_300_100", "lenet_300_100_ratio", "lenet_300_100_tiny", "lenet_300_100_iterative", "lenet_300_100_auto",
         "lenet5_caffe", "lenet5_caffe_ratio", "lenet5_caffe_tiny", "lenet5_caffe_iterative", "lenet5_caffe_ttq",
         "lenet5", "resnet20", "resnet20_ttq", "resnet20_auto", "resnet18", "mobilenet_v2", "shufflenet_v2_auto")


def read_recipes(folder):
    """{recipe name: {stage: settings}} of the recipe files in `folder`, in the table's order."""
    names = [n[:-3] for n in os.listdir(folder) if n.endswith(".py")] if os.path.isdir(folder) else []
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {n: util.read_recipe(os.path.join(folder, n + ".py")) for n in names}


STAGES = util.STAGES


def for_seed(overrides, seed):
    """`overrides` ({stage: {setting: value}}) with '{seed}' in each string value replaced by
    the seed: each seed of a recipe can prune its own earlier dense network."""
    return {stage: {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in settings.items()}
            for stage, settings in (overrides or {}).items()}


def commands(recipe, seed, cfg, overrides=None, folder=None, stages=STAGES):
    """The stage commands (argv lists) of one run of a recipe, and its folder: each stage reads
    config/<recipe>.py, then this run's seed, folder and `overrides` ({stage: {setting: value}},
    '{seed}' in a string the seed)."""
    folder = folder or os.path.join(cfg["out_dir"], recipe, f"seed{seed}")
    overrides = for_seed(overrides, seed)
    path = os.path.relpath(os.path.join(cfg["recipe_dir"], recipe + ".py"))
    # A training stage killed earlier continues from its resume state (a finished one left none).
    per_stage = dict(pruning=dict(data_root=cfg["data_root"], seed=seed, resume=True),
                     quantization=dict(data_root=cfg["data_root"], seed=seed, resume=True), huffman_encode={})
    argv = []
    for stage in stages:
        script = os.path.relpath(os.path.join(ROOT, f"{stage}.py"))
        settings = {**per_stage[stage], "out_dir": folder, **(overrides or {}).get(stage, {})}
        argv.append([sys.executable, script, path] + [f"--{k}={v}" if isinstance(v, str) else f"--{k}={v!r}"
                                                       for k, v in settings.items()])
    return folder, argv


def shell(argv):
    """argv as a line to paste into a shell."""
    quote = lambda a: f'"{a}"' if any(c in a for c in " {}'[]") else a  # noqa: E731
    return " ".join(["python"] + [quote(a) for a in argv[1:]])


SUMMARIES = dict(pruning="pruned", quantization="quantized", huffman_encode="compressed")


def stages_done(folder, recipe, seed, overrides=None):
    """How many of the three stages, from the first, `folder` holds the JSON summaries of, made
    with this recipe's settings ({stage: settings}), these overrides and this seed (0..3)."""
    model = file_stem(recipe["pruning"]["model"])
    for done, (stage, suffix) in enumerate(SUMMARIES.items()):
        try:
            got = json.load(open(os.path.join(folder, f"{model}_{suffix}.json")))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            return done
        want = {**recipe[stage], **for_seed(overrides, seed).get(stage, {}),
                **({} if stage == "huffman_encode" else {"seed": seed})}
        if any(got.get(k) != v for k, v in want.items()):
            return done
    return len(SUMMARIES)


def run_stages(name, argv, folder, model, threads):
    """Run stage commands one after the other, their output to {folder}/stage.log. Returns the
    result row of the folder, with each stage process's wall time in stage_seconds."""
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    seconds = {}
    with open(os.path.join(folder, "stage.log"), "w") as log:
        for cmd in argv:
            stage = os.path.basename(cmd[1])[:-3]
            log.write(f"$ {shell(cmd)}\n")
            log.flush()
            t0 = time.time()
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            seconds[stage] = round(time.time() - t0, 1)
            if done.returncode:
                raise util.UserError(f"{name}: {stage}.py failed (exit {done.returncode}); "
                                     f"see {os.path.join(folder, 'stage.log')}")
    r = row(folder, model)
    print(f"{name}: error {r['error']['decoded']:.2f}% (validation {r['val_error']:.2f}%) at {r['ratio']:.1f}x "
          f"({r['compressed_bytes']:,} bytes), {sum(seconds.values()) / 60:.1f} min", flush=True)
    return {**r, "stage_seconds": seconds}


def run_one(recipe, seed, cfg, threads, recipes):
    """Run one recipe's pipeline for one seed. Returns the result row (stage_seconds None for
    a reused run)."""
    folder, argv = commands(recipe, seed, cfg, cfg["overrides"])
    model = file_stem(recipes[recipe]["pruning"]["model"])
    done = stages_done(folder, recipes[recipe], seed, cfg["overrides"]) if cfg["reuse"] else 0
    if done == len(STAGES):
        r = row(folder, model)
        print(f"{recipe} seed {seed}: reused {folder}: error {r['error']['decoded']:.2f}% at {r['ratio']:.1f}x",
              flush=True)
        return {**r, "recipe": recipe, "seed": seed, "stage_seconds": None, "reused": True}
    if done:  # the stages after the last one finished (delete a summary to run its stage again)
        print(f"{recipe} seed {seed}: keeps {', '.join(STAGES[:done])} of {folder}", flush=True)
    return {**run_stages(f"{recipe} seed {seed}", argv[done:], folder, model, threads), "recipe": recipe,
            "seed": seed}


def ship_file(run, folder):
    """Copy a run's compressed file to {folder}/{recipe}-seed{N}.dc -> the run with its 'file'
    (relative to the project where it lies inside it) and 'sha256'."""
    with open(os.path.join(run["folder"], f"{run['model']}.dc"), "rb") as f:
        blob = f.read()
    dest = os.path.abspath(os.path.join(folder, f"{run['recipe']}-seed{run['seed']}.dc"))
    util.write_bytes(dest, blob)
    inside = os.path.commonpath([dest, ROOT]) == ROOT
    return {**run, "file": os.path.relpath(dest, ROOT) if inside else dest, "sha256": hashlib.sha256(blob).hexdigest()}


def summarise(runs):
    """One row per recipe from its seeds' rows: means, with the spread of the decoded error
    and the ratio over seeds (sample standard deviation; 0 for one seed)."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == recipe]
        mean = lambda f: statistics.fmean(f(r) for r in rs)  # noqa: E731
        sd = lambda f: statistics.stdev(f(r) for r in rs) if len(rs) > 1 else 0.0  # noqa: E731
        out.append(dict(
            model=rs[0]["model"], recipe=recipe, seeds=len(rs), params=rs[0]["params"], device=rs[0]["device"],
            error={k: mean(lambda r: r["error"][k]) for k in rs[0]["error"]},
            error_sd=sd(lambda r: r["error"]["decoded"]), alive=mean(lambda r: r["alive"]),
            val_error=mean(lambda r: r["val_error"]) if all(r.get("val_error") is not None for r in rs) else None,
            dense_bytes=rs[0]["dense_bytes"], compressed_bytes=round(mean(lambda r: r["compressed_bytes"])),
            ratio=mean(lambda r: r["ratio"]), ratio_sd=sd(lambda r: r["ratio"]), epochs=rs[0]["epochs"],
            minutes=mean(lambda r: r["minutes"]), hardware=rs[0]["hardware"]))
    return out


def main(cfg):
    recipes = read_recipes(cfg["recipe_dir"])
    unknown = [m for m in cfg["recipes"] if m not in recipes]
    util.require(not unknown, f"no recipe {unknown} in {cfg['recipe_dir']}; choose from {', '.join(recipes)}")
    util.require(cfg["seeds"] >= 1 and cfg["jobs"] >= 1, "seeds and jobs must be at least 1")
    todo = [(m, s) for m in cfg["recipes"] for s in range(cfg["seeds"])]
    util.require(set(cfg["overrides"]) <= set(STAGES), f"overrides: stages are {', '.join(STAGES)}")
    for recipe, seed in todo:
        print(f"# {recipe}, seed {seed}")
        for cmd in commands(recipe, seed, cfg, cfg["overrides"])[1]:
            print(shell(cmd))
    if cfg["dry_run"]:
        return
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // cfg["jobs"])
    hw = cfg["hardware"] or this_machine()
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        runs = [{**r, "hardware": hw} for r in pool.map(lambda job: run_one(*job, cfg, threads, recipes), todo)]
    if cfg["ship"]:
        runs = [ship_file(r, cfg["ship"]) for r in runs]
    # Runs of recipes not run this time stay in the results (and the table), so one recipe can
    # be rerun alone; the rows follow the order of the recipes.
    if os.path.isfile(cfg["out"]):
        before = json.load(open(cfg["out"]))
        kept = [{"hardware": before.get("hardware", hw), **r} for r in before.get("runs", [])
                if r.get("recipe") not in cfg["recipes"]]
        runs = sorted(kept + runs, key=lambda r: (list(recipes).index(r["recipe"]) if r["recipe"] in recipes
                                                  else len(recipes), r["seed"]))
    rows = summarise(runs)
    text = table(rows)
    print(text)
    util.write_json(cfg["out"], dict(rows=rows, runs=runs, jobs=cfg["jobs"], threads=threads,
                                     recipes={r: recipes[r] for r in dict.fromkeys(x["recipe"] for x in runs)
                                              if r in recipes}))
    if cfg["readme"]:
        replace_block(cfg["readme"], text)
    print(f"wrote {cfg['out']}" + (f" and the table in {cfg['readme']}" if cfg["readme"] else ""))


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
