"""Benchmark: inference from the compressed form (runtime.py) against dense and torch's CSR.

    python bench/bench_inference.py --threads=2                       # paper layers, shipped networks
    python bench/bench_inference.py --files="['out/bench/lenet_300_100/seed0/lenet_300_100.dc']"

In one run on one machine, the same threads for every side (torch and numba set alike):
  1. the fc layers of the paper's Table 8 (Deep Compression section 6), random weights at the
     paper's densities with 5-bit codebooks: AlexNet fc6 / fc7 / fc8, VGG-16 fc6 / fc7 / fc8;
     batch 1 (the paper's case) and batch 64: dense F.linear, torch.sparse_csr and this
     runtime's codebook-CSR kernel, in the form it chooses for that batch (split, packed, or
     packed with the vectorised gather loop: runtime.choose_layout), each on inputs prepared before timing. Beside each: the share of
     the machine's streaming bandwidth that its weight bytes reach (bytes / seconds over the
     bandwidth at which dense batch 1 reads the largest layer, VGG-16 fc6's 411 MB);
  2. the real fc layers of each `.dc` file given;
  3. whole networks, each `.dc` file and each `networks` entry (random masks at one density,
     for networks with no file shipped), at each of `model_batches`: the dense export
     (runtime.to_plain), the same with its batch norms folded (runtime.to_sparse, dense forms
     only) and the sparse runtime (runtime.to_sparse, forms chosen on an input of that batch).
Every figure is the median of `runs` turns (the sides take turns), each the best of `repeats`
timed calls after `warmup` untimed ones. Outputs are
checked against the dense product (relative error, the norm of the difference over the
norm of the dense output). Prints the tables and writes bench/results/inference.json.
"""
import glob
import json
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
from results_table import replace_block  # noqa: E402
from models import build_model  # noqa: E402
from prune import masked_layers  # noqa: E402
from quantize import build_quantized_model  # noqa: E402

# -----------------------------------------------------------------------------
threads = 1                 # torch and numba threads, the same for every side
paper_layers = True         # time the paper's six fc layers (random weights; VGG-16 fc6 alone is 411 MB dense)
batches = [1, 64]           # batch sizes timed
warmup = 3                  # untimed calls before timing
repeats = 20                # timed calls; the best is kept
runs = 3                    # the sides timed in turn this many times; each figure is the median of its runs' bests
flush_mb = 0                # MB written, untimed, before every call of every side (0: none, the weights stay cached
                            # between calls if they fit; 128: each call reads them from memory, as in a network whose
                            # other layers' weights pass through the cache between two calls of this one)
bits = 5                    # codebook bits of the paper's layers (Table 4-5: fc layers 5 bits)
files = ["bench/results/dc/lenet5_caffe_ratio-seed0.dc", "bench/results/dc/mobilenet_v2-seed0.dc",
         "bench/results/dc/resnet20-seed0.dc", "bench/results/dc/resnet20_auto-seed0.dc"]
                            # .dc files whose real fc layers and whole model are timed
networks = {"resnet18": [{"in_shape": [3, 32, 32], "num_classes": 10, "cifar_stem": True}, 0.05]}
                            # {name: [model kwargs, density]}: random masks, for networks with no file shipped
model_batches = [1, 16]     # batch sizes the whole networks are timed at
out = "bench/results/inference.json"  # where the figures are written (name it by CPU: inference_<cpu>_threads<n>.json)
readme = "README.md"        # whose networks block is rewritten from every bench/results/inference_*.json ('' = leave it)
doc = "docs/experiments.md"  # whose inference block is rewritten the same way ('' = leave it)
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
    gather = layout == "gather"
    ours = torch.from_numpy(rt.multiply(form, xt_np, gather)).t()
    times = timed(dict(dense=lambda: F.linear(x, weight), torch_csr=lambda: w_csr @ xt,
                       ours=lambda: rt.multiply(form, xt_np, gather)), cfg)
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
    ours_mb = mem["ours" if t["layout"] == "split" else "ours_packed"] / 1e6
    line = (f"{name:22} {100 * density:5.1f}% {n:4} | dense {1e3 * t['dense']:8.3f} ms | torch CSR "
            f"{1e3 * t['torch_csr']:8.3f} ms | ours {1e3 * t['ours']:8.3f} ms {t['layout']:6} | vs dense "
            f"{speed:5.2f}x | vs CSR {t['torch_csr'] / t['ours']:5.2f}x | MB {mem['dense'] / 1e6:7.2f} / {ours_mb:6.2f}")
    return line + (f" | paper {paper:.1f}x" if paper and n == 1 else "")


def random_network(name, kwargs, density, bits, seed=0):
    """models.build_model(name, **kwargs) pruned and quantized at random: every masked layer at
    `density`, its survivors drawn from a 2**bits codebook scaled as He et al.'s initialisation
    for the surviving fan-in, so that activations keep their size through the network (shrinking
    ones end as subnormal floats, which the CPU computes far more slowly); batch norms as built.
    For timing a network that has no file here; its accuracy means nothing."""
    g = torch.Generator().manual_seed(seed)
    net = build_model(name, **kwargs)
    state, quantized = net.state_dict(), {}
    for layer, _ in masked_layers(net):
        shape = state.pop(f"{layer}.weight").shape
        mask = (torch.rand(shape, generator=g) < density).float()
        scale = (2 / (density * shape[1:].numel())) ** 0.5
        state[f"{layer}.codebook"] = torch.cat([torch.zeros(1), scale * torch.randn(2 ** bits - 1, generator=g)])
        state[f"{layer}.index"] = torch.randint(1, 2 ** bits, shape, generator=g, dtype=torch.uint8) * mask.byte()
        state[f"{layer}.mask"] = mask
        quantized[layer] = dict(bits=bits, clusters=2 ** bits)
    net = build_quantized_model(dict(name=name, kwargs=kwargs), quantized)
    net.load_state_dict(state)
    return net.eval()


def cpu_ticks():
    """(stolen, total) CPU ticks of the machine so far (/proc/stat; (0, 0) where there is
    none): the share a hypervisor took from this virtual machine during a timing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def time_network(label, net, in_shape, cfg):
    """A whole network at each batch of cfg['model_batches']: {batch: seconds of the dense
    export, the dense export with its batch norms folded, and the sparse runtime; the sparse
    runtime's error against the dense export; each layer's form}."""
    entry = dict(density=float(sum(m.mask.sum() for _, m in masked_layers(net))
                               / sum(m.mask.numel() for _, m in masked_layers(net))), batches={})
    dense = rt.to_plain(net).eval()
    for n in cfg["model_batches"]:
        x = torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(n))
        folded, _, _ = rt.to_sparse(net, x, forms=("dense",))
        sparse, chosen, bn_folded = rt.to_sparse(net, x)
        with torch.no_grad():
            ref = dense(x)
            before = cpu_ticks()
            t = timed(dict(dense=lambda: dense(x), dense_folded=lambda: folded(x), sparse=lambda: sparse(x)), cfg)
            after = cpu_ticks()
            y = sparse(x)
        stolen = (after[0] - before[0]) / max(1, after[1] - before[1])
        error = float((y - ref).norm() / ref.norm())
        worst = float(((y - ref).abs() / ref.abs().clamp_min(1e-6 * ref.abs().max())).max())
        forms = {f: sum(v == f for v in chosen.values()) for f in rt.FORMS if f in chosen.values()}
        entry["batches"][str(n)] = dict(**t, error=error, max_relative_error=worst, forms=chosen,
                                        batch_norms_folded=len(bn_folded), stolen=stolen)
        print(f"{label}, batch {n}: dense {1e3 * t['dense']:.3f} ms, dense with batch norms folded "
              f"{1e3 * t['dense_folded']:.3f} ms, sparse runtime {1e3 * t['sparse']:.3f} ms: "
              f"{t['dense'] / t['sparse']:.2f}x ({t['dense_folded'] / t['sparse']:.2f}x); error {error:.1e}; "
              f"layers {forms}, {len(bn_folded)} batch norms folded; {stolen:.1%} of the CPU stolen by the host",
              flush=True)
    return entry


def recorded(folder="bench/results"):
    """{file name: result} of every inference_*.json there written by this version of the
    benchmark (those with a networks entry, empty or not; older files lack it)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "inference_*.json"))):
        result = json.load(open(path))
        if "networks" in result:
            found[os.path.basename(path)] = result
    return found


def machine_name(result):
    cold = f", {result['settings']['flush_mb']} MB flushed before each call" if result["settings"]["flush_mb"] else ""
    return f"{result['machine']['cpu']}, {result['machine']['threads']} threads{cold}"


def networks_block(results):
    """The README's table: each network of each recorded run, the sparse runtime against the
    dense export (and the dense export with its batch norms folded) at every batch."""
    lines = ["| network | alive | CPU | batch | dense / folded / sparse ms | sparse vs dense | vs folded |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for result in results.values():
        for label, e in result["networks"].items():
            for n, t in e["batches"].items():
                lines.append(f"| {label} | {100 * e['density']:.1f}% | {machine_name(result)} | {n} | "
                             f"{1e3 * t['dense']:.3f} / {1e3 * t['dense_folded']:.3f} / {1e3 * t['sparse']:.3f} | "
                             f"**{t['dense'] / t['sparse']:.2f}x** | {t['dense_folded'] / t['sparse']:.2f}x |")
    return "\n".join(lines)


def layers_block(results):
    """docs/experiments.md's table: the paper's fc layers in each recorded run, at each batch:
    the three sides, ours against dense (the paper's figure beside it at batch 1) and against
    torch's CSR, and at batch 1 the share of the streaming bandwidth ours reaches."""
    lines = ["| layer | CPU | batch | dense / torch CSR / ours ms | ours vs dense (paper) | vs CSR | bandwidth share, dense / ours |",
             "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for result in results.values():
        for name, e in result["paper_layers"].items():
            for n, t in e["batches"].items():
                paper = f" ({e['paper_speedup_batch1']}x)" if n == "1" else ""
                share = e.get("bandwidth_share") if n == "1" else None
                lines.append(f"| {name} | {machine_name(result)} | {n} | {1e3 * t['dense']:.3f} / {1e3 * t['torch_csr']:.3f}"
                             f" / {1e3 * t['ours']:.3f} | {t['dense'] / t['ours']:.2f}x{paper} | "
                             f"{t['torch_csr'] / t['ours']:.2f}x | "
                             + (f"{share['dense']:.0%} / {share['ours']:.0%} |" if share else "- |"))
        if result.get("bandwidth"):
            lines.append(f"| (streaming bandwidth, {machine_name(result)}) | | | {result['bandwidth'] / 1e9:.1f} GB/s | | | |")
    return "\n".join(lines)


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
    result = dict(machine=machine, settings=cfg, paper_layers={}, files={}, networks={})
    for i, (name, (shape, density, paper)) in enumerate(PAPER.items() if cfg["paper_layers"] else ()):
        weight, csr = random_layer(shape, density, cfg["bits"], seed=i)
        mem = resident(weight, csr)
        entry = dict(shape=list(shape), density=density, paper_speedup_batch1=paper, bytes=mem, batches={})
        for n in cfg["batches"]:
            t = time_layer(weight, csr, n, cfg)
            entry["batches"][str(n)] = t
            print(row_line(name, density, n, t, mem, paper), flush=True)
        result["paper_layers"][name] = entry
        del weight, csr
    if cfg["paper_layers"] and 1 in cfg["batches"]:
        largest = result["paper_layers"]["VGG-16 fc6"]  # 411 MB: dense batch 1 reads it from memory
        result["bandwidth"] = largest["bytes"]["dense"] / largest["batches"]["1"]["dense"]
        print(f"streaming bandwidth (dense batch 1 reading VGG-16 fc6): {result['bandwidth'] / 1e9:.1f} GB/s; "
              f"the share of it each layer's weight bytes reach at batch 1, dense / ours:")
        for name, e in result["paper_layers"].items():
            t = e["batches"]["1"]
            ours = e["bytes"]["ours" if t["layout"] == "split" else "ours_packed"]
            e["bandwidth_share"] = dict(dense=e["bytes"]["dense"] / t["dense"] / result["bandwidth"],
                                        ours=ours / t["ours"] / result["bandwidth"])
            print(f"  {name:12} {e['bandwidth_share']['dense']:6.1%} / {e['bandwidth_share']['ours']:6.1%}")
    nets = {}
    for path in cfg["files"]:
        quantized, header = dcfile.load_compressed(path)
        nets[f"{header['model']['name']} ({os.path.basename(path)})"] = quantized, header["model"]["kwargs"]["in_shape"]
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
        result["files"][path] = entry
    for name, (kwargs, density) in cfg["networks"].items():
        nets[f"{name} at {100 * density:g}% (random masks)"] = random_network(name, kwargs, density, cfg["bits"]), \
            kwargs["in_shape"]
    for label, (net, in_shape) in nets.items():
        result["networks"][label] = time_network(label, net, in_shape, cfg)
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")
    results = recorded(os.path.dirname(cfg["out"]) or ".")
    if cfg["readme"]:
        replace_block(cfg["readme"], networks_block({k: r for k, r in results.items() if r["networks"]}),
                      "<!-- networks:begin -->", "<!-- networks:end -->")
    if cfg["doc"]:
        replace_block(cfg["doc"], layers_block({k: r for k, r in results.items() if r.get("paper_layers")}),
                      "<!-- inference:begin -->", "<!-- inference:end -->")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
