"""The math of stage 2 (Han, Mao & Dally 2016, section 3): k-means weight sharing on scalars,
quantized layers (a codebook and an index per weight, the pruning mask kept), shared values for
biases and batch-norm, batch-norm folding, and the quantized checkpoint's model. Computes and
returns; quantization.py runs the stage."""
import math

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import util
from models import build_model
from prune import MaskedConv2d, MaskedLinear, layer_kind, layer_value, masked_layers


KMEANS_INITS = ("linear", "density", "random", "kmeans++")
MAX_BITS = 16  # the paper uses 2 to 8 bits; past 16, sharing barely shrinks a 32-bit weight


# --- k-means on scalars ---------------------------------------------------------------------

def _boundaries(xs, c):
    """Cluster j of sorted data xs (n,) for sorted centroids c (k,) is xs[b[j]:b[j+1]].

    In 1-D the points nearest a centroid form the interval between the midpoints to its
    neighbours, so one searchsorted of the k-1 midpoints assigns all n points (a point on a
    midpoint goes right). Returns b: (k+1,) int64, b[0] = 0, b[k] = n."""
    return np.concatenate([[0], np.searchsorted(xs, (c[1:] + c[:-1]) / 2), [len(xs)]])


def _nearest(x, c):
    """Each value's nearest centroid: x (n,), c (k,) ascending, both numpy. The midpoints between
    neighbours split the line, a point on a midpoint going right (the rule of _boundaries).
    Returns (n,) int64."""
    return np.searchsorted((c[1:] + c[:-1]) / 2, x, side="right")


def _init_centroids(xs, k, init, rng):
    """Initial centroids (k,) for sorted data xs (n,), section 3.2 (repeats are possible)."""
    n = len(xs)
    if init == "linear":  # evenly spaced between the smallest and largest weight
        return np.linspace(xs[0], xs[-1], k)
    if init == "density":  # evenly spaced on the CDF's y axis, read back on the x axis
        return xs[np.linspace(0, n - 1, k).round().astype(np.int64)]
    if init == "random":  # Forgy: k observations drawn at random
        return xs[rng.choice(n, k, replace=False)]
    # kmeans++ (Arthur & Vassilvitskii 2007): each next centroid drawn with probability ~ D(x)^2
    c = [xs[rng.integers(n)]]
    d2 = (xs - c[0]) ** 2
    for _ in range(k - 1):
        cum = np.cumsum(d2)
        c.append(xs[min(np.searchsorted(cum, rng.random() * cum[-1]), n - 1)])
        d2 = np.minimum(d2, (xs - c[-1]) ** 2)
    return np.array(c)


def _reseed_empty_clusters(xs, cs, cs2, c, k):
    """Add centroids to the sorted centroids c until there are k. Each goes to the point
    farthest from its centroid in the cluster with the largest squared error, so it takes
    over part of the worst cluster (scikit-learn moves an empty cluster to a far point too).

    xs: (n,) sorted data with more than k distinct values; cs, cs2: (n+1,) prefix sums of
    xs and xs**2. Returns (k,) sorted and distinct, each the nearest centroid of some point."""
    n = len(xs)
    while len(c) < k:
        b = _boundaries(xs, c)
        lo, hi = b[:-1], b[1:]
        s1 = cs[hi] - cs[lo]
        sse = cs2[hi] - cs2[lo] - s1 * s1 / np.maximum(hi - lo, 1)
        first, last = xs[np.minimum(lo, n - 1)], xs[np.maximum(hi - 1, 0)]
        # An empty cluster or one of a single repeated value cannot be split; since there are
        # more distinct values than clusters, some other cluster can.
        j = np.argmax(np.where(last > first, sse, -1.0))
        far = first[j] if c[j] - first[j] >= last[j] - c[j] else last[j]
        c = np.sort(np.append(c, far))
    return c


def kmeans_1d(values, k, init="linear", seed=0, max_iter=1000):
    """Lloyd's k-means on scalars (section 3.1, eq. 1: minimise the within-cluster sum of
    squares), exact and fast because weights are 1-D.

    After one sort every cluster is a contiguous run of the sorted data, so assignment is one
    searchsorted of the midpoints between neighbouring centroids and a cluster's sum is the
    difference of two prefix sums: a Lloyd step costs O(k log n), not O(n k), and running to
    convergence is cheap. An emptied cluster (linear init on pruned weights puts centroids in
    the empty gap around zero) is re-seeded inside the worst cluster (_reseed_empty_clusters),
    so no code is wasted; clusters are dropped only when there are fewer than k distinct
    values. Stops when the assignment repeats, or after max_iter steps.

    values: (n,) float tensor on any device (clustered on the CPU); k: number of clusters.
    init: 'linear' | 'density' | 'random' | 'kmeans++' (section 3.2); seed: for random inits.
    Returns, on values' device, centroids (k',) float32 ascending, k' = min(k, distinct
    values), and labels (n,) int64 in 0..k'-1: each point's nearest centroid, every cluster
    used."""
    if init not in KMEANS_INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(KMEANS_INITS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    x = values.detach().reshape(-1).cpu().numpy()
    # One sort in the input's precision (numpy's sort is ~3x torch's on the CPU); sums in
    # float64 so that prefix-sum differences stay exact enough over millions of weights.
    xs = np.sort(x).astype(np.float64)
    x = x.astype(np.float64)
    first_of_run = np.ones(len(xs), dtype=bool)
    first_of_run[1:] = xs[1:] != xs[:-1]
    c = xs[first_of_run]  # the distinct values, ascending
    if len(c) > k:  # else every distinct value is its own cluster: the exact optimum
        cs = np.concatenate([[0.0], np.cumsum(xs)])
        cs2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
        rng = np.random.default_rng(seed)
        c = _reseed_empty_clusters(xs, cs, cs2, np.unique(_init_centroids(xs, k, init, rng)), k)
        previous, exact = None, False
        for _ in range(max_iter):
            b = _boundaries(xs, c)
            counts = np.diff(b)
            if not counts.all():
                c = _reseed_empty_clusters(xs, cs, cs2, c[counts > 0], k)
                continue
            if previous is not None and np.array_equal(b, previous):
                if exact:
                    break
                # A prefix-sum difference loses values far below the running sum (a layer
                # whose weights span more than ~1e15 in magnitude), so the assignment found
                # with them is checked, and if need be refined, with sums taken per cluster.
                exact = True
            previous = b
            sums = np.add.reduceat(xs, b[:-1]) if exact else cs[b[1:]] - cs[b[:-1]]
            c = sums / counts
        c = c[np.diff(_boundaries(xs, c)) > 0]  # stopped by max_iter: drop a cluster just emptied
    labels = _nearest(x, c)
    return (torch.from_numpy(c.astype(np.float32)).to(values.device),
            torch.from_numpy(labels.astype(np.int64)).to(values.device))


def _lower_envelope(c, b):
    """The lower envelope of the lines f_j(x) = -2 c_j x + b_j, c (k,) ascending.

    Returns (lines, breaks): line lines[i] is the lowest on [breaks[i-1], breaks[i]) (the
    first from -inf, the last to +inf); a line that is nowhere lowest is left out. Slopes fall
    as j rises, so one pass with a stack finds it (the convex hull trick)."""
    lines, starts = [], []
    for j in range(len(c)):
        start = -np.inf
        while lines:
            t = lines[-1]
            if c[j] == c[t]:  # parallel: the lower one is lowest wherever either is
                start = None if b[j] >= b[t] else -np.inf
            else:
                start = (b[j] - b[t]) / (2 * (c[j] - c[t]))  # where line j drops below line t
            if start is None or start > starts[-1]:
                break
            lines.pop(), starts.pop()  # line t is lowest nowhere
            start = -np.inf
        if start is not None:
            lines.append(j)
            starts.append(start)
    return np.array(lines), np.array(starts[1:])


def entropy_constrained(values, centroids, weight, max_iter=1000):
    """Entropy-constrained scalar quantization (Chou, Lookabaugh & Gray 1989), started from
    k-means centroids: each weight goes to the centroid that minimises
    (w - c_j)^2 + lambda * l_j, l_j = -log2(share of weights in cluster j) the length of its
    code in bits and lambda = weight * var(values); then the centroids move to their clusters'
    means and the lengths to the new shares, until the assignment repeats. Each step lowers
    distortion + lambda * rate, so weights drift to common codes, rare clusters empty and are
    dropped, and the index stream that stage 3 entropy-codes shrinks; weight = 0 is k-means.

    Under this cost the best centroid for w is the lowest of k lines in w (w^2 is common to
    all), so the clusters are still intervals of the sorted weights, found by one searchsorted
    of the envelope's breaks. values: (n,) float tensor; centroids: (k,) ascending, from
    kmeans_1d. Returns (centroids (k',) float32 ascending, labels (n,) int64 in 0..k'-1),
    k' <= k, every cluster used."""
    x = values.detach().reshape(-1).cpu().numpy().astype(np.float64)
    c = centroids.detach().cpu().numpy().astype(np.float64)
    if len(x) == 0 or len(c) < 2 or weight <= 0:
        return centroids, torch.from_numpy(_nearest(x, c).astype(np.int64)).to(values.device)
    xs = np.sort(x)
    lam = weight * xs.var()
    counts = np.diff(_boundaries(xs, c)).astype(np.float64)
    previous = None
    for _ in range(max_iter):
        used = counts > 0
        c, counts = c[used], counts[used]
        lines, breaks = _lower_envelope(c, c * c - lam * np.log2(counts / len(xs)))
        b = np.concatenate([[0], np.searchsorted(xs, breaks), [len(xs)]])  # a point on a break goes right
        done = previous is not None and np.array_equal(b, previous)
        previous = b
        c, counts = c[lines], np.diff(b).astype(np.float64)
        if done:
            break
        filled = counts > 0
        c[filled] = np.add.reduceat(xs, b[:-1][filled]) / counts[filled]
    keep = counts > 0
    labels = (np.cumsum(keep) - 1)[np.searchsorted(breaks, x, side="right")]
    return (torch.from_numpy(c[keep].astype(np.float32)).to(values.device),
            torch.from_numpy(labels.astype(np.int64)).to(values.device))


# --- layers with shared weights -------------------------------------------------------------

def index_dtype(k):
    """Smallest integer dtype for cluster indices 0..k-1: uint8 up to 256 clusters, else the
    smallest signed one (int16, int32)."""
    return next(d for d in (torch.uint8, torch.int16, torch.int32, torch.int64)
                if k - 1 <= torch.iinfo(d).max)


class _SharedWeight:
    """A masked layer whose weight is shared (section 3.3): a `codebook` Parameter (k,) of
    centroids and a fixed integer `index` buffer of the weight's shape replace the weight.

    The weight is rebuilt at every use as codebook[index] * mask. The backward pass of the
    lookup adds up the gradients of all weights of a cluster into its centroid, which is
    eq. 3 of the paper; index and mask are buffers, so the assignment and the pruning stay
    fixed. (The layer's forward multiplies by the mask once more, which changes nothing.)"""

    @property
    def weight(self):
        # index_select is codebook[index]; its backward (index_add) ran 2-4x faster than
        # plain indexing's on the CPU.
        return self.codebook.index_select(0, self.index.reshape(-1).long()).view(self.index.shape) * self.mask


class QuantizedLinear(_SharedWeight, MaskedLinear):
    """MaskedLinear with weight (out, in) = codebook[index] * mask and no weight Parameter."""


class QuantizedConv2d(_SharedWeight, MaskedConv2d):
    """MaskedConv2d with weight (out, in/groups, kh, kw) = codebook[index] * mask."""


QUANTIZED = {MaskedLinear: QuantizedLinear, MaskedConv2d: QuantizedConv2d}


def to_quantized(layer, codebook, index):
    """Turn a MaskedLinear / MaskedConv2d into its quantized class in place, so it keeps its
    place in any nested model, its bias and its mask. Its weight Parameter is dropped for
    `codebook` (k,) float (a Parameter) and `index` (the weight's shape, integer dtype,
    0 where pruned; a buffer). Returns the layer."""
    quantized_class = QUANTIZED[type(layer)]
    if "weight" in layer._parameters:  # (a ternary layer being frozen has none left)
        del layer.weight
    layer.__class__ = quantized_class
    layer.codebook = nn.Parameter(codebook.float().to(layer.mask.device))
    layer.register_buffer("index", index.to(layer.mask.device))
    return layer


def quantize_layer(layer, bits, init="linear", seed=0, entropy_weight=0.0):
    """Cluster the layer's surviving weights (mask == 1) into at most 2**bits shared values
    (section 3.1) and make it a quantized layer; with entropy_weight > 0 the k-means clusters
    are then traded for shorter codes (entropy_constrained). Pruned weights are never
    clustered: they get index 0 and stay exactly 0 through the mask. Returns the codebook
    size."""
    alive = layer.mask.bool()
    weights = layer.weight.detach()[alive]
    centroids, labels = kmeans_1d(weights, 2 ** bits, init, seed)
    if entropy_weight > 0:
        centroids, labels = entropy_constrained(weights, centroids, entropy_weight)
    if len(centroids) == 0:  # every weight pruned: one unused code keeps the codebook valid
        centroids = centroids.new_zeros(1)
    index = torch.zeros(alive.shape, dtype=index_dtype(len(centroids)), device=alive.device)
    index[alive] = labels.to(index.dtype)
    to_quantized(layer, centroids, index)
    return len(centroids)


def quantize_model(net, bits, init="linear", seed=0, entropy_weight=0.0):
    """Quantize every masked layer of `net` in place, at any depth. bits, entropy_weight: a
    number or a per-layer dict (prune.layer_value). Returns {layer name: {'bits', 'clusters'
    (codebook size)}}."""
    out = {}
    for name, m in tqdm(masked_layers(net), desc="k-means", leave=False):
        b = layer_value(bits, name, layer_kind(m))
        w = layer_value(entropy_weight, name, layer_kind(m))
        out[name] = dict(bits=b, clusters=quantize_layer(m, b, init, seed, w))
    return out


def share_values(tensors, bits, init="linear", seed=0, relative=False):
    """Replace tensors (a bias (out,), batch-norm scales (C,) of several layers) in place by
    one k-means clustering of all their elements into at most 2**bits values, each element
    becoming its cluster's centroid, so stage 3 can store one small table and a short code
    per element instead of 32 bits. tensors: a tensor or a list of them.

    relative: cluster asinh(x / c), c = 1% of the median |x| (logarithmic beyond c, linear
    within, sign kept), for values that span decades: folded batch-norm scales run from 0.01
    to 200 across a network, and evenly spaced centroids leave the many small ones one value.
    The centroids are then rounded to float16 (a relative step of 0.1%, far finer than the
    clusters'), so stage 3 stores the table in 2 bytes a value.
    Returns the number of distinct values."""
    tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
    x = torch.cat([t.detach().reshape(-1) for t in tensors])
    if relative:
        c = 0.01 * x.abs().median().clamp_min(torch.finfo(x.dtype).tiny)
        centroids, labels = kmeans_1d(torch.asinh(x / c), 2 ** bits, init, seed)
        centroids = c * torch.sinh(centroids)
        half = centroids.half().float()
        centroids = half if torch.isfinite(half).all() else centroids
    else:
        centroids, labels = kmeans_1d(x, 2 ** bits, init, seed)
    with torch.no_grad():
        for t, part in zip(tensors, centroids[labels].split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))
    return len(centroids.unique())


def grid_step(values, bits):
    """The exponent e of the power-of-two step 2**e that gives the largest |value| of `values`
    `bits` significant bits (it becomes an integer n with 2**(bits-1) <= |n| <= 2**bits), or
    None for all-zero (or empty) values. values: a float tensor of any shape."""
    top = values.detach().abs().max().item() if values.numel() else 0.0
    return None if top == 0 else math.floor(math.log2(top)) - (bits - 1)


def round_to_grid(tensors, bits):
    """Round float32 tensors in place to integer multiples of one power-of-two step 2**e,
    e = grid_step over all of them: every value becomes n * 2**e exactly, |n| <= 2**bits, and
    stage 3 stores the table as the integers (a few bits a value) instead of 32-bit floats
    (docs/format.md, float blocks). Meant for codebooks and shared biases, whose values sit
    2**-(bits-1) of the largest or further apart at worst: 8 bits moves a centroid by at most
    0.4% of the largest |centroid|, a 3-bit codebook's clusters are 25% of it apart.
    -0.0 becomes 0.0. Returns e, or None where every value is 0 (nothing changes)."""
    tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
    values = torch.cat([t.detach().reshape(-1) for t in tensors])
    if not torch.isfinite(values).all():
        raise ValueError("values to put on a grid must be finite (a NaN or infinity is among them)")
    e = grid_step(values, bits)
    if e is not None:
        top = float(math.floor(torch.finfo(torch.float32).max / 2.0 ** e))  # float32's largest is not rounded past
        with torch.no_grad():
            for t in tensors:  # n * 2**e: exact in float32 for |n| < 2**24; + 0.0 drops the sign of a zero
                t.copy_(torch.round(t.double() / 2.0 ** e).clamp_(-top, top).mul_(2.0 ** e).add_(0.0).to(t.dtype))
    return e


def fold_batch_norm(bn):
    """Fold an inference-mode batch-norm's running statistics into its scale and shift, in
    place: y = (x - mean) / sqrt(var + eps) * weight + bias becomes y = x * weight' + bias'
    with weight' = weight / sqrt(var + eps), bias' = bias - mean * weight', running_mean 0 and
    running_var 1 - eps. The layer computes the same function (to float32 rounding) and stays
    an ordinary nn.BatchNorm2d, but two of its four vectors become constant, which stage 3
    stores in a few bytes. Only for inference: training mode uses the batch's statistics."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bn.bias.sub_(bn.running_mean * scale)
        bn.weight.copy_(scale)
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)


def round_to_half(*tensors):
    """Round float32 tensors in place to the nearest float16 value (they stay float32), so
    stage 3 can store each value in 2 bytes exactly. Raises on values beyond float16's range."""
    with torch.no_grad():
        for t in tensors:
            half = t.half()
            if not torch.isfinite(half).all() and torch.isfinite(t).all():
                raise ValueError(f"values up to {t.abs().max().item():.3g} overflow float16 (max 65504)")
            t.copy_(half.float())


# --- trained ternary quantization (Zhu, Han, Mao & Dally 2017) -----------------------------

class _Ternarize(torch.autograd.Function):
    """w_t = W_p where latent > delta, -W_n where latent < -delta, 0 between, delta = t x
    max|latent| (section 3, eq. 6, and the paper's threshold rule).

    Backward (section 3): the scales get the summed gradients of the weights they stand for,
    dL/dW_p = sum over I_p of dL/dw_t and dL/dW_n = -(sum over I_n of dL/dw_t) (eq. 7, the
    minus sign from w_t = -W_n with W_n kept positive); the latent weights get the gradient
    scaled by their scale, dL/dlatent = W_p x dL/dw_t on I_p, 1 x dL/dw_t on I_z, W_n x dL/dw_t
    on I_n (eq. 8)."""

    @staticmethod
    def forward(ctx, latent, wp, wn, t):
        delta = t * latent.detach().abs().max()
        pos, neg = latent > delta, latent < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return torch.where(pos, wp, torch.where(neg, -wn, torch.zeros_like(latent)))

    @staticmethod
    def backward(ctx, grad):
        pos, neg, wp, wn = ctx.saved_tensors
        grad_latent = grad * torch.where(pos, wp, torch.where(neg, wn, torch.ones_like(grad)))
        return grad_latent, grad[pos].sum().reshape(wp.shape), -grad[neg].sum().reshape(wn.shape), None


def ternarize(latent, wp, wn, t):
    """The ternary weight (latent's shape) of latent weights `latent`, scales wp, wn (1,) and
    threshold fraction t, with TTQ's gradients (see _Ternarize)."""
    return _Ternarize.apply(latent, wp, wn, t)


class _TernaryWeight:
    """A masked layer trained ternary: a `latent` Parameter of the weight's shape (the
    full-precision weights, scaled so that max|latent| = 1 when made), Parameters `wp` and `wn`
    (1,) (the positive and negative scales, in weight units) and a float `threshold` t replace
    the weight, rebuilt at every use as ternarize(latent, wp, wn, t) * mask. Pruned weights
    stay zero through the mask."""

    @property
    def weight(self):
        return ternarize(self.latent, self.wp, self.wn, self.threshold) * self.mask


class TernaryLinear(_TernaryWeight, MaskedLinear):
    """MaskedLinear with weight (out, in) in {-wn, 0, wp}."""


class TernaryConv2d(_TernaryWeight, MaskedConv2d):
    """MaskedConv2d with weight (out, in/groups, kh, kw) in {-wn, 0, wp}."""


TERNARY = {MaskedLinear: TernaryLinear, MaskedConv2d: TernaryConv2d}


def to_ternary(layer, t):
    """Make a MaskedLinear / MaskedConv2d ternary in place (kept in its model, its bias and
    mask kept). The latent weights are the layer's weights divided by their largest magnitude
    (section 4: weights normalised to [-1, 1]); the scales start at the mean magnitude of the
    weights above and below the threshold (the least-squares fit of a ternary code given its
    zeros, Li & Liu 2016), so the first forward pass is the best ternary copy of the layer."""
    with torch.no_grad():
        w = layer.weight.detach() * layer.mask
        top = w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)
        latent = w / top
        pos, neg = latent > t, latent < -t
        wp = w[pos].mean() if pos.any() else t * top
        wn = -w[neg].mean() if neg.any() else t * top
    del layer.weight
    layer.__class__ = TERNARY[type(layer)]
    layer.latent = nn.Parameter(latent)
    layer.wp = nn.Parameter(wp.reshape(1).float())
    layer.wn = nn.Parameter(wn.reshape(1).float())
    layer.threshold = float(t)
    return layer


def ternary_to_quantized(layer):
    """Freeze a ternary layer into the quantized layer stage 3 stores: codebook [-wn, wp],
    index 1 where the weight is wp, 0 where -wn, and the mask cut to the non-zero weights (stage
    3 then codes one symbol of three per weight). Computes the same weight. Returns the layer."""
    with torch.no_grad():
        w = ternarize(layer.latent, layer.wp, layer.wn, layer.threshold) * layer.mask
        codebook = torch.cat([-layer.wn, layer.wp]).detach()
        index = (w > 0).to(torch.uint8)
        mask = (w != 0).to(layer.mask.dtype)
    masked_class = next(k for k, v in TERNARY.items() if v is type(layer))
    for name in ("latent", "wp", "wn"):
        delattr(layer, name)
    del layer.threshold
    layer.__class__ = masked_class
    layer.mask.copy_(mask)
    return to_quantized(layer, codebook, index)


def build_quantized_model(model_args, quantized):
    """The model of a quantized checkpoint, uninitialised, ready for load_state_dict.

    model_args: the checkpoint's 'model' entry {'name', 'kwargs'}; quantized: its 'quantized'
    entry {layer name: {'bits', 'clusters'}}."""
    net = build_model(model_args["name"], **model_args["kwargs"])
    layers = dict(masked_layers(net))
    for name, q in quantized.items():
        k = q["clusters"]
        to_quantized(layers[name], torch.zeros(k), torch.zeros(layers[name].weight.shape, dtype=index_dtype(k)))
    return net


def load_quantized(path, device):
    """-> (model on `device` with the checkpoint's weights, checkpoint dict) for a
    {model}_quantized.pt file; a missing or wrong-stage file raises util.UserError."""
    ckpt = util.load_checkpoint(path, "quantized", device, "run quantization.py first")
    net = build_quantized_model(ckpt["model"], ckpt["quantized"]).to(device)
    net.load_state_dict(ckpt["state_dict"])
    return net, ckpt


# --- the per-layer table --------------------------------------------------------------------

def layer_rows(net, quantized, zeros):
    """[{name, shape, total, nonzero, bits, clusters (used by surviving weights), distinct
    (non-zero weight values), zeros_kept}] for the quantized layers of `net`, in model order.

    zeros: {layer name: bool tensor, True where the pruned model's weight was 0}; zeros_kept
    says whether every one of those weights is still 0 (ternary layers add zeros of their own)."""
    rows = []
    for name, m in masked_layers(net):
        if name not in quantized:  # left in float32 (TTQ's first and last layers)
            continue
        w, alive = m.weight.detach(), m.mask.bool()
        used = torch.bincount(m.index[alive].long().cpu(), minlength=len(m.codebook))
        rows.append(dict(name=name, shape=list(w.shape), total=w.numel(), nonzero=int((w != 0).sum()),
                         bits=quantized[name]["bits"], clusters=int(used.count_nonzero()),
                         distinct=len(np.unique(w[w != 0].cpu().numpy())),
                         zeros_kept=bool((w[zeros[name]] == 0).all())))
    return rows
