"""Benchmark: inference from the compressed form (runtime.py) against dense and torch's CSR.

    python bench/bench_inference.py                                   # the paper's layers
    python bench/bench_inference.py --files="['out/bench/lenet_300_100/seed0/lenet_300_100.dc']"

In one run on one machine, the same threads for every side (torch and numba set alike):
  1. the fc layers of the paper's Table 8 (Deep Compression section 6), random weights at the
     paper's densities with 5-bit codebooks: AlexNet fc6 / fc7 / fc8, VGG-16 fc6 / fc7 / fc8;
     batch 1 (the paper's case) and batch 64: dense F.linear, torch.sparse_csr and this
     runtime's codebook-CSR kernel, in the layout it chooses for that batch (split or packed,
     runtime.choose_layout), each on inputs prepared before timing;
  2. the real layers of each `.dc` file given, and the whole model's batch-1 latency from the
     file: the dense export against the sparse runtime.
Every figure is the median of `runs` turns (the sides take turns), each the best of `repeats`
timed calls after `warmup` untimed ones. Outputs are
checked against the dense product (relative error, the norm of the difference over the
norm of the dense output). Prints the tables and writes bench/results/inference.json.
"""
import os
import sys

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcfile  # noqa: E402
import runtime as rt  # noqa: E402
import util  # noqa: E402
from prune import masked_layers  # noqa: E402

# -----------------------------------------------------------------------------
threads = 1                 # torch and numba threads, the same for every side
batches = [1, 64]           # batch sizes timed
warmup = 3                  # untimed calls before timing
repeats = 20                # timed calls; the best is kept
runs = 3                    # the sides timed in turn this many times; each figure is the median of its runs' bests
flush_mb = 0                # MB written, untimed, before every call of every side (0: none, the weights stay cached
                            # between calls if they fit; 128: each call reads them from memory, as in a network whose
                            # other layers' weights pass through the cache between two calls of this one)
bits = 5                    # codebook bits of the paper's layers (Table 4-5: fc layers 5 bits)
files = []                  # .dc files whose real layers and whole model are timed too
out = "bench/results/inference.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

# Deep Compression Table 8: layer (in, out), density after pruning, speed-up of sparse over
# dense at batch 1 on the CPU (Intel Core i7-5930K, MKL CSR), which this runtime should reach.
PAPER = {
    "AlexNet fc6": ((9216, 4096), 0.09, 2.5), "AlexNet fc7": ((4096, 4096), 0.09, 4.8),
    "AlexNet fc8": ((4096, 1000), 0.25, 1.3), "VGG-16 fc6": ((25088, 4096), 0.04, 9.3),
    "VGG-16 fc7": ((4096, 4096), 0.04, 9.9), "VGG-16 fc8": ((4096, 1000), 0.23, 1.0),
}


def best(fn, cfg):
    """Best seconds of cfg['repeats'] calls of fn() after cfg['warmup'] untimed ones; with
    flush_mb, a buffer that size is written before every call, outside the timing, so that
    no call finds the previous one's data in the cache."""
    buffer = np.zeros(cfg["flush_mb"] * 2 ** 20 // 8)  # empty when flush_mb is 0: writing it is a no-op
    for _ in range(cfg["warmup"]):
        np.add(buffer, 1.0, out=buffer)
        fn()
    times = []
    for _ in range(cfg["repeats"]):
        np.add(buffer, 1.0, out=buffer)
        times.append(util.best_time(fn, 1)[0])
    return min(times)


def timed(sides, cfg):
    """{side: seconds} for {side: fn}: the sides take turns, cfg['runs'] times, each turn the
    best of its repeats (best()); each side's figure is the median of its turns, so that a
    stretch of interference on the shared machine lands on every side alike and on no figure."""
    turns = {name: [] for name in sides}
    for _ in range(cfg["runs"]):
        for name, fn in sides.items():
            turns[name].append(best(fn, cfg))
    return {name: float(np.median(t)) for name, t in turns.items()}


def random_layer(shape, density, bits, seed):
    """A pruned, quantized fc layer (out, in) at `density` with a 2**bits codebook, built row
    block by row block (VGG fc6 is 103 M weights) -> (dense float32 tensor, codebook-CSR)."""
    n_in, n_out = shape
    rng = np.random.default_rng(seed)
    codebook = rng.standard_normal(2 ** bits).astype(np.float32) * 0.05
    dense = np.zeros((n_out, n_in), np.float32)
    for lo in range(0, n_out, 512):
        block = rng.random((min(512, n_out - lo), n_in), dtype=np.float32) < density
        dense[lo:lo + len(block)][block] = codebook[rng.integers(0, len(codebook), int(block.sum()))]
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.weight = nn.Parameter(torch.from_numpy(dense), requires_grad=False)
    layer.mask = (layer.weight != 0).float()
    return layer.weight.data, rt.csr_from_layer(layer)


def time_layer(weight, csr, n, cfg, seed=0):
    """Seconds for y = W x (batch n) in the three forms, the two sparse forms' errors, and the
    layout chosen for ours (runtime.choose_layout, on another input, before timing, under the
    same cache conditions)."""
    x = torch.randn(n, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    xt = x.t().contiguous()
    xt_np = xt.numpy()
    w_csr = weight.to_sparse_csr()
    # the layout the runtime would pick here, timed as below (cold too) on another input
    form, layout = rt.choose_layout(csr, torch.randn(n, weight.shape[1]).t().contiguous().numpy(),
                                    timer=lambda fn: best(fn, dict(cfg, warmup=1, repeats=5)))
    ref = F.linear(x, weight)
    err = lambda y: float((y - ref).norm() / ref.norm().clamp_min(1e-30))  # noqa: E731
    ours = torch.from_numpy(rt.multiply(form, xt_np)).t()
    times = timed(dict(dense=lambda: F.linear(x, weight), torch_csr=lambda: w_csr @ xt,
                       ours=lambda: rt.multiply(form, xt_np)), cfg)
    return dict(**times, layout=layout, error_ours=err(ours), error_torch_csr=err((w_csr @ xt).t()))


def resident(weight, csr):
    """Bytes of the weight in memory: dense float32, torch CSR (float32 values, int64 indices)
    and codebook-CSR in the split layout (ours) and the packed one (ours_packed)."""
    nnz = len(csr["col"])
    packed = rt.pack(csr)
    return dict(dense=weight.numel() * 4, torch_csr=nnz * 12 + (weight.shape[0] + 1) * 8,
                ours=sum(v.nbytes for v in csr.values()),
                ours_packed=sum(v.nbytes for v in packed.values()) if packed else None)


def row_line(name, density, n, t, mem, paper=None):
    speed = t["dense"] / t["ours"]
    ours_mb = mem["ours_packed" if t["layout"] == "packed" else "ours"] / 1e6
    line = (f"{name:22} {100 * density:5.1f}% {n:4} | dense {1e3 * t['dense']:8.3f} ms | torch CSR "
            f"{1e3 * t['torch_csr']:8.3f} ms | ours {1e3 * t['ours']:8.3f} ms {t['layout']:6} | vs dense "
            f"{speed:5.2f}x | vs CSR {t['torch_csr'] / t['ours']:5.2f}x | MB {mem['dense'] / 1e6:7.2f} / {ours_mb:6.2f}")
    return line + (f" | paper {paper:.1f}x" if paper and n == 1 else "")


def main(cfg):
    util.require(cfg["threads"] >= 1 and cfg["repeats"] >= 1 and cfg["runs"] >= 1 and cfg["batches"]
                 and cfg["flush_mb"] >= 0, "threads, repeats, runs >= 1; batches; flush_mb >= 0")
    missing = [f for f in cfg["files"] if not os.path.isfile(f)]
    util.require(not missing, f"no such .dc file: {missing}; run the pipeline first (bench/pipeline.py)")
    torch.set_num_threads(cfg["threads"])
    numba.set_num_threads(min(cfg["threads"], numba.config.NUMBA_NUM_THREADS))
    machine = dict(cpu=util.cpu_model(), cores=os.cpu_count(), threads=cfg["threads"], torch=torch.__version__,
                   numba=numba.__version__)
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores), {cfg['threads']} thread(s) for torch and numba; "
          f"median of {cfg['runs']} turns, each the best of {cfg['repeats']} after {cfg['warmup']} warm-up calls; "
          + (f"{cfg['flush_mb']} MB written before every call (cold cache)" if cfg["flush_mb"] else "warm cache"))
    result = dict(machine=machine, settings=cfg, paper_layers={}, files={})
    for i, (name, (shape, density, paper)) in enumerate(PAPER.items()):
        weight, csr = random_layer(shape, density, cfg["bits"], seed=i)
        mem = resident(weight, csr)
        entry = dict(shape=list(shape), density=density, paper_speedup_batch1=paper, bytes=mem, batches={})
        for n in cfg["batches"]:
            t = time_layer(weight, csr, n, cfg)
            entry["batches"][str(n)] = t
            print(row_line(name, density, n, t, mem, paper), flush=True)
        result["paper_layers"][name] = entry
        del weight, csr
    for path in cfg["files"]:
        quantized, header = dcfile.load_compressed(path)
        in_shape = header["model"]["kwargs"]["in_shape"]
        entry = dict(model=header["model"]["name"], layers={})
        for lname, layer in masked_layers(quantized):
            if not isinstance(layer, nn.Linear):
                continue
            weight = rt.plain_layer(layer).weight.detach()
            csr = rt.csr_from_layer(layer)
            density = len(csr["col"]) / weight.numel()
            mem = resident(weight, csr)
            entry["layers"][lname] = dict(shape=list(weight.shape), density=density, bytes=mem, batches={})
            for n in cfg["batches"]:
                t = time_layer(weight, csr, n, cfg)
                entry["layers"][lname]["batches"][str(n)] = t
                print(row_line(f"{entry['model']} {lname}", density, n, t, mem), flush=True)
        dense, _ = rt.load(path, runtime="dense")
        sparse, sh = rt.load(path, runtime="sparse")
        x = torch.randn(1, *in_shape)
        with torch.no_grad():
            ref = dense(x)
            t = timed(dict(dense=lambda: dense(x), sparse=lambda: sparse(x)), cfg)
            t_dense, t_sparse = t["dense"], t["sparse"]
            error = float((sparse(x) - ref).norm() / ref.norm())
        entry["model_batch1"] = dict(dense=t_dense, sparse=t_sparse, error=error, layers_run=sh["runtime"])
        print(f"{entry['model']} whole model, batch 1: dense {1e3 * t_dense:.3f} ms, sparse runtime "
              f"{1e3 * t_sparse:.3f} ms ({t_dense / t_sparse:.2f}x); layers: {sh['runtime']}", flush=True)
        result["files"][path] = entry
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
