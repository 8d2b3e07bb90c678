"""Benchmark: what masking, the training precision and the data path cost per training epoch.

    python bench/bench_training.py --data_root=../shared/data

In one run on one machine, for each model (LeNet-5 on MNIST, ResNet-20 on CIFAR-10 by default):
  1. masked layers (weight * mask) vs plain nn.Conv2d / nn.Linear with the same weights,
  2. in float32 and under bf16 autocast (conv networks in channels_last, as training.fit trains them),
and for the first MNIST model
  3. datasets.Batches (one in-memory uint8 tensor, batched indexing) vs a torch DataLoader that
     normalises image by image, over the same training images in the same order, with the
     same warm-up and repeats as the training steps.
Every configuration trains on the same minibatches: `warmup` untimed steps, then `steps` timed
steps, repeated `repeats` times; the best repeat is kept and scaled to one epoch of the 90%
training split. Prints the table and writes bench/results/training.json with the CPU model.
"""
import contextlib
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import training  # noqa: E402
import util  # noqa: E402
from models import build_model  # noqa: E402
from prune import MASKED  # noqa: E402

# -----------------------------------------------------------------------------
models = ["lenet5_caffe", "resnet20"]  # models of models.py; MNIST for LeNets, CIFAR-10 for ResNets
data_root = "data"          # folder holding MNIST/raw and CIFAR10/
batch_size = 128            # training minibatch
warmup = 5                  # untimed steps before each timed run (oneDNN picks and caches kernels)
steps = 30                  # timed steps per repeat
repeats = 3                 # timed repeats per configuration; the best is kept
threads = 0                 # torch threads (0 = torch's default: one per core)
out = "bench/results/training.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def unmasked(net):
    """Replace every masked layer by the plain nn.Linear / nn.Conv2d with the same weights."""
    for name, child in net.named_children():
        if isinstance(child, MASKED):
            child.__class__ = nn.Linear if isinstance(child, nn.Linear) else nn.Conv2d
            del child.mask  # same parameters; nothing multiplies them
        else:
            unmasked(child)
    return net


class PerImage(torch.utils.data.Dataset):
    """The textbook data path over the same uint8 images as datasets.Batches: one image at a
    time to float, normalised, then collated by a DataLoader."""

    def __init__(self, x, y, mean, std):
        self.x, self.y = x, y
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i].float() / 255 - self.mean) / self.std, self.y[i]


def time_steps(net, batches, precision, cfg):
    """Seconds per training step (SGD, as training.fit trains: autocast forward, float32 loss),
    the best of `repeats` runs of `steps` steps over the same minibatches after `warmup`."""
    fmt = training.memory_format(net)
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    source = iter(batches)
    stream = [next(source) for _ in range(cfg["warmup"] + cfg["steps"])]

    def run(chunk):
        for xb, yb in chunk:
            with amp():
                out = net(xb.contiguous(memory_format=fmt) if xb.dim() == 4 else xb)
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(stream[:cfg["warmup"]])
    return util.best_time(lambda: run(stream[cfg["warmup"]:]), cfg["repeats"])[0] / cfg["steps"]


def time_data_path(minibatches, cfg):
    """Seconds per minibatch that the iterable `minibatches()` makes: each repeat takes
    `warmup` untimed minibatches, then times `steps` more; the best of `repeats`."""
    def repeat():
        source = iter(minibatches())
        for _ in range(cfg["warmup"]):
            next(source)
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            next(source)
        return time.perf_counter() - t0
    return min(repeat() for _ in range(cfg["repeats"])) / cfg["steps"]


def main(cfg):
    unknown = [m for m in cfg["models"] if m not in ("lenet_300_100", "lenet5", "lenet5_caffe", "resnet20", "resnet56")]
    util.require(not unknown, f"models {unknown} have no data set here: use LeNets (MNIST) or resnet20/resnet56")
    util.require(cfg["steps"] >= 1 and cfg["repeats"] >= 1 and cfg["warmup"] >= 0, "steps, repeats >= 1, warmup >= 0")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cpu = torch.device("cpu")
    machine = dict(cpu=util.cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                   fast_bf16=util.cpu_has_fast_bf16(), torch=torch.__version__)
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores, {machine['threads']} torch threads, "
          f"AMX / AVX512-BF16: {machine['fast_bf16']}), torch {machine['torch']}")
    result = dict(machine=machine, batch_size=cfg["batch_size"], warmup=cfg["warmup"], steps=cfg["steps"],
                  repeats=cfg["repeats"], models={})
    data = {}
    for name in cfg["models"]:
        dataset = "cifar10" if name.startswith("resnet") else "mnist"
        if dataset not in data:
            data[dataset] = datasets.load_data(datasets.DataSpec(dataset, cfg["data_root"], cfg["batch_size"]), cpu)[0]
        train = data[dataset]
        per_epoch = len(train)
        rows = {}
        for precision in ("fp32", "bf16"):
            for kind in ("masked", "plain"):
                torch.manual_seed(0)
                net = build_model(name, in_shape=list(datasets.DATASETS[dataset][0]))
                if kind == "plain":
                    net = unmasked(net)
                train.gen.manual_seed(0)  # the same minibatches for every configuration
                step = time_steps(net, train, precision, cfg)
                rows[f"{kind} {precision}"] = dict(step_seconds=step, epoch_minutes=step * per_epoch / 60)
                print(f"{name:14} {kind:6} {precision}: {1000 * step:7.1f} ms/step, "
                      f"{step * per_epoch / 60:6.2f} min/epoch ({per_epoch} steps)", flush=True)
        entry = dict(dataset=dataset, images=len(train.y), steps_per_epoch=per_epoch, runs=rows,
                     masked_over_plain={p: rows[f"masked {p}"]["step_seconds"] / rows[f"plain {p}"]["step_seconds"]
                                        for p in ("fp32", "bf16")},
                     fp32_over_bf16={k: rows[f"{k} fp32"]["step_seconds"] / rows[f"{k} bf16"]["step_seconds"]
                                     for k in ("masked", "plain")})
        print(f"{name}: masked / plain {entry['masked_over_plain']['fp32']:.3f} (fp32), "
              f"{entry['masked_over_plain']['bf16']:.3f} (bf16); bf16 speed-up "
              f"{entry['fp32_over_bf16']['masked']:.2f}x (masked)")
        result["models"][name] = entry
    if "mnist" in data:  # the data path alone: the same images in the same order for both
        train = data["mnist"]
        order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))

        def in_memory():
            train.gen.manual_seed(0)  # datasets.Batches draws `order` first
            return train

        loader = torch.utils.data.DataLoader(PerImage(train.x, train.y, *datasets.DATASETS["mnist"][2:]),
                                             batch_size=cfg["batch_size"], sampler=order.tolist())
        batches, per_image = time_data_path(in_memory, cfg), time_data_path(lambda: loader, cfg)
        result["data_path"] = dict(batches_ms=1000 * batches, dataloader_ms=1000 * per_image,
                                   dataloader_over_batches=per_image / batches)
        print(f"data path, ms per minibatch of MNIST: datasets.Batches {1000 * batches:.2f}, "
              f"DataLoader image by image {1000 * per_image:.2f} ({per_image / batches:.1f}x)")
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
