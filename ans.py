"""The ANS context models of a quantized layer's 'A' section (dcfile.py; the format:
docs/format.md): how likely each weight's presence and cluster is, given what was coded before
it, so that constriction's ANS coder (Duda 2013) spends -log2 p bits a symbol where a Huffman
code spends whole bits. The encoder and the decoder run the same model functions, each with a
callback that records or decodes one column.

A layer's weight is a matrix: rows = outputs, columns = the rest flattened; each row is read
as an image of c x h x w (a conv's kernel, or a square that divides an fc layer's inputs).
Presence models: uniform (p = non-zeros / elements), margins (p from the row and column
counts), neighbours (p adaptive in the context of four neighbours' bits, as JBIG codes a
bilevel image). Cluster models: static (the layer's frequencies), neighbours (adaptive in the
context of two neighbours' signs).
"""
import math
import struct

import constriction
import numpy as np

P_MIN = 2.0 ** -12      # presence probabilities are kept in [p, 1 - p]: a surprise costs 12 bits at most
PRIOR = 0.5             # adaptive counts start here for every outcome (Krichevsky-Trofimov: no outcome is free)
NEIGHBOURS = 4          # left, up, up-left, up-right: the places of a row's image coded before this one
SIGNS = 3               # a neighbour's weight as a cluster context: absent | negative centroid | non-negative
PRESENCE_MODELS = ("uniform", "margins", "neighbours")
CLUSTER_MODELS = ("static", "neighbours")
CONTEXT_CLUSTERS = 256  # the encoder gives the neighbours cluster model at most this many centroids (it holds
                        # k probabilities for every weight it codes)
CONTEXT_CELLS = 1 << 20  # rows x k probabilities the neighbours cluster model computes at once (8 MB): a column
                         # of 65,535 weights with 2^16 centroids (a hostile file can say so) would ask 32 GB


def margins_model(rows, cols, nnz):
    """The presence probabilities of the rows x cols matrix of a layer (rows: outputs, cols:
    inputs x kernel) whose non-zeros number rows (R,) per row and cols (C,) per column:
    p[i, j] = rows[i] cols[j] / nnz (the independence model given both margins, whose row and
    column sums are the margins). Only rows and columns that hold a non-zero are coded: a dead
    neuron or input costs its count alone. -> (alive rows (R',), alive cols (C',), p (R', C'))
    float64, the same on every machine (integer products, one division, one clip)."""
    alive_r, alive_c = np.flatnonzero(rows), np.flatnonzero(cols)
    p = np.outer(rows[alive_r], cols[alive_c]).astype(np.float64) / max(nnz, 1)
    return alive_r, alive_c, np.clip(p, P_MIN, 1 - P_MIN)


def layouts(shape):
    """The images (h, w) a row of this weight may be read as, its columns being c x h x w:
    a conv's kernel (in, kh, kw), and for a fully-connected layer each square h x h that
    divides its inputs (LeNet-300-100's fc1 reads one 28 x 28 MNIST image, LeNet-5's fc1 50
    maps of 4 x 4), h = 1 being a plain sequence. -> [(h, w)]"""
    n_cols = matrix(shape)[1]
    if len(shape) == 4:
        return [tuple(shape[2:])]
    return [(h, h) for h in range(1, math.isqrt(n_cols) + 1) if n_cols % (h * h) == 0]


def neighbours(n_cols, h, w):
    """The columns of each column's left, upper, upper-left and upper-right neighbour in its
    channel of the (c, h, w) image a row is read as, n_cols (an always-empty column) where it
    has none. -> (NEIGHBOURS, n_cols) int64"""
    j = np.arange(n_cols)
    x, y = j % w, (j // w) % h
    return np.stack([np.where(x > 0, j - 1, n_cols), np.where(y > 0, j - w, n_cols),
                     np.where((x > 0) & (y > 0), j - w - 1, n_cols),
                     np.where((y > 0) & (x < w - 1), j - w + 1, n_cols)])


def neighbour_presence(n_rows, n_cols, alive_c, nb, column):
    """The neighbours presence model, one live column at a time in order (the encoder and the
    decoder run this same code): the presence bit of each live row at column j has the context
    of its four neighbours' bits (16 contexts, as JBIG does for a bilevel image), each context
    an adaptive count of the bits seen so far, updated after every column, so no table is
    sent. column(j, p (n_rows,) float64) -> that column's bits (n_rows,) bool.
    -> the bits (n_rows, n_cols + 1) bool."""
    grid = np.zeros((n_rows, n_cols + 1), bool)
    ones, seen = np.zeros(1 << NEIGHBOURS), np.zeros(1 << NEIGHBOURS)
    weights = 1 << np.arange(NEIGHBOURS)
    for j in alive_c:
        ctx = grid[:, nb[:, j]] @ weights
        p = np.clip((ones[ctx] + PRIOR) / (seen[ctx] + 2 * PRIOR), P_MIN, 1 - P_MIN)
        grid[:, j] = column(j, p)
        ones += np.bincount(ctx, weights=grid[:, j], minlength=1 << NEIGHBOURS)
        seen += np.bincount(ctx, minlength=1 << NEIGHBOURS)
    return grid


def neighbour_clusters(present, codebook, alive_c, nb, column):
    """The neighbours cluster model: column by column as neighbour_presence, the cluster of
    each weight has the context of its left and upper neighbours' signs (absent, negative,
    non-negative centroid: 9 contexts; a pruned receptive field is smooth, so a weight's sign
    tells its neighbour's), each context adaptive counts of the k clusters.
    present (n_rows, n_cols) bool; codebook (k,). column(j, rows (m,), probabilities (m, k)
    float64) -> their clusters (m,), called for a column's rows in runs (CONTEXT_CELLS).
    -> clusters (n_rows, n_cols) int64, -1 where absent."""
    k = len(codebook)
    sign = np.where(np.asarray(codebook) < 0, 1, 2)
    n_rows, n_cols = present.shape
    clusters = np.full((n_rows, n_cols + 1), -1, np.int64)  # column n_cols: the absent neighbour
    signs = np.zeros((n_rows, n_cols + 1), np.int64)
    counts = np.full((SIGNS * SIGNS, k), PRIOR)
    step = max(1, CONTEXT_CELLS // k)
    for j in alive_c:
        present_rows = np.flatnonzero(present[:, j])
        ctx = SIGNS * signs[present_rows, nb[0, j]] + signs[present_rows, nb[1, j]]
        # the column's weights all see the counts as they stood before it: in runs of `step` rows
        # (the same symbols, the same order) the probabilities take CONTEXT_CELLS floats at most
        for a in range(0, len(present_rows), step):
            rows, c = present_rows[a:a + step], ctx[a:a + step]
            got = column(j, rows, counts[c] / counts[c].sum(1, keepdims=True))
            clusters[rows, j], signs[rows, j] = got, sign[got]
        np.add.at(counts, (ctx, clusters[present_rows, j]), 1)
    return clusters[:, :n_cols]


def flag_probabilities(n_rows, n_cols, live_rows, live_cols):
    """p of the neighbours model's live flags: a row's R'/R, then a column's C'/C. -> (R + C,)"""
    return np.clip(np.concatenate([np.full(n_rows, live_rows / n_rows), np.full(n_cols, live_cols / n_cols)]),
                   P_MIN, 1 - P_MIN)


def words(encode):
    """Run encode(coder) on a fresh ANS coder -> its compressed words (n,) uint32 as bytes
    (u32 count first)."""
    coder = constriction.stream.stack.AnsCoder()
    encode(coder)
    words = coder.get_compressed().astype("<u4")
    return struct.pack("<I", len(words)) + words.tobytes()


def static_model(freqs):
    return constriction.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def neighbour_payloads(present, flat_index, codebook, h, w):
    """Encode a layer's presence and clusters under the neighbours models read as images of
    h x w. present (R, C) bool, flat_index (R * C,). -> (presence bytes, cluster bytes, None
    for a single centroid or more than CONTEXT_CLUSTERS)."""
    n_rows, n_cols = present.shape
    alive_r, alive_c = np.flatnonzero(present.any(1)), np.flatnonzero(present.any(0))
    nb = neighbours(n_cols, h, w)
    live = present[alive_r]
    ps, bits = [], []

    def column(j, p):
        ps.append(p)
        bits.append(live[:, j])
        return live[:, j]

    grid = neighbour_presence(len(alive_r), n_cols, alive_c, nb, column)
    flags = np.concatenate([present.any(1), present.any(0)]).astype(np.int32)
    symbols = np.concatenate([flags] + bits).astype(np.int32)
    p = np.concatenate([flag_probabilities(n_rows, n_cols, len(alive_r), len(alive_c))] + ps)
    bit = bernoulli()
    presence = (struct.pack("<BII", 2, len(alive_r), len(alive_c))
                + words(lambda c: c.encode_reverse(symbols, bit, p)))
    if len(codebook) == 1 or len(codebook) > CONTEXT_CLUSTERS:  # every cluster known; or the static model
        return presence, None
    index = flat_index.reshape(n_rows, n_cols)[alive_r]
    probs, got = [], []

    def cluster_column(j, rows, q):
        probs.append(q)
        got.append(index[rows, j].astype(np.int64))
        return got[-1]

    neighbour_clusters(grid[:, :n_cols], codebook, alive_c, nb, cluster_column)
    cluster = categorical()
    clusters = struct.pack("<B", 1) + (words(lambda c: c.encode_reverse(
        np.concatenate(got).astype(np.int32), cluster, np.concatenate(probs))) if got else words(lambda c: None))
    return presence, clusters


def bernoulli():
    """constriction's model of one presence bit, whose p is given per symbol."""
    return constriction.stream.model.Bernoulli(perfect=False)


def categorical():
    """constriction's model of one cluster index, whose probabilities are given per symbol."""
    return constriction.stream.model.Categorical(perfect=False)


def matrix(shape):
    """(rows, columns) of a weight of this shape seen as a matrix: outputs x the rest."""
    return (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)


def read_words(r):
    n = r.unpack("<I")[0]
    if n > (len(r.buf) - r.pos) // 4:
        raise ValueError(f"{n} ANS words where {len(r.buf) - r.pos} bytes are left")
    words = np.frombuffer(r.take(4 * n), "<u4").astype(np.uint32)
    try:
        return constriction.stream.stack.AnsCoder(words)
    except ValueError as e:
        raise ValueError(f"bad ANS stream ({e})") from None


def symbols(coder, model, *params):
    """Decode the next symbols (as many as params, or params[0] for a fixed model) -> (n,) int64."""
    try:
        return np.asarray(coder.decode(model, *params), np.int64)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"bad ANS stream ({e})") from None


def end(coder):
    if not coder.is_empty():
        raise ValueError("ANS stream holds more than its symbols: corrupt")


def decode(coder, count, model, *params):
    """Decode `count` symbols and check that they used up the stream exactly."""
    out = symbols(coder, model, *(params or (count,)))
    end(coder)
    return out


def read_neighbour_presence(r, n_rows, n_cols, nnz, nb):
    """Presence model 2 (see neighbour_payloads) -> present (n_rows, n_cols) bool."""
    live_rows, live_cols = r.unpack("<II")
    if live_rows > n_rows or live_cols > n_cols or nnz < max(live_rows, live_cols) or (nnz and not live_rows):
        raise ValueError(f"{live_rows} live rows and {live_cols} live columns of {n_rows} x {n_cols} "
                         f"for {nnz} non-zeros")
    coder = read_words(r)
    bit = bernoulli()
    flags = symbols(coder, bit, flag_probabilities(n_rows, n_cols, live_rows, live_cols)).astype(bool)
    alive_r, alive_c = np.flatnonzero(flags[:n_rows]), np.flatnonzero(flags[n_rows:])
    if len(alive_r) != live_rows or len(alive_c) != live_cols:
        raise ValueError(f"flags mark {len(alive_r)} rows and {len(alive_c)} columns live where the section "
                         f"says {live_rows} and {live_cols}: corrupt")
    live = neighbour_presence(live_rows, n_cols, alive_c, nb,
                               lambda j, p: symbols(coder, bit, p).astype(bool))[:, :n_cols]
    end(coder)
    if live.sum() != nnz or not live.any(1).all() or not live[:, alive_c].any(0).all():
        raise ValueError(f"presence bits hold {live.sum()} non-zeros where the section says {nnz}, "
                         "or leave a live row or column empty: corrupt")
    present = np.zeros((n_rows, n_cols), bool)
    present[alive_r] = live
    return present
