"""Choose a recipe's levers on the validation split, and record what each one bought.

    python bench/levers.py --recipe=lenet_300_100 --data_root=../shared/data --jobs=2

Runs the recipe (config/<recipe>.py as it stands, seed 0: round 0), then rounds of variants, each changing one lever
of the best run so far; a variant that changes stage-1 settings prunes the recipe's dense
network again (init_from), one that changes only stage 2 starts from the best run's stage-1
network. After each round the best run is the one with the highest compression ratio whose
decoded *validation* error is within the recipe's budget; the test set is reported for every
finished run and never read by the choice. Writes bench/results/levers_<recipe>.json and the
table between the `<!-- levers:<recipe>:begin/end -->` markers of docs/experiments.md; the chosen settings
are then written into config/<recipe>.py by hand (the script prints them).
"""
import concurrent.futures
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import util  # noqa: E402
from pipeline import commands, read_recipes, run_stages, stages_done  # noqa: E402
from results_table import replace_block, row, this_machine  # noqa: E402

# -----------------------------------------------------------------------------
recipe = "lenet_300_100"    # which recipe's levers to run (a key of LEVERS below)
data_root = "data"          # folder holding MNIST/raw (downloaded into if absent)
recipe_dir = "config"       # the recipe files
out_dir = "out/levers"      # runs go to {out_dir}/{recipe}/<variant> (give each seed its own)
seed = 0                    # the runs' seed (the choice is made on seed 0; other seeds repeat it)
jobs = 2                    # runs at once within a round
threads = 0                 # torch threads per run (0 = cores / jobs)
doc = "docs/experiments.md"  # whose lever table for this recipe is replaced ('' = leave it)
out = ""                    # the JSON ('' = bench/results/levers_{recipe}.json)
reuse = False               # keep a run whose folder holds summaries made with the same settings
render = False              # only rewrite the doc's table from the recorded JSON (no runs)
base = ""                   # a stage-1 run folder of the recipe (seed 0) to start from: the recipe's stages 2-3
                            # quantize its network, stage-1 levers prune its dense network ('' = run stage 1 too)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# Per recipe: the budget, as points of decoded validation error over the dense network's
# (over_dense; or an absolute `budget` in percent), and the rounds of variants, {label: {stage:
# {setting: value}}} on top of the best run so far. The MNIST recipes allow 0.3 points (the
# paper's LeNets lost none; the goals allowed about that much), ResNet-20 1 point (its goal;
# one variant only, for the CPU time it had).
LEVERS = {
    "lenet_300_100": dict(over_dense=0.3, rounds=[
        {"surgery at sensitivity 2.4 (fc3 1.2)": dict(pruning=dict(sensitivity={"*": 2.4, "fc3": 1.2})),
         "surgery at sensitivity 3.2 (fc3 1.6)": dict(pruning=dict(sensitivity={"*": 3.2, "fc3": 1.6})),
         "surgery at sensitivity 3.6 (fc3 1.8)": dict(pruning=dict(sensitivity={"*": 3.6, "fc3": 1.8})),
         "no augmentation": dict(pruning=dict(augment="none"))},
        {"4-bit fc1": dict(quantization=dict(bits={"*": 4})),
         "3-bit fc1 and fc2": dict(quantization=dict(bits={"fc1": 3, "fc2": 3, "*": 4})),
         "float32 biases": dict(quantization=dict(bias_bits={"*": 0}))}]),
    "lenet5_caffe": dict(over_dense=0.3, rounds=[
        {"sensitivities x 1.1": dict(pruning=dict(sensitivity={"conv1": 1.32, "conv2": 2.64, "fc1": 3.96,
                                                               "fc2": 2.53})),
         "sensitivities x 1.2": dict(pruning=dict(sensitivity={"conv1": 1.44, "conv2": 2.88, "fc1": 4.32,
                                                               "fc2": 2.76}))},
        {"4-bit convs": dict(quantization=dict(bits={"conv": 4, "fc1": 3, "*": 4})),
         "3-bit fc2": dict(quantization=dict(bits={"conv": 5, "*": 3}))}]),
    # ResNet-20: the goal is the decoded model within 1 point of the dense one.
    "resnet20": dict(over_dense=1.0, rounds=[
        {"3-bit convs, batch-norm shared among 64 values, 10 epochs of fine-tuning": dict(quantization=dict(
            bits={"conv": 3, "fc": 5}, bn_bits=6, finetune_epochs=10))}]),
}


def select(runs, budget):
    """The run to keep: the highest ratio among runs whose decoded validation error
    (val_error) is at most `budget`; if none is, the lowest validation error. Test error is
    not looked at."""
    within = [r for r in runs if r["val_error"] <= budget]
    if within:
        return max(within, key=lambda r: (r["ratio"], -r["val_error"]))
    return min(runs, key=lambda r: r["val_error"])


def merge(base, change):
    """{stage: settings} overrides `base` with `change` applied on top."""
    return {stage: {**base.get(stage, {}), **change.get(stage, {})} for stage in util.STAGES
            if base.get(stage) or change.get(stage)}


def slug(label):
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def lever_table(runs, chosen, budget):
    """Markdown: one row per run, validation beside test; the chosen run in bold."""
    lines = ["| round: lever (a change to the best run so far) | validation error | test error | bytes | ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        bold = "**" if r["label"] == chosen else ""
        lines.append(f"| {r['round']}: {bold}{r['label']}{bold} | {bold}{r['val_error']:.2f}%{bold} "
                     f"| {r['error']['decoded']:.2f}% | {r['compressed_bytes']:,} | {r['ratio']:.1f}x |")
    best = next(r for r in runs if r["label"] == chosen)
    rule = (f"the highest ratio at most {budget:.2f}% decoded validation error" if best["val_error"] <= budget else
            f"no run was within {budget:.2f}% decoded validation error, so the lowest validation error")
    lines.append(f"\nChosen on validation ({rule}): **{chosen}**.")
    return "\n".join(lines)


def markers(name):
    """The begin and end markers of recipe `name`'s lever table."""
    return f"<!-- levers:{name}:begin -->", f"<!-- levers:{name}:end -->"


def main(cfg):
    out = cfg["out"] or os.path.join(HERE, "results", f"levers_{cfg['recipe']}.json")
    if cfg["render"]:
        util.require(os.path.isfile(out), f"no {out}: run bench/levers.py --recipe={cfg['recipe']} first")
        done = json.load(open(out))
        text = lever_table(done["runs"], done["chosen"], done["budget"])
        print(text)
        if cfg["doc"]:
            replace_block(cfg["doc"], text, *markers(cfg["recipe"]))
        return
    util.require(cfg["recipe"] in LEVERS, f"no levers for {cfg['recipe']!r}; choose from {', '.join(LEVERS)}")
    recipes = read_recipes(cfg["recipe_dir"])
    util.require(cfg["recipe"] in recipes, f"no recipe {cfg['recipe']}.py in {cfg['recipe_dir']}")
    name, levers = cfg["recipe"], LEVERS[cfg["recipe"]]
    recipe, model = recipes[name], recipes[name]["pruning"]["model"]
    threads = cfg["threads"] or max(1, (os.cpu_count() or 1) // cfg["jobs"])
    root = os.path.join(cfg["out_dir"], name)

    def run(label, round_, overrides, prune_again=True, start_from=None):
        # A run that changes stage-1 settings prunes the recipe's dense network again; one that
        # changes stage 2 only starts from `start_from`'s stage-1 network.
        stages = util.STAGES if prune_again else util.STAGES[1:]
        settings = merge(overrides, dict(pruning=dict(init_from=dense))) if prune_again and dense else overrides
        folder, argv = commands(name, cfg["seed"], cfg, settings, os.path.join(root, slug(label)), stages)
        if cfg["reuse"] and stages_done(folder, recipe, cfg["seed"], settings) == len(util.STAGES):
            result = row(folder, model)
        else:
            if start_from:
                os.makedirs(folder, exist_ok=True)
                for suffix in ("_pruned.pt", "_pruned.json"):
                    shutil.copyfile(os.path.join(start_from, model + suffix), os.path.join(folder, model + suffix))
            result = run_stages(f"{name}: {label}", argv, folder, model, threads)
        return {**result, "label": label, "round": round_, "overrides": overrides}

    dense = None
    if cfg["base"]:
        util.require(os.path.isfile(os.path.join(cfg["base"], model + "_pruned.pt")),
                     f"no {model}_pruned.pt in {cfg['base']}: give base a stage-1 run folder of {name}")
        best = run("the recipe", 0, {}, prune_again=False, start_from=cfg["base"])
    else:
        best = run("the recipe", 0, {})
    runs, dense = [best], os.path.join(cfg["base"] or best["folder"], model + "_initial.pt")
    budget = levers.get("budget")
    if budget is None:  # relative to the dense network's validation error
        stage1 = json.load(open(os.path.join(best["folder"], model + "_pruned.json")))["validation"]
        budget = 100 - stage1.get("dense", stage1.get("initial")) + levers["over_dense"]
    for round_, variants in enumerate(levers["rounds"], 1):
        todo = [(label, round_, merge(best["overrides"], change), "pruning" in change,
                 None if "pruning" in change else best["folder"]) for label, change in variants.items()]
        with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
            done = list(pool.map(lambda job: run(*job), todo))
        runs += done
        best = select([best] + done, budget)
        print(f"round {round_}: best on validation: {best['label']} ({best['val_error']:.2f}% validation, "
              f"{best['ratio']:.1f}x)", flush=True)

    text = lever_table(runs, best["label"], budget)
    print(text)
    print(f"chosen settings on top of config/{name}.py: {json.dumps(best['overrides'])}")
    util.write_json(out,
                    dict(recipe=name, start=recipe, budget=budget, chosen=best["label"], overrides=best["overrides"],
                         runs=runs, hardware=this_machine()))
    if cfg["doc"]:
        replace_block(cfg["doc"], text, *markers(name))


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
