"""Benchmark: the cost of masking, and of the data path, for one training epoch.

    python bench/bench_training.py --data_root=../shared/data

Times, in one run on the same machine, one epoch of lenet5_caffe on MNIST
  1. masked layers (weight * mask) vs plain nn.Conv2d / nn.Linear, both with util.Batches;
  2. util.Batches (one in-memory uint8 tensor, batched indexing) vs a torchvision
     DataLoader over the same images (per-sample ToTensor + Normalize).
Prints the table and writes bench/results/training.json.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402
from models import build_model  # noqa: E402
from prune import MASKED  # noqa: E402

# -----------------------------------------------------------------------------
model = "lenet5_caffe"      # any MNIST model of models.py
data_root = "data"          # folder holding MNIST/raw
batch_size = 128            # training minibatch
epochs = 1                  # timed epochs per configuration (the best is kept)
num_workers = 0             # DataLoader worker processes (0 = in the main process)
out = "bench/results/training.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def unmasked(net):
    """Replace every masked layer by the plain nn.Linear / nn.Conv2d with the same weights."""
    for name, child in net.named_children():
        if isinstance(child, MASKED):
            plain = nn.Linear if isinstance(child, nn.Linear) else nn.Conv2d
            child.__class__ = plain  # same parameters; the mask buffer is simply unused
            del child.mask
        else:
            unmasked(child)
    return net


def dataloader(root, batch_size, workers):
    """The textbook path: per-sample PIL -> tensor -> normalise, collated by a DataLoader."""
    import torchvision.transforms as T
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=True, download=True,
               transform=T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))]))
    ds = torch.utils.data.Subset(ds, range(54000))  # the same count as the 90% split
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)


def train_epoch(net, batches, opt):
    """One training epoch (cross-entropy), as util.fit runs it minus the bookkeeping."""
    for xb, yb in batches:
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main(cfg):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    train, _, _ = util.load_data("mnist", cfg["data_root"], cfg["batch_size"], 1000, 0.1, 0, cpu, 0)
    runs = {
        "masked, Batches": (build_model(cfg["model"]), train),
        "unmasked, Batches": (unmasked(build_model(cfg["model"])), train),
        f"masked, DataLoader(num_workers={cfg['num_workers']})":
            (build_model(cfg["model"]), dataloader(cfg["data_root"], cfg["batch_size"], cfg["num_workers"])),
    }
    seconds = {}
    for name, (net, batches) in runs.items():
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        seconds[name] = util.best_time(lambda: train_epoch(net, batches, opt), cfg["epochs"])[0]
        print(f"{name:38} {seconds[name]:7.2f} s / epoch", flush=True)
    names = list(runs)
    result = dict(model=cfg["model"], images=len(train.y), batch_size=cfg["batch_size"],
                  threads=torch.get_num_threads(), seconds=seconds,
                  masked_over_unmasked=seconds[names[0]] / seconds[names[1]],
                  dataloader_over_batches=seconds[names[2]] / seconds[names[0]])
    print(f"masking costs {result['masked_over_unmasked']:.2f}x an unmasked epoch; "
          f"the DataLoader path takes {result['dataloader_over_batches']:.2f}x the Batches path")
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
