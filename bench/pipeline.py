"""Run the whole pipeline, pruning.py -> quantization.py -> huffman_encode.py, for each model
from the recipes below, for one or more seeds; then write bench/results/results.json and
regenerate the README's results table from the stages' JSON summaries.

    python bench/pipeline.py --data_root=../shared/data                     # every recipe, seed 0
    python bench/pipeline.py --recipes="['lenet_300_100']" --seeds=3 --jobs=2

Each run goes to {out_dir}/{recipe}/seed{N}/ with the three stages' checkpoints, JSON and logs
(stage.log). The recipes are the settings that made the README's rows; each prints as the
three shell commands it runs, so a row can be reproduced by hand too.
"""
import concurrent.futures
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
from results_table import replace_block, row, table, this_machine  # noqa: E402

# -----------------------------------------------------------------------------
recipes = ["lenet5_caffe", "lenet5_caffe_iterative", "lenet_300_100", "lenet_300_100_iterative", "lenet5"]
                            # (and resnet20, on CIFAR-10: data_root must hold CIFAR10/ too)
                            # which recipes to run (keys of RECIPES), longest first for jobs > 1
seeds = 1                   # runs per model, with seeds 0..seeds-1 (training and k-means)
data_root = "data"          # folder holding MNIST/raw (downloaded into if absent)
out_dir = "out/bench"       # runs go to {out_dir}/{recipe}/seed{N}
jobs = 1                    # pipelines run at once
threads = 0                 # torch threads per pipeline (0 = cores / jobs)
readme = "README.md"        # whose table between the result markers is replaced ('' = leave it)
out = "bench/results/results.json"  # the rows, per seed and per model
hardware = ""               # what the runs ran on ('' = this machine's CPU and core count)
dry_run = False             # print the commands only
reuse = False               # keep a run whose folder already holds the three summaries, made with the recipe's
                            # settings and seed, instead of running it again (resume; add seeds to a table)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# The settings of each stage per recipe, on top of the scripts' defaults. Two kinds:
# '<model>': ours, past the paper: 2-pixel shift augmentation, dynamic network surgery (one
#   prune -> splice cycle from the dense network), 3-5 bit layers, shared biases;
# '<model>_iterative': the paper's method (Han 2015 iterative pruning, no augmentation) with
#   our bits and shared biases.
# Sensitivities come from the scans in bench/results/sensitivity_*.json (README "Levers").
# The MNIST rows were measured in float32 (precision='fp32' keeps them reproducible on a CPU
# where 'auto' would pick bf16).
SGD = dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, precision="fp32")
DNS = dict(augment="shift", prune_method="dns", retrain_lr=0.01)
LENET300_BITS = dict(bits={"fc1": 3, "*": 4}, bias_bits={"*": 5}, finetune_epochs=10, lr=3e-4, precision="fp32")
LENET5_BITS = dict(bits={"conv": 5, "fc1": 3, "*": 4}, bias_bits={"*": 5}, precision="fp32")
# ResNet-20 on CIFAR-10 (He et al. 2016 section 4.2's schedule, shortened for 2 CPU cores):
# SGD + Nesterov, lr 0.1 with a cosine decay, weight decay 5e-4, crop + flip, 60 epochs, bf16
# where the CPU runs it fast ('auto'). Sensitivities from bench/sensitivity.py on the dense
# network's validation split (bench/results/sensitivity_resnet20.json).
CIFAR = dict(dataset="cifar10", optimizer="sgd", lr=0.1, weight_decay=5e-4, epochs=60)
RESNET20_BITS = dict(bits={"conv": 4, "fc": 5})  # chosen on validation over 3-bit convs (README)


def recipe(model, pruning, quantization):
    """Each stage's settings for `model` (named once, in all three)."""
    return dict(pruning=dict(model=model, **pruning), quantization=dict(model=model, **quantization),
                huffman_encode=dict(model=model))


RECIPES = {
    "lenet_300_100": recipe("lenet_300_100", dict(**SGD, **DNS, retrain_epochs=30,
                                                  sensitivity={"*": 2.8, "fc3": 1.4}), LENET300_BITS),
    "lenet_300_100_iterative": recipe("lenet_300_100", dict(**SGD, retrain_lr=0.005, prune_iterations=3,
                                                            sensitivity={"*": 0.8, "fc3": 0.5}), LENET300_BITS),
    "lenet5_caffe": recipe("lenet5_caffe", dict(**SGD, **DNS, retrain_epochs=25, sensitivity={
        "conv1": 1.2, "conv2": 2.4, "fc1": 3.6, "fc2": 2.3}), LENET5_BITS),
    "lenet5_caffe_iterative": recipe("lenet5_caffe", dict(**SGD, retrain_lr=0.005, epochs=15, retrain_epochs=10,
                                                          prune_iterations=2, sensitivity={
        "conv1": 0.3, "conv2": 0.8, "fc1": 1.05, "fc2": 0.6}), LENET5_BITS),
    "lenet5": recipe("lenet5", dict(**SGD, **DNS, retrain_epochs=25, sensitivity={
        "conv1": 1.0, "conv": 2.0, "fc1": 2.9, "fc2": 1.9}), LENET5_BITS),
    # Sensitivities: bench/sensitivity.py --tolerance=10 on seed 0's dense network (each layer
    # at the largest sensitivity that, alone and without retraining, costs at most 10 points of
    # validation accuracy; 17% of the weights alive at the start of surgery). Evaluation in
    # minibatches of 250: at 1000, ResNet-20's activations (65 MB) are mapped and unmapped at
    # every call and evaluation runs 2.5x slower on the CPU.
    "resnet20": recipe("resnet20", dict(**CIFAR, test_batch_size=250, prune_method="dns", retrain_lr=0.02,
                                        retrain_epochs=30, sensitivity={
        "conv1": 1.25, "layer1.0.conv1": 1.5, "layer1.0.conv2": 2.0, "layer1.1.conv1": 2.0, "layer1.1.conv2": 3.0,
        "layer1.2.conv1": 1.0, "layer1.2.conv2": 1.25, "layer2.0.conv1": 1.25, "layer2.0.conv2": 1.75,
        "layer2.1.conv1": 1.5, "layer2.1.conv2": 2.0, "layer2.2.conv1": 1.0, "layer2.2.conv2": 3.0,
        "layer3.0.conv1": 1.25, "layer3.0.conv2": 1.25, "layer3.1.conv1": 1.25, "layer3.1.conv2": 1.5,
        "layer3.2.conv1": 1.0, "layer3.2.conv2": 1.5, "fc": 1.75}), RESNET20_BITS),
}
STAGES = ("pruning", "quantization", "huffman_encode")


def commands(recipe, seed, cfg):
    """The three stage commands (argv lists) of one run of a recipe, and its folder."""
    folder = os.path.join(cfg["out_dir"], recipe, f"seed{seed}")
    common = dict(out_dir=folder)
    per_stage = dict(pruning=dict(data_root=cfg["data_root"], seed=seed),
                     quantization=dict(data_root=cfg["data_root"], seed=seed), huffman_encode={})
    argv = []
    for stage in STAGES:
        settings = {**RECIPES[recipe][stage], **per_stage[stage], **common}
        script = os.path.relpath(os.path.join(ROOT, f"{stage}.py"))
        argv.append([sys.executable, script] + [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}"
                                                       for k, v in settings.items()])
    return folder, argv


def shell(argv):
    """argv as a line to paste into a shell."""
    quote = lambda a: f'"{a}"' if any(c in a for c in " {}'[]") else a  # noqa: E731
    return " ".join(["python"] + [quote(a) for a in argv[1:]])


SUMMARIES = dict(pruning="pruned", quantization="quantized", huffman_encode="compressed")


def finished(folder, recipe, seed):
    """Whether `folder` holds the three stages' JSON summaries and they were made with this
    recipe's settings and this seed."""
    model = RECIPES[recipe]["pruning"]["model"]
    for stage, suffix in SUMMARIES.items():
        try:
            got = json.load(open(os.path.join(folder, f"{model}_{suffix}.json")))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        want = {**RECIPES[recipe][stage], **({} if stage == "huffman_encode" else {"seed": seed})}
        if any(got.get(k) != v for k, v in want.items()):
            return False
    return True


def run_one(recipe, seed, cfg, threads):
    """Run one recipe's pipeline for one seed; the stages' output goes to stage.log. Returns
    the result row, with each stage's wall time (None for a reused run, whose minutes are
    the stages' own timings from their summaries)."""
    folder, argv = commands(recipe, seed, cfg)
    model = RECIPES[recipe]["pruning"]["model"]
    if cfg["reuse"] and finished(folder, recipe, seed):
        r = row(folder, model)
        print(f"{recipe} seed {seed}: reused {folder}: error {r['error']['decoded']:.2f}% at {r['ratio']:.1f}x",
              flush=True)
        return {**r, "recipe": recipe, "seed": seed, "stage_seconds": None, "reused": True}
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    seconds = {}
    with open(os.path.join(folder, "stage.log"), "w") as log:
        for stage, cmd in zip(STAGES, argv):
            log.write(f"$ {shell(cmd)}\n")
            log.flush()
            t0 = time.time()
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            seconds[stage] = round(time.time() - t0, 1)
            if done.returncode:
                raise util.UserError(f"{recipe} seed {seed}: {stage}.py failed (exit {done.returncode}); "
                                     f"see {os.path.join(folder, 'stage.log')}")
    r = row(folder, model)
    print(f"{recipe} seed {seed}: error {r['error']['decoded']:.2f}% at {r['ratio']:.1f}x "
          f"({r['compressed_bytes']:,} bytes), {sum(seconds.values()) / 60:.1f} min", flush=True)
    return {**r, "recipe": recipe, "seed": seed, "stage_seconds": seconds, "minutes": sum(seconds.values()) / 60}


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
            minutes=mean(lambda r: r["minutes"])))
    return out


def main(cfg):
    unknown = [m for m in cfg["recipes"] if m not in RECIPES]
    util.require(not unknown, f"no recipe {unknown}; choose from {', '.join(RECIPES)}")
    util.require(cfg["seeds"] >= 1 and cfg["jobs"] >= 1, "seeds and jobs must be at least 1")
    todo = [(m, s) for m in cfg["recipes"] for s in range(cfg["seeds"])]
    for recipe, seed in todo:
        print(f"# {recipe}, seed {seed}")
        for cmd in commands(recipe, seed, cfg)[1]:
            print(shell(cmd))
    if cfg["dry_run"]:
        return
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // cfg["jobs"])
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        runs = list(pool.map(lambda job: run_one(*job, cfg, threads), todo))
    # Runs of recipes not run this time stay in the results (and the table), so one recipe can
    # be rerun alone; the rows follow the order of RECIPES.
    if os.path.isfile(cfg["out"]):
        kept = [r for r in json.load(open(cfg["out"])).get("runs", []) if r.get("recipe") not in cfg["recipes"]]
        runs = sorted(kept + runs, key=lambda r: (list(RECIPES).index(r["recipe"]) if r["recipe"] in RECIPES
                                                  else len(RECIPES), r["seed"]))
    rows = summarise(runs)
    hw = cfg["hardware"] or this_machine()
    text = table(rows, hw)
    print(text)
    util.write_json(cfg["out"], dict(rows=rows, runs=runs, hardware=hw, jobs=cfg["jobs"], threads=threads,
                                     recipes={r: RECIPES[r] for r in dict.fromkeys(x["recipe"] for x in runs)
                                              if r in RECIPES}))
    if cfg["readme"]:
        replace_block(cfg["readme"], text)
    print(f"wrote {cfg['out']}" + (f" and the table in {cfg['readme']}" if cfg["readme"] else ""))


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
