"""Benchmark: how many bytes richer context models could save on the shipped files, measured
before any is built, against issue 35's target of 10% fewer bytes than NNCodec lossless.

    python bench/context_models.py

For every row of bench/peer_nncodec.json (the shipped .dc files), each quantized layer's
presence bits and cluster indices are scored under a family of adaptive context models by
their ideal code length: an adaptive model with Krichevsky-Trofimov counts (each outcome
starts at 1/2) in every context codes a sequence in exactly

    sum over contexts  log2 G(n + k/2) / G(k/2) - sum over outcomes log2 G(n_s + 1/2) / G(1/2)

bits, whatever the order (G the gamma function, n_s the outcome counts in the context), so no
coder has to run. A real ANS coder adds a few bytes a layer, and the file's coder updates its
counts once per column, which costs a little more: the figures are what a model could save at
best. A layer's saving under a model is today's ANS bytes for that part (presence or clusters,
whichever of today's models the file chose) less the model's ideal bytes, where positive.

Presence (rows = outputs, columns read as images as ans.layouts does, the best image per
layer and model; live-row and live-column flags cost their entropy):
  - 'neighbours': today's four-neighbour context (ans.neighbour_presence);
  - 'neighbours + row density': with the row's density so far (the alive fraction of its
    columns coded before, in 16 log-spaced buckets, so a dense output neuron predicts dense);
  - 'seven neighbours + row density': two-away left and up, and the same place one channel back;
  - 'neighbours + row density + column bucket': also the column's density (16 log buckets, sent
    per live column, its cost counted).
Clusters (today's: one static table, or the two neighbours' signs):
  - '+ channel sign': the sign of the same place one input channel back;
  - '+ row scale': the mean rank magnitude of the row's weights coded before (9 buckets);
  - 'binarised ranks': CABAC's binarisation (a sign bit, then the rank out from zero as unary
    bits), each bit adaptive in the context of its position, the neighbours' signs and
    magnitudes and the row scale.

Prints one row per file (today's ANS bytes, the most each part could save, the best total)
and writes `out` as JSON with the CPU, and the table between the context_models markers of
docs/experiments.md (block() renders it from that JSON).
"""
import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ans  # noqa: E402
import dcfile  # noqa: E402
import util  # noqa: E402
from results_table import replace_block  # noqa: E402

# -----------------------------------------------------------------------------
peers = "bench/results/peer_nncodec.json"  # the rows, our ANS bytes and NNCodec's lossless bytes
out = "bench/results/context_models.json"  # where the figures are written ('' = print only)
doc = "docs/experiments.md"  # whose table between the context_models markers is replaced ('' = leave it)
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())

PRESENCE = ("neighbours", "neighbours + row density", "seven neighbours + row density",
            "neighbours + row density + column bucket")
CLUSTERS = ("static or signs", "+ channel sign", "+ row scale", "binarised ranks")


def kt_bits(context, symbol, k):
    """Ideal code length in bits of symbols (n,) in 0..k-1 under one adaptive KT model per
    context (n,) int: the closed form above (order-free)."""
    if not len(symbol):
        return 0.0
    context, symbol = np.asarray(context, np.int64), np.asarray(symbol, np.int64)
    _, context = np.unique(context, return_inverse=True)
    joint = torch.from_numpy(np.bincount(context * k + symbol, minlength=(context.max() + 1) * k)
                             .reshape(-1, k).astype(np.float64))
    half = torch.tensor(0.5, dtype=torch.float64)
    bits = ((torch.lgamma(joint.sum(1) + k * half) - torch.lgamma(k * half)).sum()
            - (torch.lgamma(joint + half) - torch.lgamma(half)).sum())
    return float(bits) / math.log(2)


def entropy_bits(ones, n):
    """Bits of n flags of which `ones` are set, at p = ones / n."""
    if ones in (0, n):
        return 0.0
    p = ones / n
    return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def log_bucket(fraction, top):
    """Fractions in (0, 1] -> 2 log2 buckets 0..top-1 (top-1 = 1/2 and above)."""
    return np.clip(np.floor(2 * np.log2(np.maximum(fraction, 1e-9))) + top - 1, 0, top - 1).astype(np.int64)


def shifted(grid, n_cols, j, where, offset):
    """grid (R, C + 1): its column j + offset where `where`, else the empty column C. -> (R, C)"""
    return grid[:, np.where(where, j + offset, n_cols)]


def presence_bits(live, h, w):
    """Ideal bits of the live rows x all columns (R', C) bool under each PRESENCE model."""
    n_rows, n_cols = live.shape
    pad = np.zeros((n_rows, n_cols + 1), bool)
    pad[:, :n_cols] = live
    j = np.arange(n_cols)
    x, y = j % w, (j // w) % h
    nb4 = sum((1 << i) * pad[:, col] for i, col in enumerate(ans.neighbours(n_cols, h, w)))  # ans's contexts
    nb7 = (nb4 + 16 * shifted(pad, n_cols, j, x > 1, -2) + 32 * shifted(pad, n_cols, j, y > 1, -2 * w)
           + 64 * shifted(pad, n_cols, j, j >= h * w, -h * w))
    before = np.cumsum(live, 1) - live
    density = log_bucket((before + 0.5) / (j + 1.0), 16)
    density[:, :8] = 16  # too few columns seen to say
    column = log_bucket(live.sum(0) / n_rows, 16)
    live_cols = live.any(0)
    bits = lambda ctx: kt_bits(ctx[:, live_cols].reshape(-1), live[:, live_cols].reshape(-1), 2)  # noqa: E731
    return [bits(nb4), bits(17 * nb4 + density), bits(17 * nb7 + density),
            bits(16 * (17 * nb4 + density) + column[None, :]) + kt_bits(np.zeros(live_cols.sum()), column[live_cols], 16)]


def cluster_bits(present, index, codebook, h, w):
    """Ideal bits of the clusters of present (R, C) bool, index (R, C), under each CLUSTERS model."""
    k = len(codebook)
    n_rows, n_cols = present.shape
    negative = int((codebook < 0).sum())
    rank = np.empty(k, np.int64)
    rank[np.argsort(codebook, kind="stable")] = np.arange(k)
    side = (codebook >= 0).astype(np.int64)
    magnitude = np.where(side == 1, rank - negative, negative - 1 - rank)
    signs = np.zeros((n_rows, n_cols + 1), np.int64)
    signs[:, :n_cols] = np.where(present, 1 + side[index], 0)
    mags = np.zeros((n_rows, n_cols + 1), np.int64)
    mags[:, :n_cols] = np.where(present, 1 + np.minimum(magnitude[index], 3), 0)
    j = np.arange(n_cols)
    r, c = np.nonzero(present)
    sym = index[r, c]
    left, up = ans.neighbours(n_cols, h, w)[:2]
    two = (ans.SIGNS * signs[:, left] + signs[:, up])[r, c]
    channel = shifted(signs, n_cols, j, j >= h * w, -h * w)[r, c]
    seen = np.cumsum(present, 1) - present
    total = np.cumsum(np.where(present, magnitude[index], 0), 1) - np.where(present, magnitude[index], 0)
    scale = np.where(seen > 0, 1 + np.clip(2 * total // np.maximum(seen, 1), 0, 8), 0)[r, c]
    today = min(kt_bits(np.zeros_like(sym), sym, k), kt_bits(two, sym, k))
    s, m = side[sym], magnitude[sym]
    ranks = kt_bits(3 * two + channel, s, 2)
    left_m, up_m = mags[:, left][r, c], mags[:, up][r, c]
    largest = np.where(s == 1, k - negative, negative) - 1  # the largest magnitude on that side
    for b in range(k):
        coded = (m >= b) & (largest > b)  # unary bit b: is the magnitude above b?
        if not coded.any():
            break
        ctx = ((((min(b, 6) * 2 + s) * 5 + left_m) * 5 + up_m) * 10 + scale)[coded]
        ranks += kt_bits(ctx, (m[coded] > b).astype(np.int64), 2)
    return [today, min(today, kt_bits(3 * two + channel, sym, k)), min(today, kt_bits(10 * two + scale, sym, k)),
            min(today, ranks)]


def layer_bits(codebook, index, mask):
    """{'presence': [bits per PRESENCE model], 'clusters': [bits per CLUSTERS model]} of one
    quantized layer, each model at its best image; the presence figures include the flags."""
    shape = tuple(mask.shape)
    n_rows, n_cols = ans.matrix(shape)
    present = mask.reshape(n_rows, n_cols).numpy() == 1
    index = index.reshape(n_rows, n_cols).numpy().astype(np.int64)
    codebook = codebook.numpy()
    live_rows = present.any(1)
    flags = entropy_bits(int(live_rows.sum()), n_rows) + entropy_bits(int(present.any(0).sum()), n_cols)
    presence, clusters = None, None
    for h, w in ans.layouts(shape):
        p = [flags + b for b in presence_bits(present[live_rows], h, w)]
        c = cluster_bits(present, index, codebook, h, w) if len(codebook) > 1 else [0.0] * len(CLUSTERS)
        presence = p if presence is None else list(map(min, presence, p))
        clusters = c if clusters is None else list(map(min, clusters, c))
    return dict(presence=presence, clusters=clusters)


def file_row(peer):
    """One peer_nncodec row's file scored: today's bytes and the bytes each family could reach."""
    state, header = dcfile.decode_file(os.path.join(ROOT, peer["file"]))
    today = peer["ours"]["ans"]["bytes"]
    saved = {"presence": [0.0] * len(PRESENCE), "clusters": [0.0] * len(CLUSTERS)}
    for name in header["quantized"]:
        codebook, index, mask = (state[f"{name}.{t}"] for t in ("codebook", "index", "mask"))
        coded = dcfile._ans_payload(name, codebook, index, mask)
        if coded is None:  # a Huffman section: left as it is
            continue
        report = coded[1]
        words = dict(presence=report["index_bytes"], clusters=report["weight_bytes"] - 2 * report["clusters"])
        for part, bits in layer_bits(codebook, index, mask).items():
            saved[part] = [s + max(0.0, words[part] - b / 8) for s, b in zip(saved[part], bits)]
    best = max(saved["presence"]) + max(saved["clusters"])
    nncodec = peer["nncodec_lossless"]["bytes"]
    return dict(recipe=peer["recipe"], seed=peer["seed"], file=peer["file"], ans=today, nncodec_lossless=nncodec,
                saved={part: dict(zip(PRESENCE if part == "presence" else CLUSTERS, map(round, v)))
                       for part, v in saved.items()},
                best=round(today - best), ans_vs_nncodec=100 * (today / nncodec - 1),
                best_vs_nncodec=100 * ((today - best) / nncodec - 1))


BEGIN, END = "<!-- context_models:begin -->", "<!-- context_models:end -->"


def block(result):
    """The text between docs/experiments.md's context_models markers, from the JSON main writes."""
    lines = ["| row | ours ANS B | presence: most saved B | clusters: most saved B | best B | NNCodec lossless B "
             "| ANS vs NNCodec | best vs NNCodec |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        most = lambda part: max(r["saved"][part], key=r["saved"][part].get)  # noqa: E731
        lines.append(f"| {r['recipe']} s{r['seed']} | {r['ans']:,} | "
                     + " | ".join(f"{r['saved'][part][most(part)]:,} ({most(part)})" for part in ("presence", "clusters"))
                     + f" | {r['best']:,} | {r['nncodec_lossless']:,} | {r['ans_vs_nncodec']:+.1f}% "
                     f"| {r['best_vs_nncodec']:+.1f}% |")
    reach = sum(r["best_vs_nncodec"] <= -10 for r in result["rows"])
    return "\n".join(lines) + (f"\n\n{reach} of {len(result['rows'])} rows reach 10% below NNCodec lossless "
                               f"at best. Ideal code lengths, computed on {result['cpu']}.")


def main(cfg):
    peers = json.load(open(os.path.join(ROOT, cfg["peers"])))["rows"]
    print(f"{'recipe':<26} {'seed':>4} {'ANS':>9} {'presence saved':>15} {'clusters saved':>15} {'best':>9} "
          f"{'NNCodec':>9} {'ANS vs NNCodec':>15} {'best vs NNCodec':>16}")
    rows = []
    for peer in peers:
        row = file_row(peer)
        rows.append(row)
        print(f"{row['recipe']:<26} {row['seed']:>4} {row['ans']:>9,} {max(row['saved']['presence'].values()):>15,} "
              f"{max(row['saved']['clusters'].values()):>15,} {row['best']:>9,} {row['nncodec_lossless']:>9,} "
              f"{row['ans_vs_nncodec']:>+14.1f}% {row['best_vs_nncodec']:>+15.1f}%")
    result = dict(rows=rows, presence_models=PRESENCE, cluster_models=CLUSTERS, cpu=util.cpu_model())
    if cfg["out"]:
        util.write_json(os.path.join(ROOT, cfg["out"]), result)
    if cfg["doc"]:
        replace_block(os.path.join(ROOT, cfg["doc"]), block(result), BEGIN, END)
    return rows


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
