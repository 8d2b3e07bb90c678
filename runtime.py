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
- `to_sparse(net, example)`: SparseLinear for every masked fc layer, SparseConv2d (unfold and
  the same kernel) for each conv layer where that measured faster on `example`, else plain.
  Each fc layer keeps its weight in whichever of two layouts ran faster on its input: split
  (a uint16 column and a uint8 cluster a weight, 3 bytes) or packed (one uint32 a weight,
  column | cluster << 16: a load fewer, 4 bytes).
Nothing here prints.
"""
import copy

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcfile
import util
from prune import MASKED, masked_weight

PARALLEL_MIN_WORK = 1 << 16  # non-zeros x columns below which one thread beats a parallel launch


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


def multiply(form, x):
    """(rows, n) = W x for W in either layout (csr_from_layer's split form, or pack's) and x
    (in, n) float32 numpy. Threads: numba's (numba.set_num_threads), used only when the work
    is large enough."""
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
    _call_scalar(kernel, *args) if n == 1 and not split else kernel(*args)
    return out.reshape(rows, n)


def choose_layout(form, x, timer=None):
    """The faster layout for W x on this input: (form, 'split' | 'packed'). form:
    csr_from_layer's; x (in, n) float32. timer(fn) -> seconds; by default the best of 5
    calls after one untimed call (a benchmark passes its own, cold caches included: the packed
    layout's extra byte a weight costs more where the weights come from memory)."""
    packed = pack(form)
    if packed is None:
        return form, "split"
    if timer is None:
        timer = lambda fn: (fn(), util.best_time(fn, 5)[0])[1]  # noqa: E731
    times = {name: timer(lambda: multiply(f, x)) for name, f in (("split", form), ("packed", packed))}
    return (packed, "packed") if times["packed"] < times["split"] else (form, "split")


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
        for key, value in form.items():
            self.register_buffer(key, torch.from_numpy(value))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().cpu().clone(),
                                                                 requires_grad=False)

    def resident_bytes(self):
        """Bytes of the weight's compact form held in memory (row pointers, columns and
        clusters or packed words, codebook), the bias left out as for the dense weight it replaces."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _multiply(self, x):
        """W x for x (in, n) float32 tensor -> (rows, n) tensor."""
        form = {key: b.numpy() for key, b in self.named_buffers()}
        return torch.from_numpy(multiply(form, x.detach().numpy()))


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
        y = self._multiply(x.reshape(-1, self.in_features).float().t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class SparseConv2d(_Sparse):
    """nn.Conv2d (groups 1) from the compressed form: unfold the input into columns
    (N, C*kh*kw, L) and multiply each image's columns by the sparse (out, C*kh*kw) weight.
    x: (N, C, H, W) -> (N, out, H', W')."""

    def __init__(self, layer):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("SparseConv2d takes groups=1 convs with numeric zero padding")
        super().__init__(layer)
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    def forward(self, x):
        n, _, h, w = x.shape
        cols = F.unfold(x.float(), self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = torch.stack([self._multiply(c.contiguous()) for c in cols])  # (N, out, L)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(n, self.out_channels, ho, wo)


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


def to_sparse(net, example):
    """A CPU copy of `net` for inference from the compact form: every masked fc layer becomes
    a SparseLinear, in the layout that ran faster on its own input during a forward pass of
    `example` (N, C, H, W); each conv layer becomes a SparseConv2d (split layout) where that
    ran faster than the plain conv on its input, else a plain conv.
    Returns (model in eval mode, {layer name: 'sparse' | 'dense'})."""
    net = copy.deepcopy(net).cpu().eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, m in net.named_modules() if isinstance(m, MASKED)]
    with torch.no_grad():
        net(example.cpu())
    for h in hooks:
        h.remove()
    chosen = {}

    def make(name, layer):
        if isinstance(layer, nn.Linear):
            chosen[name] = "sparse"
            return SparseLinear(layer, inputs[name])
        plain = plain_layer(layer)
        try:
            sparse = SparseConv2d(layer)
        except ValueError:
            chosen[name] = "dense"
            return plain
        x = inputs[name]
        with torch.no_grad():
            sparse(x), plain(x)  # warm-up: numba compiles, oneDNN picks its kernel
            faster = util.best_time(lambda: sparse(x), 5)[0] < util.best_time(lambda: plain(x), 5)[0]
        chosen[name] = "sparse" if faster else "dense"
        return sparse if faster else plain

    return _replace(net, make), chosen


# --- a compressed file in a runtime -------------------------------------------------------------

RUNTIMES = ("quantized", "dense", "sparse")


def in_runtime(net, header, runtime):
    """A decoded (quantized) model in the runtime named (see load) -> (model, header; for
    'sparse', header['runtime'] says which layers run sparse). The sparse layers are chosen
    on an input of the shape the header gives."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "dense":
        return to_plain(net), header
    if runtime == "sparse":
        in_shape = header["model"]["kwargs"].get("in_shape")
        if not (isinstance(in_shape, list) and len(in_shape) == 3
                and all(type(v) is int and 0 < v <= 4096 for v in in_shape)):
            raise dcfile.FormatError("the header gives no input shape to choose the sparse layers with")
        net, chosen = to_sparse(net, torch.zeros(1, *in_shape))
        return net, {**header, "runtime": chosen}
    return net, header


def load(path, device="cpu", runtime="quantized", model=None):
    """Rebuild the model from a compressed file alone, in a runtime -> (nn.Module on `device`,
    header). runtime: 'quantized' (stage 2's layers, dcfile.load_compressed), 'dense' (plain
    nn.Linear / nn.Conv2d, weight = codebook[index] * mask, standard state-dict keys:
    to_plain) or 'sparse' (CPU inference from the compact form: to_sparse). model: the factory
    a user's network comes from (dcfile.load_compressed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "sparse" and torch.device(device).type != "cpu":
        raise ValueError("the sparse runtime runs on the CPU: use device='cpu', or runtime='dense' on a GPU")
    net, header = dcfile.load_compressed(path, model=model)
    net, header = in_runtime(net, header, runtime)
    return net.to(device), header
