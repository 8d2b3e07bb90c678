"""Benchmark: how long a recipe's three stages take on this machine, from a short real run.

    python bench/recipe_time.py --recipe=resnet20 --data_root=../shared/data

A whole ResNet-20 recipe is 140 epochs; timing it end to end holds the machine for an hour
and a half. Instead the three stage processes run for real, the recipe's own commands
(bench/pipeline.py's), with each training phase cut to `short` epochs: data loading, k-means,
batch-norm folding, coding and every test and validation pass are in their wall time. Each
phase's last epoch (its training and its validation pass, as util.fit times them) times the
epochs the recipe has left then adds the rest. Run it on an idle machine: the figure is the
recipe's time there. Prints the phases and writes bench/results/recipe_time_{recipe}.json with
the CPU model.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402
from pipeline import SUMMARIES, commands, read_recipes, run_stages  # noqa: E402

# -----------------------------------------------------------------------------
recipe = "resnet20"         # a recipe file config/<recipe>.py
recipe_dir = "config"       # where the recipe files are
data_root = "data"          # folder holding the recipe's data set
out_dir = "out/recipe_time"  # scratch folder for the short run (its checkpoints are not kept apart)
threads = 0                 # torch threads (0 = one per core)
short = 2                   # epochs each training phase runs for real (the warm restart: 1)
out = ""                    # where the figures go ('' = bench/results/recipe_time_{recipe}.json)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# (stage, epoch setting, history key of util.fit's per-epoch records, phase name)
PHASES = [("pruning", "epochs", "train", "dense"), ("pruning", "restart_epochs", "restart", "warm restart"),
          ("pruning", "retrain_epochs", "retrain", "retraining"),
          ("quantization", "finetune_epochs", "finetune", "fine-tuning")]


def shortened(settings, short):
    """{stage: {setting: epochs}} cutting each of the recipe's ({stage: settings}) training
    phases to `short` epochs (the warm restart to 1), leaving phases the recipe does not run at 0."""
    cut = {}
    for stage, key, _, _ in PHASES:
        full = settings[stage].get(key, 0)
        if full:
            cut.setdefault(stage, {})[key] = min(full, 1 if key == "restart_epochs" else short)
    return cut


def main(cfg):
    recipes = read_recipes(cfg["recipe_dir"])
    util.require(cfg["recipe"] in recipes, f"no recipe {cfg['recipe']!r} in {cfg['recipe_dir']}; "
                                           f"choose from {', '.join(recipes)}")
    util.require(cfg["short"] >= 1, f"short must be at least 1, got {cfg['short']}")
    settings = recipes[cfg["recipe"]]
    model = settings["pruning"]["model"]
    folder, argv = commands(cfg["recipe"], 0, cfg, shortened(settings, cfg["short"]), folder=cfg["out_dir"])
    threads = cfg["threads"] or os.cpu_count() or 1
    machine = dict(cpu=util.cpu_model(), cores=os.cpu_count(), threads=threads)
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores), {threads} torch thread(s); recipe {cfg['recipe']}")
    stage_seconds = run_stages(f"{cfg['recipe']} (short run)", argv, folder, model, threads)["stage_seconds"]
    for stage, seconds in stage_seconds.items():
        print(f"{stage:15} {seconds / 60:5.1f} min (short run)", flush=True)
    summaries = {s: json.load(open(os.path.join(folder, f"{model}_{SUMMARIES[s]}.json"))) for s in ("pruning",
                                                                                                    "quantization")}
    phases, rest = {}, 0.0
    for stage, key, history_key, name in PHASES:
        full = settings[stage].get(key, 0) * (settings["pruning"].get("prune_iterations", 1)
                                              if key == "retrain_epochs" else 1)
        runs = [h for k, h in summaries[stage]["history"].items() if k.startswith(history_key)]
        if not full or not runs:
            continue
        done = sum(len(h) for h in runs)
        last = runs[-1][-1]["seconds"]
        phases[name] = dict(epochs_run=done, recipe_epochs=full, last_epoch_seconds=last)
        rest += (full - done) * last
        print(f"{name:15} {done} epoch(s) run, the last {last:6.1f} s; the recipe's {full}: "
              f"+ {(full - done) * last / 60:5.1f} min", flush=True)
    total = (sum(stage_seconds.values()) + rest) / 60
    print(f"{cfg['recipe']}: {total:.1f} minutes for the whole recipe on this machine "
          f"({sum(stage_seconds.values()) / 60:.1f} min of stage processes run, {rest / 60:.1f} min scaled up)")
    path = cfg["out"] or f"bench/results/recipe_time_{cfg['recipe']}.json"
    util.write_json(path, dict(machine=machine, recipe=cfg["recipe"], settings=cfg, stage_seconds=stage_seconds,
                               phases=phases, minutes=total))
    print(f"wrote {path}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
