"""Running the compressed model (Deep Compression section 6): a plain PyTorch export, and
inference straight from the sparse, quantized form.

The paper measured pruned fc layers at batch size 1 with CSR kernels (Table 8) but could not
run the quantized form, because "current BLAS library doesn't support indirect look-up and
relative indexing". Here a layer keeps, per non-zero, a small cluster index and a column
index, and a compiled loop (numba) looks each weight up in the layer's codebook as it
multiplies: for a 5-bit layer that is 3 bytes a weight (uint16 column, uint8 cluster) instead
of dense float32's 4 bytes for every weight, zeros included, or torch CSR's 12 (float32 value,
int64 column).

- `to_plain(net)`: ordinary nn.Linear / nn.Conv2d layers, weight = codebook[index] * mask,
  standard state-dict keys: what `torchvision.models.resnet18` or a mask-free model loads.
- `load(path, runtime)`: a compressed file's model in one of RUNTIMES.
- `to_sparse(net, example)`: each masked layer in whichever form ran fastest on its own input
  during a forward pass of `example`: the plain layer, a SparseLinear, or a SparseConv2d
  (direct from the non-zeros, on one thread or all, or the fc kernel on unfolded columns),
  with the batch norm and ReLU / ReLU6 that follow a conv folded into it. Each fc layer keeps
  its weight in whichever of two layouts ran faster: split (a uint16 column and a uint8
  cluster a weight, 3 bytes) or packed (one uint32 a weight, column | cluster << 16: a load
  fewer, 4 bytes), the packed one at batch 1 with a scalar or a vectorised (gather) loop.
Nothing here prints.
"""
import collections
import copy

import numba
import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

import dcfile
import util
from prune import MASKED, MaskedConv2d, masked_weight

PARALLEL_MIN_WORK = 1 << 16  # non-zeros x columns below which one thread beats a parallel launch
PREFETCH_AHEAD = 256  # non-zeros ahead of the batch-1 loops that their weight streams are prefetched


@intrinsic
def _prefetch(typingctx, array, i):
    """Ask the CPU to bring array[i]'s cache line in for reading (llvm.prefetch: a hint that
    never faults). The batch-1 loops consume their weights at a few GB/s, far below the
    memory's streaming rate, yet from a cold cache they stalled on them: the hardware
    prefetchers did not run far enough ahead of a stream read between the random gathers
    from x. 1 KB ahead took VGG-16 fc6 cold from 1.83 to 1.45 ms (docs/experiments.md)."""
    def codegen(context, builder, signature, args):
        view = context.make_array(array)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array, view, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        # read (0), no temporal locality (0: the weights are used once a call), data cache (1)
        builder.call(hint, [builder.bitcast(pointer, byte_pointer), int32(0), int32(0), int32(1)])
        return context.get_dummy_value()
    return numba.core.types.void(array, i), codegen


# --- kernels: y = W x with W in CSR form, its values looked up in a codebook ---------------------
# row_ptr (rows+1,) int32, col (nnz,) uint16/int32, cluster (nnz,) uint8/uint16/int32 into codebook (k,)
# float32; x (in, n) float32 C-contiguous; out (rows, n) float32. Rows are independent, so the
# parallel version splits them across threads; fastmath lets LLVM vectorise the n loop.

@numba.njit(cache=True, fastmath=True, nogil=True)
def _row(r, row_ptr, col, cluster, codebook, x, out):
    """Row r of W x. x (in,), one input vector (batch 1, out (rows,)): four independent sums.
    One sum is a chain of dependent adds, each waiting out the adder's latency; four chains
    keep the load units busy instead (2.3x on a 4096 x 4096 layer at 9%). x (in, n), n > 1
    (out (rows, n)): each weight looked up once, used n times. numba compiles each case apart."""
    if x.ndim == 1:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j, end = row_ptr[r], row_ptr[r + 1]
        while j + 4 <= end:
            if j + PREFETCH_AHEAD < len(col):
                _prefetch(col, j + PREFETCH_AHEAD)
                _prefetch(cluster, j + PREFETCH_AHEAD)
            a0 += codebook[cluster[j]] * x[col[j]]
            a1 += codebook[cluster[j + 1]] * x[col[j + 1]]
            a2 += codebook[cluster[j + 2]] * x[col[j + 2]]
            a3 += codebook[cluster[j + 3]] * x[col[j + 3]]
            j += 4
        while j < end:
            a0 += codebook[cluster[j]] * x[col[j]]
            j += 1
        out[r] = (a0 + a1) + (a2 + a3)
    else:
        n = x.shape[1]
        for t in range(n):
            out[r, t] = 0.0
        for j in range(row_ptr[r], row_ptr[r + 1]):
            w = codebook[cluster[j]]
            c = col[j]
            for t in range(n):
                out[r, t] += w * x[c, t]


@numba.njit(cache=True, fastmath=True, nogil=True)
def _spmm_serial(row_ptr, col, cluster, codebook, x, out):
    for r in range(len(row_ptr) - 1):
        _row(r, row_ptr, col, cluster, codebook, x, out)


@numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _spmm_parallel(row_ptr, col, cluster, codebook, x, out):
    for r in numba.prange(len(row_ptr) - 1):
        _row(r, row_ptr, col, cluster, codebook, x, out)


def spmm(row_ptr, col, cluster, codebook, x):
    """(rows, n) = W x for W in codebook-CSR form (see above) and x (in, n) float32 numpy."""
    return multiply(dict(row_ptr=row_ptr, col=col, cluster=cluster, codebook=codebook), x)


# --- the packed layout: one uint32 a weight, column | cluster << 16 -------------------------------
# Batch 1 reads, per weight, the packed word, the codebook entry and x[column]: three loads
# where the split layout makes four, with eight independent sums. LLVM's loop vectorizer turns
# this loop into AVX-512 gathers, 2.2x slower on the AMD EPYC (Zen 5) measured here at 9%
# density; numba has no per-function switch, so its global one is off while the batch-1
# kernels compile (_call_scalar). Batch n keeps the vectorised loop over the n columns.

@numba.njit(cache=True, fastmath=True, nogil=True, inline="always")
def _row_packed1(r, row_ptr, packed, codebook, x, out):
    """Row r of W x for one input vector x (in,), out (rows,), W's non-zeros in the packed
    layout: eight independent sums. Inlined by numba into its callers (12% faster here
    than an LLVM call); the constant 16 makes the shifts immediates (5% faster than a
    variable shift)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    j, end = row_ptr[r], row_ptr[r + 1]
    while j + 8 <= end:
        if j + PREFETCH_AHEAD < len(packed):
            _prefetch(packed, j + PREFETCH_AHEAD)
        p0, p1, p2, p3 = packed[j], packed[j + 1], packed[j + 2], packed[j + 3]
        p4, p5, p6, p7 = packed[j + 4], packed[j + 5], packed[j + 6], packed[j + 7]
        a0 += codebook[p0 >> 16] * x[p0 & 0xFFFF]
        a1 += codebook[p1 >> 16] * x[p1 & 0xFFFF]
        a2 += codebook[p2 >> 16] * x[p2 & 0xFFFF]
        a3 += codebook[p3 >> 16] * x[p3 & 0xFFFF]
        a4 += codebook[p4 >> 16] * x[p4 & 0xFFFF]
        a5 += codebook[p5 >> 16] * x[p5 & 0xFFFF]
        a6 += codebook[p6 >> 16] * x[p6 & 0xFFFF]
        a7 += codebook[p7 >> 16] * x[p7 & 0xFFFF]
        j += 8
    while j < end:
        p0 = packed[j]
        a0 += codebook[p0 >> 16] * x[p0 & 0xFFFF]
        j += 1
    out[r] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@numba.njit(cache=True, fastmath=True, nogil=True)
def _row_packedn(r, row_ptr, packed, codebook, x, out):
    """Row r of W x for x (in, n), out (rows, n): each weight looked up once, used n times."""
    n = x.shape[1]
    for t in range(n):
        out[r, t] = 0.0
    for j in range(row_ptr[r], row_ptr[r + 1]):
        w = codebook[packed[j] >> 16]
        c = packed[j] & 0xFFFF
        for t in range(n):
            out[r, t] += w * x[c, t]


@numba.njit(cache=True, fastmath=True, nogil=True)
def _spmm_packed_serial(row_ptr, packed, codebook, x, out):
    for r in range(len(row_ptr) - 1):
        if x.ndim == 1:  # numba compiles each case apart (the other branch is pruned)
            _row_packed1(r, row_ptr, packed, codebook, x, out)
        else:
            _row_packedn(r, row_ptr, packed, codebook, x, out)


@numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _spmm_packed_parallel(row_ptr, packed, codebook, x, out):
    for r in numba.prange(len(row_ptr) - 1):
        if x.ndim == 1:
            _row_packed1(r, row_ptr, packed, codebook, x, out)
        else:
            _row_packedn(r, row_ptr, packed, codebook, x, out)


# The same batch-1 loop left to LLVM's vectorizer: AVX-512 gathers, 2.2x slower than the scalar
# loop on the AMD EPYC (Zen 5) measured here, kept as a form a layer may choose where a CPU's
# gathers are fast (choose_layout: 'gather').

@numba.njit(cache=True, fastmath=True, nogil=True)
def _spmm_gather_serial(row_ptr, packed, codebook, x, out):
    for r in range(len(row_ptr) - 1):
        _row_packed1(r, row_ptr, packed, codebook, x, out)


@numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _spmm_gather_parallel(row_ptr, packed, codebook, x, out):
    for r in numba.prange(len(row_ptr) - 1):
        _row_packed1(r, row_ptr, packed, codebook, x, out)


_SCALAR_COMPILED = set()


def _call_scalar(kernel, *args):
    """kernel(*args), its signature compiled (or read from numba's cache, where it was written
    the same way) with LLVM's loop vectorizer off."""
    # dtypes and ranks name the signature (numba.typeof, 7 us an argument, would double a LeNet layer's time)
    key = (kernel, tuple((a.dtype.char, a.ndim, a.flags.c_contiguous) if isinstance(a, np.ndarray) else type(a)
                         for a in args))
    if key not in _SCALAR_COMPILED:
        old = numba.config.LOOP_VECTORIZE
        numba.config.LOOP_VECTORIZE = 0
        try:
            kernel.compile(tuple(numba.typeof(a) for a in args))
        finally:
            numba.config.LOOP_VECTORIZE = old
        _SCALAR_COMPILED.add(key)
    kernel(*args)


def pack(form):
    """The packed layout of a split codebook-CSR form (csr_from_layer's): dict(row_ptr,
    packed (nnz,) uint32 = column | cluster << 16, codebook); None where a column or a
    cluster index needs more than 16 bits."""
    if form["col"].dtype != np.uint16 or len(form["codebook"]) > 2 ** 16:
        return None
    packed = form["col"].astype(np.uint32) | (form["cluster"].astype(np.uint32) << np.uint32(16))
    return dict(row_ptr=form["row_ptr"], packed=packed, codebook=form["codebook"])


def multiply(form, x, gather=False):
    """(rows, n) = W x for W in either layout (csr_from_layer's split form, or pack's) and x
    (in, n) float32 numpy. gather: batch 1 in the packed layout runs the vectorised loop, not
    the scalar one. Threads: numba's (numba.set_num_threads), used only when the work is large
    enough."""
    rows, n = len(form["row_ptr"]) - 1, x.shape[1]
    # batch 1 goes in as a contiguous vector, so that its stride drops out of the addressing
    x = np.ascontiguousarray(x[:, 0] if n == 1 else x, dtype=np.float32)
    out = np.empty((rows, n) if n > 1 else rows, np.float32)
    split = "col" in form
    weights = (form["col"], form["cluster"]) if split else (form["packed"],)
    parallel = len(weights[0]) * n >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1
    kernel = {(True, False): _spmm_serial, (True, True): _spmm_parallel,
              (False, False): _spmm_packed_serial, (False, True): _spmm_packed_parallel}[split, parallel]
    args = (form["row_ptr"], *weights, form["codebook"], x, out)
    if n == 1 and not split:
        if gather:
            (_spmm_gather_parallel if parallel else _spmm_gather_serial)(*args)
        else:
            _call_scalar(kernel, *args)
    else:
        kernel(*args)
    return out.reshape(rows, n)


def choose_layout(form, x, timer=None):
    """The fastest form of W x on this input: (form, 'split' | 'packed' | 'gather'), 'gather'
    (batch 1 only) being the packed layout with multiply's vectorised loop. form:
    csr_from_layer's; x (in, n) float32. timer(fn) -> seconds; by default the best of 5
    calls after one untimed call (a benchmark passes its own, cold caches included: the packed
    layout's extra byte a weight costs more where the weights come from memory)."""
    packed = pack(form)
    if packed is None:
        return form, "split"
    if timer is None:
        timer = lambda fn: (fn(), util.best_time(fn, 5)[0])[1]  # noqa: E731
    forms = {"split": form, "packed": packed, **({"gather": packed} if x.shape[1] == 1 else {})}
    times = {name: timer(lambda: multiply(f, x, name == "gather")) for name, f in forms.items()}
    best = min(times, key=times.get)
    return forms[best], best


def csr_from_layer(layer):
    """The codebook-CSR form of a masked or quantized layer's weight, its rows the output
    units and its columns the flattened inputs (in, or in_channels x kh x kw for a conv).

    Returns dict(row_ptr (rows+1,) int32, col (nnz,) uint16 or int32, cluster (nnz,) uint8,
    uint16 or int32, codebook (k,) float32). A masked layer that was not quantized gets the codebook of
    its distinct surviving values."""
    mask = layer.mask.detach().cpu().reshape(layer.mask.shape[0], -1).numpy() == 1
    rows, cols = mask.shape
    if hasattr(layer, "codebook"):
        codebook = layer.codebook.detach().cpu().float().numpy()
        cluster = layer.index.detach().cpu().reshape(rows, -1).numpy()[mask]
    else:
        values = layer.weight.detach().cpu().reshape(rows, -1).float().numpy()[mask]
        codebook, cluster = np.unique(values, return_inverse=True)
        codebook = codebook.astype(np.float32)
    if len(codebook) == 0:
        codebook = np.zeros(1, np.float32)
    row_ptr = np.zeros(rows + 1, np.int64)
    np.cumsum(mask.sum(1), out=row_ptr[1:])
    if row_ptr[-1] >= 2 ** 31:
        raise ValueError(f"{row_ptr[-1]} non-zeros: more than an int32 row pointer holds")
    col = np.nonzero(mask)[1]  # row-major order: the non-zeros of row r are row_ptr[r]:row_ptr[r+1]
    # unsigned columns: numba then skips the negative-index wrap-around (6% faster here)
    return dict(row_ptr=row_ptr.astype(np.int32), col=col.astype(np.uint16 if cols <= 2 ** 16 else np.int32),
                cluster=cluster.astype(np.uint8 if len(codebook) <= 2 ** 8 else np.uint16 if len(codebook) <= 2 ** 16
                                       else np.int32), codebook=codebook)


class _Sparse(nn.Module):
    """Holds a layer's weight in codebook-CSR form as buffers, and its bias. CPU only.
    example: an input (in, n) float32 numpy of the multiply, on which the faster layout is
    chosen (choose_layout); None keeps the split layout."""

    def __init__(self, layer, example=None):
        super().__init__()
        form, self.layout = csr_from_layer(layer), "split"
        if example is not None:
            form, self.layout = choose_layout(form, example)
        self.form = form  # numpy views of the buffers below, so that a call builds nothing
        for key, value in form.items():
            self.register_buffer(key, torch.from_numpy(value))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().cpu().clone(),
                                                                 requires_grad=False)

    def resident_bytes(self):
        """Bytes of the weight's compact form held in memory (row pointers, columns and
        clusters or packed words, codebook), the bias left out as for the dense weight it replaces."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class SparseLinear(_Sparse):
    """nn.Linear from the compressed form. x: (N, in) -> (N, out). example: an input (N, in)
    on which the layout is chosen (None: the split layout)."""

    def __init__(self, layer, example=None):
        if example is not None:
            example = example.reshape(-1, layer.in_features).float().t().contiguous().numpy()
        super().__init__(layer, example)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x):
        shape = x.shape
        xt = x.detach().reshape(-1, self.in_features).float().t().contiguous().numpy()
        y = torch.from_numpy(multiply(self.form, xt, self.layout == "gather")).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# --- sparse convolution, direct, from the compact form -------------------------------------------
# out[o, i, j] = sum over o's non-zeros (c, u, v) of w * xpad[c, i*s + u*d, j*s + v*d], xpad the
# zero-padded input. The padded input is split into its s x s stride phases, plane (c, a, b) =
# xpad[c, a::s, b::s], each (hp, wp), so that every non-zero reads its plane shifted by
# (u*d // s, v*d // s) with stride 1. With the outputs laid out (ho, wp), wp - wo spare columns a
# row that are dropped at the end, a non-zero's whole contribution to its output channel is one
# contiguous run: acc[q] += w * planes[offset + q], q < ho * wp. Each output channel keeps a
# block of its outputs in L1 while its non-zeros pass over it, four at a time (one load and
# store of the block for four multiply-adds), vectorised over q: the arithmetic is the
# non-zeros' alone, and the input is read in place, with no unfolded copy (kh * kw times the
# input) as im2col makes. A plane has one spare zero row at the bottom, so that the spare
# columns of the last output row read zeros inside the plane; where no non-zero reads to the
# right of its own column (kw = 1) nothing needs it, and an unpadded, stride-1 conv of that kind
# (a pointwise one) reads its input as it comes, with no planes made.

CONV_BLOCK = 1024  # outputs (floats) of one channel accumulated at once: 4 KB, well inside L1


@numba.njit(cache=True, nogil=True)
def _phases(x, ph, pw, sh, sw, planes):
    """Write x (N, C, H, W) into planes (N, C*sh*sw, hp, wp), zeroed: plane c*sh*sw + a*sw + b
    holds rows a, a+sh, ... and columns b, b+sw, ... of x zero-padded by (ph, pw)."""
    h, w = x.shape[2], x.shape[3]
    if sh == 1 and sw == 1:  # one plane a channel: each row copied whole
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                for i in range(h):
                    src, dst = x[n, c, i], planes[n, c, i + ph, pw:pw + w]
                    for k in range(w):
                        dst[k] = src[k]
        return
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(h):
                r, a = (i + ph) // sh, (i + ph) % sh
                for b in range(sw):
                    j0 = (b - pw) % sw  # the first column of x that lands in phase b
                    # views that start where the copy does: their indices are provably >= 0, so
                    # numba's negative-index checks fold away and the loop vectorises
                    src, dst = x[n, c, i, j0:], planes[n, (c * sh + a) * sw + b, r, (j0 + pw) // sw:]
                    for k in range((w - j0 + sw - 1) // sw):
                        dst[k] = src[k * sw]


@numba.njit(cache=True, nogil=True)
def _conv_block_rows(ho, wp):
    """(output rows a block of _conv_blocks covers, blocks an output channel) for ho rows of
    wp padded columns: a block's accumulator holds CONV_BLOCK floats at most, and the blocks
    are as even as rows allow. Uneven ones (30 rows and 2 for ResNet-20's 32 x 32 maps) left
    one of two threads with most of the work: batch 1 ran 1.08x faster on two than on one."""
    most = max(1, CONV_BLOCK // wp)
    blocks = (ho + most - 1) // most
    step = (ho + blocks - 1) // blocks
    return step, (ho + step - 1) // step


@numba.njit(cache=True, fastmath=True, nogil=True)
def _conv_blocks(t0, t1, row_ptr, offset, cluster, codebook, planes, wp, epilogue, out):
    """Units t0 <= t < t1 of the convolution, t = (n * blocks + b) * rows + o: rows b*step ..
    of output channel o of image n (out (N, rows, ho, wo)), from planes (N, size). Output
    channels vary fastest, so that the input rows a block reads (every channel's, a few rows
    each) stay in L1 while the channels pass over them. epilogue (4, rows): scale, shift, low,
    high: out = min(max(scale * (W x) + shift, low), high), a bias, batch norm and ReLU / ReLU6."""
    rows = len(row_ptr) - 1
    ho, wo = out.shape[2], out.shape[3]
    step, blocks = _conv_block_rows(ho, wp)
    acc = np.empty(step * wp, np.float32)
    for t in range(t0, t1):
        o, nb = t % rows, t // rows
        n, i0 = nb // blocks, nb % blocks * step
        x = planes[n]
        m, q0 = (min(ho, i0 + step) - i0) * wp, i0 * wp
        for q in range(m):
            acc[q] = 0.0
        j, end = row_ptr[o], row_ptr[o + 1]
        while j + 4 <= end:
            w0, w1 = codebook[cluster[j]], codebook[cluster[j + 1]]
            w2, w3 = codebook[cluster[j + 2]], codebook[cluster[j + 3]]
            # slices, not x[offset + q]: a view's index is known non-negative, so the loop vectorises
            x0, x1 = x[offset[j] + q0:offset[j] + q0 + m], x[offset[j + 1] + q0:offset[j + 1] + q0 + m]
            x2, x3 = x[offset[j + 2] + q0:offset[j + 2] + q0 + m], x[offset[j + 3] + q0:offset[j + 3] + q0 + m]
            for q in range(m):
                acc[q] += (w0 * x0[q] + w1 * x1[q]) + (w2 * x2[q] + w3 * x3[q])
            j += 4
        while j < end:
            w, x0 = codebook[cluster[j]], x[offset[j] + q0:offset[j] + q0 + m]
            for q in range(m):
                acc[q] += w * x0[q]
            j += 1
        scale, shift, low, high = epilogue[0, o], epilogue[1, o], epilogue[2, o], epilogue[3, o]
        for i in range(m // wp):
            row, a = out[n, o, i0 + i], acc[i * wp:i * wp + wo]
            for k in range(wo):
                row[k] = min(max(scale * a[k] + shift, low), high)


@numba.njit(cache=True, nogil=True)
def _conv_units(n, rows, ho, wp):
    """How many units _conv_blocks splits a convolution into."""
    return n * rows * _conv_block_rows(ho, wp)[1]


@numba.njit(cache=True, fastmath=True, nogil=True)
def _conv_serial(row_ptr, offset, cluster, codebook, planes, wp, epilogue, out):
    total = _conv_units(out.shape[0], len(row_ptr) - 1, out.shape[2], wp)
    _conv_blocks(0, total, row_ptr, offset, cluster, codebook, planes, wp, epilogue, out)


@numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
def _conv_parallel(row_ptr, offset, cluster, codebook, planes, wp, epilogue, out, chunks):
    """_conv_serial's work in `chunks` runs of units spread over numba's threads."""
    total = _conv_units(out.shape[0], len(row_ptr) - 1, out.shape[2], wp)
    chunks = min(total, chunks)
    for c in numba.prange(chunks):
        _conv_blocks(c * total // chunks, (c + 1) * total // chunks, row_ptr, offset, cluster, codebook,
                     planes, wp, epilogue, out)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _affine(y, epilogue, out):
    """out (rows, L) = min(max(scale * y + shift, low), high), row by row (see _conv_blocks)."""
    for o in range(y.shape[0]):
        scale, shift, low, high = epilogue[0, o], epilogue[1, o], epilogue[2, o], epilogue[3, o]
        for k in range(y.shape[1]):
            out[o, k] = min(max(scale * y[o, k] + shift, low), high)


def epilogue(rows, bias=None, bn=None, act=None):
    """(4, rows) float32: the scale, shift, low and high that _conv_channels applies to W x for
    a conv with this bias (rows,) or None, followed by an eval-mode nn.BatchNorm2d or None and
    an nn.ReLU, nn.ReLU6 / nn.Hardtanh or None."""
    e = np.empty((4, rows), np.float32)
    scale, shift = torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    if bias is not None:
        shift = bias.detach().cpu().double()
    if bn is not None:
        var = bn.running_var if bn.track_running_stats else None
        util.require(var is not None, "batch norm without running statistics cannot be folded")
        s = 1 / torch.sqrt(var.detach().cpu().double() + bn.eps)
        if bn.affine:
            s = s * bn.weight.detach().cpu().double()
        shift = (shift - bn.running_mean.detach().cpu().double()) * s
        if bn.affine:
            shift = shift + bn.bias.detach().cpu().double()
        scale = s
    e[0], e[1] = scale.numpy(), shift.numpy()
    e[2], e[3] = -np.inf, np.inf
    if isinstance(act, nn.ReLU):
        e[2] = 0.0
    elif isinstance(act, nn.Hardtanh):  # nn.ReLU6 among them
        e[2], e[3] = act.min_val, act.max_val
    return e


def conv_geometry(layer, h, w):
    """(hp, wp, ho, wo): the stride-phase planes' shape (one spare row) and the output's, for
    an (h, w) input to `layer` (anything with nn.Conv2d's kernel_size, stride, padding and
    dilation pairs)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    spare = int((kw - 1) * dw >= sw)  # some non-zero reads its plane shifted right
    return -(-(h + 2 * ph) // sh) + spare, -(-(w + 2 * pw) // sw), ho, wo


def conv_offsets(layer, form, hp, wp):
    """(nnz,) int32: where each non-zero of the codebook-CSR form (csr_from_layer's; rows the
    output channels, columns (c, u, v) within the row's group) starts reading the flattened
    stride-phase planes (N, C*sh*sw * hp*wp)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    rows = np.repeat(np.arange(layer.out_channels), np.diff(form["row_ptr"]))
    col = form["col"].astype(np.int64)
    c = rows // (layer.out_channels // layer.groups) * (layer.in_channels // layer.groups) + col // (kh * kw)
    u, v = col % (kh * kw) // kw * dh, col % kw * dw
    plane = (c * sh + u % sh) * sw + v % sw
    offset = plane * hp * wp + u // sh * wp + v // sw
    if len(offset) and offset.max() + hp * wp >= 2 ** 31:
        raise ValueError("the input is too large for int32 offsets into the sparse conv's planes")
    return offset.astype(np.int32)


class SparseConv2d(_Sparse):
    """nn.Conv2d (any stride, zero padding, dilation and groups, depthwise included) from the
    compressed form, with the batch norm and ReLU / ReLU6 that follow it folded in (bn, act:
    see epilogue). x: (N, C, H, W) -> (N, out, H', W'). Its kernel, `path`:
    - 'direct' (see above), on one thread, or with parallel=True on numba's threads;
    - 'gemm' (groups 1): the codebook-CSR product of the fc layers (multiply) with each image's
      columns, F.unfold's (C*kh*kw, H'*W'), or the input itself for an unpadded, stride-1
      pointwise conv; it wins where an output map is a few pixels and each non-zero's run short.
    The direct path keeps the offsets of each input size it meets (4 bytes a non-zero)."""

    def __init__(self, layer, parallel=False, path="direct", bn=None, act=None):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("SparseConv2d takes convs with numeric zero padding")
        if path not in ("direct", "gemm") or (path == "gemm" and layer.groups != 1):
            raise ValueError(f"path {path!r}: 'direct', or 'gemm' for a conv of one group")
        super().__init__(layer)
        for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, key, getattr(layer, key))
        self.parallel, self.path, self._plans = parallel, path, {}
        self.epilogue = epilogue(self.out_channels, self.bias, bn, act)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def _plan(self, h, w):
        """(offsets, hp, wp, ho, wo) for an (h, w) input, made on its first call."""
        if (h, w) not in self._plans:
            hp, wp, ho, wo = conv_geometry(self, h, w)
            if ho < 1 or wo < 1:
                raise ValueError(f"SparseConv2d: a {h} x {w} input is smaller than the padded kernel's reach")
            self._plans[h, w] = (conv_offsets(self, self.form, hp, wp), hp, wp, ho, wo)
        return self._plans[h, w]

    def forward(self, x):
        n, c, h, w = x.shape
        if c != self.in_channels:  # the offsets would read past the planes
            raise ValueError(f"SparseConv2d: {c} input channels, the layer takes {self.in_channels}")
        if self.path == "gemm":
            return self._gemm(x)
        offset, hp, wp, ho, wo = self._plan(h, w)
        (sh, sw), (ph, pw) = self.stride, self.padding
        x = x.detach().float().contiguous().numpy()
        if (hp, wp) == (h, w):  # stride 1, no padding, no spare row: the input is its own plane
            planes = x
        else:
            planes = np.zeros((n, c * sh * sw, hp, wp), np.float32)
            _phases(x, ph, pw, sh, sw, planes)
        out = np.empty((n, self.out_channels, ho, wo), np.float32)
        args = (self.form["row_ptr"], offset, self.form["cluster"], self.form["codebook"], planes.reshape(n, -1), wp,
                self.epilogue, out)
        if self.parallel:  # a few runs a thread, so that uneven rows even out
            _conv_parallel(*args, 4 * numba.get_num_threads())
        else:
            _conv_serial(*args)
        return torch.from_numpy(out)

    def _gemm(self, x):
        n, _, h, w = x.shape
        _, _, ho, wo = conv_geometry(self, h, w)
        x = x.detach().float()
        cols = (x.reshape(n, self.in_channels, h * w) if self.pointwise
                else F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)).contiguous().numpy()
        out = np.empty((n, self.out_channels, ho * wo), np.float32)
        for i in range(n):
            _affine(multiply(self.form, cols[i]), self.epilogue, out[i])
        return torch.from_numpy(out.reshape(n, self.out_channels, ho, wo))


def plain_layer(layer):
    """The nn.Linear / nn.Conv2d computing what a masked or quantized layer computes, its
    weight the layer's weight * mask (codebook[index] * mask when quantized)."""
    weight = masked_weight(layer).detach()  # quantized layers rebuild it from codebook and index
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                          bias=layer.bias is not None, padding_mode=layer.padding_mode)
    plain = plain.to(weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain


def _replace(net, make):
    """Replace, in place and at any depth, each masked layer m by make(qualified name, m)."""
    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, MASKED):
                setattr(module, name, make(full, child))
            else:
                walk(child, full + ".")
    walk(net, "")
    return net


def to_plain(net):
    """A copy of `net` whose masked / quantized layers are plain nn.Linear / nn.Conv2d: its
    state dict has the standard keys (no mask, codebook or index), loadable with strict=True
    into the same architecture built from plain layers (torchvision's ResNet-18 included)."""
    return _replace(copy.deepcopy(net), lambda _, m: plain_layer(m))


def fastest(candidates, x, reps=15):
    """The name of the fastest of {name: module} on input x: each called once untimed (numba
    compiles, oneDNN picks its kernel), then in turns, reps times, the best call kept."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.no_grad():
        for module in candidates.values():
            module(x)
        for _ in range(reps):
            for name, module in candidates.items():
                best[name] = min(best[name], util.best_time(lambda: module(x), 1)[0])
    return min(best, key=best.get)


FORMS = ("dense", "sparse", "sparse-parallel", "sparse-gemm")  # what to_sparse may run a layer in


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping the masked and quantized layers whole as it keeps torch's own."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, MASKED) or super().is_leaf_module(module, qualified_name)


def _activation(node, modules):
    """The ReLU or ReLU6 (an nn.ReLU / nn.Hardtanh) that a graph node applies to its first
    argument alone, or None."""
    if node.op == "call_module" and isinstance(modules[node.target], (nn.ReLU, nn.Hardtanh)):
        return modules[node.target]
    if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
        return None
    if node.op == "call_function" and node.target in (F.relu, torch.relu) or node.op == "call_method" \
            and node.target == "relu":
        return nn.ReLU()
    return nn.ReLU6() if node.op == "call_function" and node.target is F.relu6 else None


def fold_plan(net, example):
    """(net, {conv: (batch norm, activation or None)}) for a network in eval mode: each masked
    conv, called once, whose output goes only to an eval-mode nn.BatchNorm2d of its channels,
    and that batch norm's only to a ReLU or ReLU6, or to anything else, wherever the network
    applies them (an nn.Sequential, or a forward() such as a ResNet block's
    F.relu(self.bn1(self.conv1(x)))). Where there are some, the network comes back as a
    torch.fx.GraphModule without those batch norms and activations, each conv's output going
    where the last of them went, so that the conv computes them: its modules by the original's
    names, its forward() as traced (other attributes and methods are not kept). A network
    torch.fx cannot trace, or whose traced graph does not compute what it does on `example`
    (a branch on an argument's default, an isinstance test), comes back as it is, no folds."""
    try:
        graph = _Tracer().trace(net)
        with torch.no_grad():
            traced = torch.fx.GraphModule(net, graph)(example)
            same = torch.equal(traced, net(example))
    except Exception:  # noqa: BLE001  tracing runs the user's forward(), which may raise anything
        return net, {}
    if not same:
        return net, {}
    modules, folds = dict(net.named_modules()), {}
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in list(graph.nodes):
        if (node.op != "call_module" or not isinstance(modules[node.target], MaskedConv2d) or len(node.users) != 1
                or calls[node.target] > 1):  # a conv called twice would fold its batch norm into both calls
            continue
        conv, bn_node = modules[node.target], next(iter(node.users))
        bn = modules[bn_node.target] if bn_node.op == "call_module" else None
        if not (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
                and bn.num_features == conv.out_channels):
            continue
        act_node = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
        act = _activation(act_node, modules) if act_node is not None else None
        last = act_node if act is not None else bn_node
        last.replace_all_uses_with(node)
        for gone in ([act_node] if act is not None else []) + [bn_node]:
            graph.erase_node(gone)
        folds[conv] = (bn, act)
    return (torch.fx.GraphModule(net, graph, type(net).__name__), folds) if folds else (net, {})


def to_sparse(net, example, forms=FORMS):
    """A CPU copy of `net` for inference from the compact form, each masked layer in whichever
    of `forms` was fastest on its own input during a forward pass of `example` (N, C, H, W)
    (fastest): 'dense' (the plain layer), 'sparse' (a SparseLinear in its faster layout, or a
    SparseConv2d's direct kernel on one thread), 'sparse-parallel' (on numba's threads),
    'sparse-gemm' (SparseConv2d's gemm path). A layer that cannot win runs dense; one that no
    form in `forms` can run, too. The batch norm and ReLU / ReLU6 that follow a conv (fold_plan)
    are folded into it, whatever its form (a dense conv's weight by torch's fuse_conv_bn_eval),
    and leave the network, which then comes back as a torch.fx.GraphModule with the original's
    module names. Where the network so chosen runs slower as a whole than with every layer
    dense, every layer runs dense.
    Returns (model in eval mode, {layer name: form}, [names of the layers with a batch norm folded in])."""
    util.require(set(forms) <= set(FORMS) and forms, f"forms: some of {', '.join(FORMS)}")
    original, net = net, copy.deepcopy(net).cpu().eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, m in net.named_modules() if isinstance(m, MASKED)]
    with torch.no_grad():
        net(example.cpu())
    for h in hooks:
        h.remove()
    net, fold = fold_plan(net, example.cpu())
    chosen, folded = {}, []

    def make(name, layer):
        plain = plain_layer(layer)
        if name not in inputs:  # forward() never called it on the example: nothing to time it on
            chosen[name] = "dense"
            return plain
        x = inputs[name]
        bn, act = fold.get(layer, (None, None))
        if bn is not None:
            plain = torch.nn.utils.fusion.fuse_conv_bn_eval(plain.eval(), bn)
            plain = nn.Sequential(plain, act) if act is not None else plain
            folded.append(name)
        candidates = {"dense": plain}
        if isinstance(layer, nn.Linear):
            candidates["sparse"] = SparseLinear(layer, x)
        elif layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            candidates["sparse"] = SparseConv2d(layer, bn=bn, act=act)
            if numba.get_num_threads() > 1:
                candidates["sparse-parallel"] = SparseConv2d(layer, parallel=True, bn=bn, act=act)
            if layer.groups == 1:
                candidates["sparse-gemm"] = SparseConv2d(layer, path="gemm", bn=bn, act=act)
        candidates = {k: v for k, v in candidates.items() if k in forms} or {"dense": plain}
        chosen[name] = fastest(candidates, x) if len(candidates) > 1 else next(iter(candidates))
        return candidates[chosen[name]]

    fast = _replace(net, make)
    if "dense" in forms and set(chosen.values()) != {"dense"}:
        # layers timed alone can mislead (caches, threads waking): the whole network must win too
        dense, dense_chosen, _ = to_sparse(original, example, forms=("dense",))
        if fastest({"chosen": fast, "dense": dense}, example.cpu()) == "dense":
            return dense, dense_chosen, folded
    return fast, chosen, folded


# --- a compressed file in a runtime -------------------------------------------------------------

RUNTIMES = ("quantized", "dense", "sparse")


def in_runtime(net, header, runtime, batch=1):
    """A decoded (quantized) model in the runtime named (see load) -> (model, header; for
    'sparse', header['runtime'] gives each layer's form and header['runtime_folded'] the
    layers with a batch norm folded in: to_sparse). The forms are chosen on a batch of
    `batch` inputs of the shape the header gives."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "dense":
        return to_plain(net), header
    if runtime == "sparse":
        in_shape = header["model"]["kwargs"].get("in_shape")
        if not (isinstance(in_shape, list) and len(in_shape) == 3
                and all(type(v) is int and 0 < v <= 4096 for v in in_shape)):
            raise dcfile.FormatError("the header gives no input shape to choose the sparse layers with")
        util.require(type(batch) is int and batch >= 1, f"batch {batch!r}: a whole number >= 1")
        net, chosen, folded = to_sparse(net, torch.zeros(batch, *in_shape))
        return net, {**header, "runtime": chosen, "runtime_folded": folded}
    return net, header


def load(path, device="cpu", runtime="quantized", model=None, batch=1):
    """Rebuild the model from a compressed file alone, in a runtime -> (nn.Module on `device`,
    header). runtime: 'quantized' (stage 2's layers, dcfile.load_compressed), 'dense' (plain
    nn.Linear / nn.Conv2d, weight = codebook[index] * mask, standard state-dict keys:
    to_plain) or 'sparse' (CPU inference from the compact form: to_sparse, its forms chosen
    for batches of `batch`). model: the factory a user's network comes from
    (dcfile.load_compressed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "sparse" and torch.device(device).type != "cpu":
        raise ValueError("the sparse runtime runs on the CPU: use device='cpu', or runtime='dense' on a GPU")
    net, header = dcfile.load_compressed(path, model=model)
    net, header = in_runtime(net, header, runtime, batch)
    return net.to(device), header
