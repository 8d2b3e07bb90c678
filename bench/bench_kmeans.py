"""Benchmark: quantize.kmeans_1d against scikit-learn's KMeans on pruned-like weights.

    pip install -r bench/requirements.txt && python bench/bench_kmeans.py

On one seeded set of `values` weights shaped as pruning leaves them (a normal layer with every
|w| < threshold x std removed: two tails and nothing near zero), clusters into k shared values
in the same run with
  1. quantize.kmeans_1d, linear initialisation (section 3.2): one sort, then Lloyd steps of
     O(k log n) on the sorted data, run until the assignment repeats;
  2. sklearn.cluster.KMeans, algorithm='lloyd', n_init=1, init = the same k linearly spaced
     centroids, tol=0 and the iteration cap lifted (max_iter): it runs, like ours, until the
     assignment repeats. This is the headline comparison: both converged;
  3. the same with scikit-learn's default stopping rule (tol=1e-4, max_iter=300), which stops
     earlier at a worse inertia.
All three get the same warm-up (one untimed call) and the same number of timed repeats (the best
is kept). Inertia (the within-cluster sum of squares, eq. 1 of the paper) is recomputed for all
three in float64 from their centroids and labels. Prints the table and writes
bench/results/kmeans.json.
Other processes on the machine slow every entry; the load average is recorded with the figures.
"""
import os
import sys

import numpy as np
import sklearn
import torch
from sklearn.cluster import KMeans

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402
from quantize import kmeans_1d  # noqa: E402

# -----------------------------------------------------------------------------
values = 1_000_000          # surviving weights clustered
k = 32                      # shared values (5 bits, the paper's fc layers)
std = 0.05                  # spread of the dense layer's weights
threshold = 1.0             # pruning removed |w| < threshold x std (Han 2015's rule), leaving two tails
repeats = 3                 # timed runs of each of the three, after one untimed warm-up run (the best is kept)
max_iter = 100_000          # scikit-learn's iteration cap for the converged run (its default, 300, stops short)
seed = 0                    # the weights' random seed
out = "bench/results/kmeans.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def pruned_weights(n, std, threshold, seed):
    """n float32 values from N(0, std^2) with |w| >= threshold x std, shuffled: (n,)."""
    rng = np.random.default_rng(seed)
    keep = np.empty(0, dtype=np.float32)
    while len(keep) < n:
        w = rng.normal(0.0, std, 2 * n).astype(np.float32)
        keep = np.concatenate([keep, w[np.abs(w) >= threshold * std]])
    return keep[:n]


def inertia(x, centroids, labels):
    """Within-cluster sum of squares in float64. x: (n,), centroids: (k,), labels: (n,)."""
    return float(((x.astype(np.float64) - np.asarray(centroids, dtype=np.float64)[labels]) ** 2).sum())


def sklearn_kmeans(x, init, tol, max_iter):
    km = KMeans(n_clusters=len(init), init=init.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=tol,
                max_iter=max_iter)
    km.fit(x.reshape(-1, 1))
    return km.cluster_centers_.ravel(), km.labels_, km.n_iter_


def main(cfg):
    util.require(cfg["values"] > cfg["k"] >= 1 and cfg["std"] > 0 and cfg["threshold"] >= 0,
                 "need values > k >= 1, std > 0 and threshold >= 0")
    util.require(cfg["repeats"] >= 1 and cfg["max_iter"] >= 300, "need repeats >= 1 and max_iter >= 300")
    x = pruned_weights(cfg["values"], cfg["std"], cfg["threshold"], cfg["seed"])
    init = np.linspace(x.min(), x.max(), cfg["k"]).astype(np.float32)
    tensor = torch.from_numpy(x)
    load_before = os.getloadavg()

    def timed(fn):  # the same for all three: one untimed call, then the best of `repeats`
        fn()
        return util.best_time(fn, cfg["repeats"])

    t_ours, (c, labels) = timed(lambda: kmeans_1d(tensor, cfg["k"], init="linear"))
    c, labels = c.numpy(), labels.numpy()
    rows = {"kmeans_1d": dict(seconds=t_ours, inertia=inertia(x, c, labels), clusters=len(np.unique(labels)))}
    for name, tol, max_iter in (("sklearn_tol0", 0.0, cfg["max_iter"]), ("sklearn", 1e-4, 300)):
        t, (sc, slabels, n_iter) = timed(lambda: sklearn_kmeans(x, init, tol, max_iter))
        rows[name] = dict(seconds=t, inertia=inertia(x, sc, slabels), clusters=len(np.unique(slabels)),
                          iterations=int(n_iter), tol=tol, max_iter=max_iter, converged=bool(n_iter < max_iter))

    ours = rows["kmeans_1d"]
    for name in ("sklearn", "sklearn_tol0"):
        rows[name]["speedup"] = rows[name]["seconds"] / ours["seconds"]
        rows[name]["inertia_ratio"] = ours["inertia"] / rows[name]["inertia"]  # < 1: ours is better
    result = dict(values=cfg["values"], k=cfg["k"], std=cfg["std"], threshold=cfg["threshold"], seed=cfg["seed"],
                  init="linear", dtype="float32", repeats=cfg["repeats"], warmup=1, results=rows,
                  cpu=util.cpu_model(), cpus=os.cpu_count(),
                  torch_threads=torch.get_num_threads(),
                  load_average=dict(before=load_before, after=os.getloadavg()),
                  sklearn=sklearn.__version__, numpy=np.__version__, torch=torch.__version__)

    print(f"data: {cfg['values']} float32 weights ~ N(0, {cfg['std']}^2) with |w| >= {cfg['threshold']} x std "
          f"(two tails); k = {cfg['k']}, linear init for all")
    print(f"{'':26}{'seconds':>10}{'inertia':>14}{'clusters':>10}{'iterations':>12}{'speed-up':>10}{'inertia ratio':>15}")
    for name, label in (("kmeans_1d", "quantize.kmeans_1d"), ("sklearn_tol0", "sklearn KMeans (tol=0)"),
                        ("sklearn", "sklearn KMeans (tol=1e-4)")):
        r = rows[name]
        extra = (f"{r['iterations']:12d}{r['speedup']:9.1f}x{r['inertia_ratio']:15.4f}"
                 if name != "kmeans_1d" else f"{'':12}{'':10}{'':15}")
        print(f"{label:26}{r['seconds']:10.3f}{r['inertia']:14.6f}{r['clusters']:10d}{extra}")
    conv = rows["sklearn_tol0"]
    print(f"against scikit-learn run to convergence ({conv['iterations']} iterations"
          f"{'' if conv['converged'] else ', NOT converged: raise max_iter'}): {conv['speedup']:.1f}x faster, "
          f"inertia {ours['inertia']:.6f} vs {conv['inertia']:.6f} (ratio {conv['inertia_ratio']:.4f}, <= 1: no worse); "
          f"against its default stopping rule: {rows['sklearn']['speedup']:.1f}x, "
          f"inertia ratio {rows['sklearn']['inertia_ratio']:.4f}")
    print(f"load average {load_before[0]:.1f} -> {result['load_average']['after'][0]:.1f} on {os.cpu_count()} CPUs")
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
