"""Benchmark: one training epoch of a stage in one process against the same epoch on several
torchrun ranks, the global batch the same.

    python bench/bench_distributed.py --data_root=../shared/data

Runs pruning.py's dense training for `epochs` epochs three ways on the same data: one process
with `threads` torch threads and batch `batch_size`; `ranks` processes under torchrun (gloo,
one thread each, batch `batch_size / ranks` each); and one process with one thread (what each
rank has). Reads the epoch times (training and the validation pass) from the stages' JSON
summaries, keeps each run's fastest epoch, and writes bench/results/distributed.json with the
CPU model. Each run writes to a temporary folder that is removed afterwards.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
model = "lenet5"            # a model with a recipe in config/ (its data set is the recipe's)
data_root = "data"          # folder holding the data set
epochs = 2                  # dense epochs per run; the fastest is kept (the first warms up)
batch_size = 128            # global batch: one process takes it whole, each rank batch_size / ranks
ranks = 2                   # torchrun processes
threads = 2                 # torch threads of the single process (the ranks have one each)
out = "bench/results/distributed.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def epoch_seconds(folder, cfg, launcher, threads, batch):
    """Run pruning.py's dense training in `folder` with `launcher` ([] or torchrun's argv)
    -> the fastest epoch's seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    argv = launcher + [os.path.join(ROOT, "pruning.py"), f"--model={cfg['model']}",
                       f"--data_root={os.path.abspath(cfg['data_root'])}", f"--out_dir={folder}",
                       f"--epochs={cfg['epochs']}", "--retrain_epochs=0", f"--batch_size={batch}", "--device=cpu"]
    done = subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise util.UserError(f"pruning.py failed ({' '.join(launcher) or 'one process'}): "
                             f"{done.stderr.strip().splitlines()[-1]}")
    summary = json.load(open(os.path.join(folder, f"{cfg['model']}_pruned.json")))
    return min(h["seconds"] for h in summary["history"]["train"])


def main(cfg):
    util.require(cfg["ranks"] >= 2 and cfg["batch_size"] % cfg["ranks"] == 0,
                 f"ranks must be >= 2 and divide batch_size, got {cfg['ranks']} and {cfg['batch_size']}")
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg['ranks']}"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, launcher, threads, batch in (
                (f"1 process x {cfg['threads']} threads", [], cfg["threads"], cfg["batch_size"]),
                (f"{cfg['ranks']} ranks x 1 thread", torchrun, 1, cfg["batch_size"] // cfg["ranks"]),
                ("1 process x 1 thread", [], 1, cfg["batch_size"])):
            runs[label] = epoch_seconds(os.path.join(tmp, str(len(runs))), cfg, launcher, threads, batch)
            print(f"{label:24} {runs[label]:6.2f} s an epoch (global batch {cfg['batch_size']})", flush=True)
    labels = list(runs)
    result = dict(machine=dict(cpu=util.cpu_model(), cores=os.cpu_count()), model=cfg["model"], epochs=cfg["epochs"],
                  batch_size=cfg["batch_size"], ranks=cfg["ranks"], epoch_seconds=runs,
                  ranks_over_one_process=runs[labels[1]] / runs[labels[0]],
                  ranks_over_one_thread=runs[labels[1]] / runs[labels[2]])
    print(f"CPU: {result['machine']['cpu']} ({os.cpu_count()} cores); {labels[1]} takes "
          f"{result['ranks_over_one_process']:.2f}x the time of {labels[0]}, "
          f"{result['ranks_over_one_thread']:.2f}x that of {labels[2]}")
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
