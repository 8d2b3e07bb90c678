"""Benchmark: what resuming costs (training.Progress): the seconds one resume state takes to
write at the end of an epoch, and its bytes on disk, for a network in the middle of stage 1
(two phases finished, surgery under way: three networks, SGD's momentum, the random states).

    python bench/bench_resume.py                     # ResNet-20 on CIFAR-10's shape
    python bench/bench_resume.py --model=lenet_300_100

The write is timed `repeats` times after one untimed write (the best and the median kept), and
set beside an epoch of the recipe on this kind of machine where bench/results/recipe_time_<model>.json
holds one (bench/recipe_time.py). Prints the figures and writes bench/results/resume_<model>.json
with the CPU model.
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402
import util  # noqa: E402
from datasets import DATASETS, Batches  # noqa: E402
from models import build_model  # noqa: E402

# -----------------------------------------------------------------------------
model = "resnet20"          # a network of models.MODELS
dataset = "cifar10"         # its data set's shape (mnist | cifar10)
repeats = 20                # timed writes
out = ""                    # where the figures go ('' = bench/results/resume_<model>.json)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def main(cfg):
    torch.manual_seed(0)
    shape, classes = DATASETS[cfg["dataset"]][:2]
    net = build_model(cfg["model"], in_shape=list(shape), num_classes=classes)
    x = torch.randint(0, 256, (64, *shape), dtype=torch.uint8)
    train = Batches(x, torch.randint(0, classes, (64,)), 32, (0.5,) * shape[0], (0.25,) * shape[0], shuffle=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for xb, yb in train:  # one step, so that the optimizer holds its momentum buffers
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
        sched.step()
        break
    history = [dict(epoch=1, train_loss=0.1, train_acc=90.0, val_loss=0.2, val_acc=88.0, seconds=30.0)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state.pt")
        progress = training.Progress(path, dict(model=cfg["model"]), resume=False)
        for label in ("train", "restart"):  # two phases finished, their networks kept
            progress.end_epoch(label, 1, 1, net, opt, sched, train, None, history)
        seconds = []
        for i in range(cfg["repeats"] + 1):
            t0 = time.perf_counter()
            progress.end_epoch("retrain1", 1, 30, net, opt, sched, train, None, history)
            seconds.append(time.perf_counter() - t0)
        size = os.path.getsize(path)
    seconds = seconds[1:]
    result = dict(model=cfg["model"], cpu=util.cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                  bytes=size, best_s=min(seconds), median_s=statistics.median(seconds), repeats=cfg["repeats"])
    recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"recipe_time_{cfg['model']}.json")
    line = ""
    if os.path.isfile(recipe):
        with open(recipe) as f:
            recorded = json.load(f)
        epoch = recorded["phases"]["retraining"]["last_epoch_seconds"]
        result.update(epoch_s=epoch, epoch_machine=recorded["machine"], share=result["median_s"] / epoch)
        line = (f"; a surgery epoch of the recipe took {epoch:.1f} s ({recorded['machine']['cpu']}): "
                f"{100 * result['share']:.3f}% of it")
    print(f"{cfg['model']}: a resume state of {size:,} bytes written in {1e3 * result['median_s']:.1f} ms "
          f"(median of {cfg['repeats']}, best {1e3 * result['best_s']:.1f} ms){line}; {result['cpu']}, "
          f"{result['cores']} cores")
    util.write_json(cfg["out"] or os.path.join(os.path.dirname(recipe), f"resume_{cfg['model']}.json"), result)


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
