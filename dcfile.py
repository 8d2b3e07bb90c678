"""The compressed model file (.dc) that huffman_encode.py writes: the container and its section
kinds, the encoder, and a decoder that treats its input as hostile. The format byte by byte,
with a worked example: docs/format.md; what each version added: SINCE below.

    file    = MAGIC (8 bytes) | version u16 | section ... | 'E' section
    section = length u32 | kind u8 | payload (length bytes) | CRC-32 of the 5 + length bytes before it
    'H'     = the header, zlib-compressed UTF-8 JSON: {"model": {name, kwargs}, "quantized": {layer:
              {bits, clusters}}, "data": {dataset, subset, test_batch_size}, "settings": {...}}
    'R'     = a tensor raw; 'T' = a tensor as a table of its distinct values and a Huffman-coded
              index per element; 'G' = tensors of one role (every folded batch-norm's scale, ...)
              sharing one table, or their values one after the other
    'Q'     = a pruned, quantized layer: codebook, cluster indices and relative indices (paper
              section 2, Fig. 2), both Huffman coded (huffman.py), or dense codes (a symbol per weight)
    'A'     = the same layer coded with ANS under context models (ans.py), where that is smaller
    'E'     = the number of sections before it

Sections follow the model's state-dict order, which the header's model fixes together with
every tensor's shape: the quantized layer L takes the place of L.weight and rebuilds
L.codebook, L.index and L.mask. Integers are little-endian; no pickle anywhere.
"""
import functools
import json
import math
import os
import struct
import zlib

import numpy as np
import torch

import ans
import huffman
import util
from models import build_model, check_model
from prune import layer_kind, layer_value
from quantize import build_quantized_model


MAGIC = b"\x89DCZ\r\n\x1a\n"  # PNG-style: the high byte and CR-LF catch 7-bit and newline-mangling transfers
VERSION = 9
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # the versions this reader decodes
# The version history, in one place: each feature of the format and the version that added it.
# A reader of a version-v file reads a feature where v >= SINCE[feature] (_Reader.since).
SINCE = {
    "T": 2,              # 'T' sections, a tensor as a table of its distinct values
    "unnamed": 3,        # sections no longer start with the tensor's name and dims (the header fixes them)
    "G": 4,              # 'G' sections, tensors of one role sharing one table
    "zlib header": 4,    # the header zlib-compressed
    "A": 5,              # 'A' sections, ANS under context models
    "dense codes": 5,    # a 'Q' section's span bits 0: a symbol per element
    "role groups": 6,    # a 'G' section names its members by role (m = 0), or lists their values (k = 0)
    "images": 7,         # an 'A' section's row image, the neighbours models, one-centroid layers without words
    "float blocks": 8,   # codebooks and float32 tables as float blocks (raw, float16 or integers on a grid)
    "header dictionary": 8,  # the header's zlib stream primed with HEADER_DICTIONARY
    "static freqs": 8,   # an 'A' section's cluster frequencies written with the static cluster model only
    "idle biases": 9,    # a 'G' section leaves out the zero biases of units whose weights are all pruned
}
CODERS = ("huffman", "ans")  # encode_model's coder: the paper's Huffman codes | ANS under context models ('A')
MAX_INDEX_BITS = 16           # a span needs 2**b gap symbols, and a Huffman alphabet holds at most 2**16
MAX_ELEMENTS = 1 << 28        # per tensor (VGG-16's largest has 1.03e8): a hostile shape allocates no more
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16,  # code = position in this list
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
INDEX_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
MASK_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
FRAME = struct.calcsize("<IB") + 4  # section length, kind, CRC


class FormatError(util.UserError):
    """A file that is not a valid compressed model (bad magic or version, truncated, corrupt)."""


# --- layout: which sections a model's file holds --------------------------------------------

def architecture(model_args, quantized):
    """The sections a file for this model holds, from the model alone (built on the meta
    device, so nothing is allocated): ([(kind, name, shape, clusters)] in state-dict order,
    the names of the tensors a dense float32 model needs at inference: the parameters and
    the batch-norm running statistics, not masks or batch counters, and {name: role} of
    the 'R' tensors, role = the owning module's class and the tensor's leaf name
    ('BatchNorm2d.weight': tensors of one role may share a table), and of the 'Q' layers their
    kind for per-layer settings ('conv' / 'fc', prune.layer_kind)). kind 'Q': quantized
    layer `name` with `clusters` centroids at the place of name.weight (it carries name.codebook, name.index and name.mask); 'R': the raw tensor
    `name` (clusters None). Raises ValueError when the model cannot be built or lacks the
    quantized layers."""
    if not all(isinstance(q, dict) and type(q.get("clusters")) is int and 1 <= q["clusters"] <= huffman.MAX_ALPHABET
               for q in quantized.values()):
        raise ValueError(f"each quantized layer needs 1..{huffman.MAX_ALPHABET} clusters")
    try:
        args = without_pretrained_download(model_args)
        with torch.device("meta"):
            net = build_model(args["name"], **args["kwargs"])
    except Exception as e:
        raise ValueError(f"cannot build the model {model_args!r} ({type(e).__name__}: {e})") from None
    state = net.state_dict()
    missing = [n for n in quantized if f"{n}.weight" not in state or f"{n}.mask" not in state]
    if missing:
        raise ValueError(f"quantized layers {missing} are not masked layers of {model_args['name']}")
    sections, roles = [], {}
    modules = dict(net.named_modules())
    for key, t in state.items():
        layer, _, leaf = key.rpartition(".")
        roles[key] = f"{type(modules[layer]).__name__}.{leaf}"
        if layer in quantized:
            roles[layer] = layer_kind(modules[layer])
        if layer in quantized and leaf == "weight":
            sections.append(("Q", layer, tuple(t.shape), quantized[layer]["clusters"]))
        elif not (layer in quantized and leaf == "mask"):
            sections.append(("R", key, tuple(t.shape), None))
    if any(math.prod(shape) > MAX_ELEMENTS for _, _, shape, _ in sections):
        raise ValueError(f"a tensor of more than {MAX_ELEMENTS} elements")
    # What a dense float32 model needs at inference: its parameters and batch-norm statistics.
    inference = {n for n, _ in net.named_parameters()} | \
        {n for n, _ in net.named_buffers() if n.endswith((".running_mean", ".running_var"))}
    return sections, inference, {name: roles[name] for _, name, _, _ in sections}


def without_pretrained_download(model_args):
    """model_args {'name', 'kwargs'} that never ask to download pretrained weights: a file
    carries every weight it needs."""
    kwargs = dict(model_args["kwargs"])
    kwargs.update({"pretrained": False} if "pretrained" in kwargs else {})
    return dict(name=model_args["name"], kwargs=kwargs)


def state_keys(sections):
    """The state-dict keys these sections rebuild, in order."""
    return [k for kind, name, _, _ in sections
            for k in ([f"{name}.codebook", f"{name}.index", f"{name}.mask"] if kind == "Q" else [name])]


# --- relative indices (section 2, Fig. 2) ----------------------------------------------------

def gap_stream(positions, b):
    """Relative-index symbols of sorted flat positions (N,) int64 with span bits b:
    -> (entries,) int32 with entries = N + fillers. Symbol s >= 1: the next non-zero is s
    places after the previous one; 0: a filler moving 2**b - 1 places with no weight."""
    gaps = np.diff(positions, prepend=-1)
    span = (1 << b) - 1
    fill = (gaps - 1) // span
    out = np.zeros(len(positions) + int(fill.sum()), np.int32)
    out[np.cumsum(fill + 1) - 1] = gaps - fill * span
    return out


def positions_from_gaps(symbols, b, nnz, numel):
    """Inverse of gap_stream, checked: (entries,) symbols -> (nnz,) int64 positions, all below
    numel. Raises ValueError if the stream does not describe exactly nnz such positions."""
    weight = symbols != 0
    if int(weight.sum()) != nnz or (len(symbols) and not weight[-1]):
        raise ValueError(f"index stream does not hold {nnz} non-zeros ending on a non-zero")
    steps = np.where(weight, symbols, (1 << b) - 1).astype(np.int64)
    positions = (np.cumsum(steps) - 1)[weight]
    if nnz and positions[-1] >= numel:
        raise ValueError(f"index stream runs past the tensor's {numel} elements")
    return positions


def gap_histogram(positions):
    """The distinct gaps (G,) between sorted positions (N,), the first from -1, and how
    often each occurs (G,): all that the symbol counts of every span depend on."""
    return np.unique(np.diff(positions, prepend=-1), return_counts=True)


def span_counts(histogram, b):
    """Symbol counts (2**b,) of gap_stream(positions, b) from gap_histogram(positions),
    without building the stream."""
    gaps, mult = histogram
    span = (1 << b) - 1
    fill = (gaps - 1) // span
    last = (gaps - fill * span).astype(np.int64)
    counts = np.zeros(1 << b, np.int64)
    np.add.at(counts, last, mult)
    counts[0] = int((fill * mult).sum())
    return counts


def best_span(positions):
    """The span bits b (1..MAX_INDEX_BITS) whose Huffman-coded gap stream, code table
    included, is smallest; ties go to the smaller b. A longer span means fewer fillers but a
    larger alphabet, and past the largest gap nothing changes."""
    if len(positions) == 0:
        return 1
    histogram = gap_histogram(positions)
    best = None
    for b in range(1, MAX_INDEX_BITS + 1):
        counts = span_counts(histogram, b)
        size = _stream_size(counts, huffman.code_lengths(counts))
        if best is None or size < best[0]:
            best = (size, b)
        if (1 << b) - 1 >= histogram[0][-1]:
            break
    return best[1]


# --- Huffman streams in the file --------------------------------------------------------------

def _pack_lengths(lengths):
    """(n,) code lengths (< 32) -> 5 bits each, MSB first, zero-padded to whole bytes."""
    bits = (lengths.astype(np.uint8)[:, None] >> np.arange(4, -1, -1, dtype=np.uint8)) & 1
    return np.packbits(bits.ravel()).tobytes()


def _unpack_lengths(raw, n):
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))[:5 * n].reshape(n, 5)
    return (bits @ np.array([16, 8, 4, 2, 1])).astype(np.uint8)


def _trimmed(lengths):
    """The length table up to its last used symbol (the rest are implied zeros)."""
    used = np.flatnonzero(lengths)
    return lengths[:used[-1] + 1] if len(used) else lengths[:0]


def _stream_size(counts, lengths):
    """Bytes of a stream with these symbol counts in the file, code table included."""
    n = len(_trimmed(lengths))
    return 4 + (5 * n + 7) // 8 + 8 + (huffman.encoded_bits(counts, lengths) + 7) // 8


def _write_stream(symbols, alphabet):
    """Huffman-code symbols (N,) in [0, alphabet) with a code fitted to them -> (bytes, bits)."""
    lengths = _trimmed(huffman.code_lengths(np.bincount(symbols, minlength=alphabet)))
    data, nbits = huffman.encode(symbols, lengths)
    return struct.pack("<I", len(lengths)) + _pack_lengths(lengths) + struct.pack("<Q", nbits) + data.tobytes(), nbits


def _read_stream(r, count, alphabet):
    """Read one stream of `count` symbols (count already bounded by the caller) whose symbols
    must lie in [0, alphabet). -> (count,) int32."""
    n = r.unpack("<I")[0]
    if n > alphabet:
        raise ValueError(f"code of {n} symbols where at most {alphabet} exist")
    lengths = _unpack_lengths(r.take((5 * n + 7) // 8), n)
    nbits = r.unpack("<Q")[0]
    return huffman.decode(r.take((nbits + 7) // 8), nbits, count, lengths)


# --- float blocks: codebooks and tables of float32 values (version 8) -----------------------------

FLOAT_FORMS = ("float32", "float16", "grid")  # a float block's form byte: its position here
GRID_EXPONENTS = (-200, 200)  # a grid's step 2**e: e in this range (float32 spans 2**-149 .. 2**127)
MAX_GRID_BITS = 40            # bits of one zig-zag code at most (the encoder's integers are below 2**38)
GRID_CHUNK = 1 << 16          # codes packed at a time (a multiple of 8: each chunk ends on a byte)


def _zigzag(d):
    """Signed int64 (n,) -> unsigned codes 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ..."""
    return np.where(d >= 0, 2 * d, -2 * d - 1).astype(np.uint64)


def _grid(values):
    """float32 values (n,) as integers on one power-of-two grid: (e, n int64) with each value
    exactly n * 2**e, e the largest exponent that makes every n an integer; None where no grid
    holds them all (a NaN, an infinity, a -0.0, or integers of more than MAX_GRID_BITS bits)."""
    with np.errstate(invalid="ignore"):  # exact; a signalling NaN stays a NaN
        v = values.astype(np.float64)
    if not np.isfinite(v).all() or np.signbit(v[v == 0]).any():
        return None
    nonzero = v[v != 0]
    if not len(nonzero):
        return 0, np.zeros(len(v), np.int64)
    mantissa, exponent = np.frexp(nonzero)  # |mantissa| in [0.5, 1): times 2**24 an integer of 24 bits
    m = np.abs(mantissa * 2.0 ** 24).astype(np.int64)
    low = (m & -m).astype(np.float64)  # each value's lowest set bit
    e = int((exponent - 24 + np.log2(low).astype(np.int64)).min())
    n = np.ldexp(v, -e)
    if not GRID_EXPONENTS[0] <= e <= GRID_EXPONENTS[1] or np.abs(n).max() >= 2.0 ** (MAX_GRID_BITS - 2):
        return None
    return e, n.astype(np.int64)


def _float_block(values):
    """Version 8's encoding of float32 values (n,) in their order (a codebook's order is its
    clusters'): form u8, then form 0 the n float32 bit patterns; 1 n float16 (where each value
    is one exactly); 2 a grid: e i16, w u8, then n w-bit codes, most significant bit first, the
    last byte zero-padded: the zig-zag codes of n_0 and of each n_i - n_(i-1), the values being
    n_i * 2**e. The shortest of the three (the lower form on a tie). quantize.round_to_grid
    puts codebooks on a coarse grid: 32 sorted centroids of 8 bits take about 40 bytes, not 128."""
    values = np.asarray(values, np.float32)
    blocks = [struct.pack("<B", 0) + values.astype("<f4").tobytes()]
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf, which the test refuses
        half = values.astype("<f2")
    if np.array_equal(half.astype(np.float32).view(np.uint32), values.view(np.uint32)):
        blocks.append(struct.pack("<B", 1) + half.tobytes())
    grid = _grid(values)
    if grid is not None:
        e, n = grid
        codes = _zigzag(np.diff(n, prepend=0))
        w = int(codes.max()).bit_length() if len(codes) else 0
        # only where it can be the smallest, and within the decoder's bound on the running sums
        if 4 + (len(codes) * w + 7) // 8 < min(map(len, blocks)) and len(codes) << w < 1 << 62:
            shifts = np.arange(w - 1, -1, -1, dtype=np.uint64)
            packed = [np.packbits(((chunk[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))
                      for chunk in np.split(codes, range(GRID_CHUNK, len(codes), GRID_CHUNK))]  # w bytes per 8 codes
            blocks.append(struct.pack("<BhB", 2, e, w) + b"".join(p.tobytes() for p in packed))
    return min(blocks, key=len)


def _read_float_block(r, n):
    """Decode a float block of n values (see _float_block) -> float32 (n,), every value checked
    to be what float32 holds exactly."""
    form = r.unpack("<B")[0]
    if form == 0:
        return np.frombuffer(r.take(4 * n), "<f4").astype(np.float32)
    if form == 1:
        return np.frombuffer(r.take(2 * n), "<f2").astype(np.float32)
    if form != 2:
        raise ValueError(f"unknown float block form {form}")
    e, w = r.unpack("<hB")
    if not (GRID_EXPONENTS[0] <= e <= GRID_EXPONENTS[1] and w <= MAX_GRID_BITS):
        raise ValueError(f"a grid of step 2**{e} and {w}-bit codes (at most {MAX_GRID_BITS})")
    if n << w >= 1 << 62:  # the running sums below could leave int64
        raise ValueError(f"a grid of {n} codes of {w} bits: sums past 2**62")
    raw = r.take((n * w + 7) // 8)
    if w == 0:  # every value 0
        return np.zeros(n, np.float32)
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))[:n * w].reshape(n, w)
    codes = bits.astype(np.int64) @ (np.int64(1) << np.arange(w - 1, -1, -1, dtype=np.int64))
    n_values = np.cumsum(np.where(codes % 2 == 0, codes // 2, -(codes + 1) // 2))  # |each sum| < n 2**w < 2**62
    exact = np.ldexp(n_values.astype(np.float64), e)  # exact: the integers have at most 53 bits
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        values = exact.astype(np.float32)
    if np.abs(n_values).max(initial=0) >= 2 ** 53 or not np.array_equal(values.astype(np.float64), exact):
        raise ValueError(f"a grid value (integer times 2**{e}) that float32 cannot hold")
    return values


# --- sections -----------------------------------------------------------------------------------

class _Reader:
    """Reads a payload front to back; every read is checked against the bytes left."""

    def __init__(self, buf, version=VERSION):
        self.buf, self.pos, self.version = memoryview(buf), 0, version
        self.named = not self.since("unnamed")  # versions 1-2 name each tensor and give its dims

    def since(self, feature):
        """Whether this file's version has `feature` (a key of SINCE)."""
        return self.version >= SINCE[feature]

    def take(self, n):
        if n > len(self.buf) - self.pos:
            raise ValueError(f"needs {n} bytes where {len(self.buf) - self.pos} are left")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def check_name(self, name):
        """Versions 1-2: the section must name the tensor the model has at its place."""
        if not self.named:
            return
        try:
            got = bytes(self.take(self.unpack("<H")[0])).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a tensor name that is not UTF-8") from None
        if got != name:
            raise ValueError(f"holds another tensor where {name} belongs")

    def dtype(self, allowed):
        code = self.unpack("<B")[0]
        if code >= len(DTYPES) or DTYPES[code] not in allowed:
            raise ValueError(f"unsupported dtype code {code}")
        return DTYPES[code]

    def shape(self, expected):
        if not self.named:  # version 3 on: the model's shape, from the header
            return expected
        shape = self.unpack(f"<{self.unpack('<B')[0]}I")
        if shape != expected:
            raise ValueError(f"shape {shape} where the model has {expected}")
        return shape

    def done(self):
        if self.pos != len(self.buf):
            raise ValueError(f"{len(self.buf) - self.pos} stray bytes at the end")


def _section(kind, payload):
    head = struct.pack("<IB", len(payload), ord(kind))
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def _raw_payload(name, t):
    """The payload of a tensor stored raw: its dtype and bytes (`name` names it in errors)."""
    if t.dtype not in DTYPES:
        raise util.UserError(f"{name}: dtype {t.dtype} cannot be stored (supported: {DTYPES})")
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return struct.pack("<B", DTYPES.index(t.dtype)) + data


UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # bit patterns by item size


def _tabled_payload(name, t):
    """The payload of tensor `name` as a table of its distinct bit patterns (so -0.0, 0.0 and
    NaNs stay what they are) and a Huffman-coded index per element, or None when the tensor
    has more distinct values than a code can hold."""
    if t.dtype not in DTYPES or t.numel() == 0:
        return None
    table, ids = _value_table(_bit_patterns(t), t.dtype)
    if len(table) > huffman.MAX_ALPHABET:
        return None
    stream, _ = _write_stream(ids, len(table))
    return struct.pack("<BI", DTYPES.index(t.dtype), len(table)) + _table_bytes(table, t.dtype) + stream


def _value_table(patterns, dtype):
    """The distinct bit patterns (k,) of `patterns` (n,) and each element's entry (n,) int32:
    float32 tables in the order of their values (so a grid's differences are small), others
    sorted as unsigned integers."""
    table, ids = np.unique(patterns, return_inverse=True)
    if dtype == torch.float32:
        order = np.argsort(table.view(np.float32), kind="stable")
        table, ids = table[order], np.argsort(order)[ids]
    return table, ids.astype(np.int32).reshape(-1)


def _table_bytes(patterns, dtype):
    """Bit patterns (k,) of `dtype` as stored: a float block for float32, else little-endian."""
    if dtype == torch.float32:
        return _float_block(patterns.view(np.float32))
    return patterns.astype(patterns.dtype.newbyteorder("<")).tobytes()


def _read_table(r, k, dtype):
    """k values of `dtype` (see _table_bytes) -> their bit patterns (k,) as unsigned integers."""
    if dtype == torch.float32 and r.since("float blocks"):
        return _read_float_block(r, k).view(np.uint32)
    return np.frombuffer(r.take(k * dtype.itemsize), np.dtype(UINT[dtype.itemsize]).newbyteorder("<"))


def _bit_patterns(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().view(UINT[t.dtype.itemsize])


def _group_payload(tensors, positions, whole_role, idle):
    """The payload of a 'G' section: the tensors (one dtype) at these section positions as
    one table of their distinct bit patterns and one index stream, or, from version 6, as
    their values one after the other (k = 0), whichever is smaller; float32 values, table or
    not, as a float block (before version 8: float16 where it held every value exactly). whole_role: the tensors are every 'R' tensor of their role, which
    version 6 writes as m = 0 instead of the positions (19 batch-norms: 38 bytes a group).
    idle: per tensor, False where it cannot leave elements out (it is not the bias of a
    quantized layer before it, _idle_units), else None or a bool (n,) of the elements the
    decoder will place as zeros (the biases of units with no weight left), which must all be
    +0.0 and are left out of the values; version 9 writes a flag for each tensor that can.
    None for tensors of a dtype the format does not store."""
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors) or len(positions) > 0xFFFF:
        return None
    left_out = [i if isinstance(i, np.ndarray) else None for i in idle]
    patterns = [_bit_patterns(t) for t in tensors]
    assert all(i is None or not patterns[j][i].any() for j, i in enumerate(left_out)), "an idle element that is not +0.0"
    values = np.concatenate([p if i is None else p[~i] for p, i in zip(patterns, left_out)])
    listed = [] if whole_role else list(positions)
    can = [i is not False for i in idle]
    flags = np.packbits(np.array([i is not None for i, c in zip(left_out, can) if c], bool), bitorder="little").tobytes()
    present = struct.pack("<I", len(values)) if any(i is not None for i in left_out) else b""

    def head(stored, k):  # dtype, stored dtype, m, the m positions, the idle flags (and values left), k
        return struct.pack(f"<BBH{len(listed)}H", DTYPES.index(dtype), DTYPES.index(stored), len(listed),
                           *listed) + flags + present + struct.pack("<I", k)

    payloads = [head(dtype, 0) + _table_bytes(values, dtype)]  # float32: a float block holds float16 too
    table, ids = _value_table(values, dtype)
    if len(table) <= huffman.MAX_ALPHABET:
        stream, _ = _write_stream(ids, len(table))
        payloads.append(head(dtype, len(table)) + _table_bytes(table, dtype) + stream)
    return min(payloads, key=len)


def _idle_units(sections, position):
    """For the 'R' tensor at layout `position`: the name of the quantized layer L whose bias it
    is (its name L.bias, its shape (L's output units,), L's section before it), or None. The
    biases of L's units whose mask rows are all 0 may be left out of a version-9 'G' section:
    such a unit computes act(bias) alone, and stage 2 zeroes that bias where no layer reads
    it (prune.drop_dead_units), so it codes in nothing."""
    kind, name, shape, _ = sections[position]
    layer = name[:-len(".bias")] if name.endswith(".bias") else None
    for kind_l, name_l, shape_l, _ in sections[:position]:
        if kind_l == "Q" and name_l == layer and shape == shape_l[:1]:
            return layer
    return None


def _units_with_weights(mask):
    """A layer's mask (units, ...) -> bool (units,): True where the unit keeps a weight."""
    return mask.detach().cpu().reshape(mask.shape[0], math.prod(mask.shape[1:])).ne(0).any(1).numpy()


def _idle_of(sections, position, state_dict):
    """The elements of the 'R' tensor at `position` that a 'G' section leaves out: bool (n,)
    True at the units of its layer with no weight left (see _idle_units), where each of them is
    +0.0 and there is at least one; else None; False for a tensor that is no quantized layer's
    bias (it has no flag)."""
    layer = _idle_units(sections, position)
    if layer is None:
        return False
    mask, bits = state_dict[f"{layer}.mask"], _bit_patterns(state_dict[sections[position][1]])
    if mask.dim() == 0 or mask.shape[0] != len(bits) or not len(bits):  # encode_model refuses a wrong mask later
        return None
    idle = ~_units_with_weights(mask)
    return idle if idle.any() and not bits[idle].any() else None


def _role_members(sections, roles, role):
    """The positions of every 'R' tensor of `role` in the model's layout: the members of a
    version-6 'G' section that lists none (m = 0)."""
    return [p for p, (kind, name, _, _) in enumerate(sections) if kind == "R" and roles[name] == role]


def _read_group(r, position, sections, later, roles, state):
    """Decode a 'G' section found at section `position` -> {name: tensor} of the tensor there;
    the other members go into `later` ({position: (name, (values, idle layer, shape))}, filled
    by earlier groups too), for the decoder to take at their places with _member.
    sections, roles: the model's layout; state: the tensors decoded so far."""
    dtype = r.dtype(DTYPES)
    # before version 8 a float32 group could store float16 values; from 8 a float block says
    blocks = r.since("float blocks")
    stored = r.dtype([dtype] + ([torch.float16] if dtype == torch.float32 and not blocks else []))
    m = r.unpack("<H")[0]
    if m == 0 and r.since("role groups"):  # every 'R' tensor of this one's role
        members = _role_members(sections, roles, roles[sections[position][1]])
        m = len(members)
    else:
        members = r.unpack(f"<{m}H")
    if m < 2 or members[0] != position or any(b <= a for a, b in zip(members, members[1:])) \
            or members[-1] >= len(sections):
        raise ValueError(f"member positions {list(members[:8])}... must increase from {position} "
                         f"within the model's {len(sections)} tensors")
    if any(sections[p][0] != "R" or p in later for p in members):
        raise ValueError("a member that is a quantized layer or was decoded already")
    sizes = [math.prod(sections[p][2]) for p in members]
    # from version 9 a flag for each member that is a quantized layer's bias: (position, layer)
    flagged = [(p, layer) for p, layer in ((p, _idle_units(sections, p)) for p in members) if layer is not None]
    idle = {}  # {position: the layer whose idle units that member leaves out}
    if r.since("idle biases") and flagged:
        flags = np.unpackbits(np.frombuffer(r.take((len(flagged) + 7) // 8), np.uint8), bitorder="little")
        if flags[len(flagged):].any():
            raise ValueError("idle-unit flags set past the members that have one")
        idle = {p: layer for (p, layer), flag in zip(flagged, flags) if flag}
    total = sum(sizes)
    if idle:  # the values left: the members' elements less the idle units', known once their masks are
        total = r.unpack("<I")[0]
        if total > sum(sizes):
            raise ValueError(f"{total} values for {sum(sizes)} elements")
    k = r.unpack("<I")[0]
    if not (0 if r.since("role groups") else 1) <= k <= min(total, huffman.MAX_ALPHABET):
        raise ValueError(f"a table of {k} values for {total} elements")
    count = k or total  # k = 0: the members' values themselves, no index stream
    table = _read_table(r, count, stored)
    if stored != dtype:  # float16 -> float32, exact
        table = table.view("<f2").astype(np.float32).view(np.uint32)
    values = (table[_read_stream(r, total, k)] if k else table).astype(UINT[dtype.itemsize])
    r.done()
    left = _Values(values, dtype, m)
    for p in members:
        _, name, shape, _ = sections[p]
        later[p] = (name, (left, idle.get(p), shape))
    return dict([_member(later.pop(position), state)])


class _Values:
    """A 'G' section's decoded values (n,) as unsigned bit patterns, handed out to its
    members in layout order as each is reached (a member with idle units takes as many as its
    layer's mask has units with a weight, which is known only then)."""

    def __init__(self, values, dtype, members):
        self.values, self.dtype, self.start, self.members = values, dtype, 0, members

    def take(self, n):
        """The next n values; the last member's take must spend them all."""
        left = len(self.values) - self.start
        self.members -= 1
        if n > left or (self.members == 0 and n != left):
            raise ValueError(f"a member takes {n} values where its section has {left} left"
                             + ("" if n > left else " (the last member)"))
        self.start += n
        return self.values[self.start - n:self.start]


def _member(entry, state):
    """A 'G' member (name, (values, idle layer or None, shape)) -> (name, tensor): its
    elements, the idle units' as +0.0 where `idle layer` is set (that layer's mask is in
    `state`, decoded before it)."""
    name, (left, layer, shape) = entry
    size = math.prod(shape)
    if layer is None:
        bits = left.take(size)
    else:
        alive = _units_with_weights(state[f"{layer}.mask"])
        bits = np.zeros(size, left.values.dtype)
        bits[alive] = left.take(int(alive.sum()))
    if size == 0:  # torch cannot view 0 bytes as a wider dtype
        return name, torch.empty(shape, dtype=left.dtype)
    return name, torch.from_numpy(bits.view(np.uint8).copy()).view(left.dtype).reshape(shape)


def _read_tabled(r, name, shape):
    """Decode the tabled tensor `name` of shape `shape` -> {name: tensor}."""
    r.check_name(name)
    dtype = r.dtype(DTYPES)
    numel = math.prod(r.shape(shape))
    k = r.unpack("<I")[0]
    if not 1 <= k <= min(numel, huffman.MAX_ALPHABET):
        raise ValueError(f"a table of {k} values for {numel} elements")
    table = _read_table(r, k, dtype)
    ids = _read_stream(r, numel, k)
    r.done()
    values = table[ids].astype(UINT[dtype.itemsize])
    return {name: torch.from_numpy(values.view(np.uint8).copy()).view(dtype).reshape(shape)}


def _read_raw(r, name, shape):
    """Decode the raw tensor `name` of shape `shape` -> {name: tensor}."""
    r.check_name(name)
    dtype = r.dtype(DTYPES)
    r.shape(shape)
    size = math.prod(shape) * dtype.itemsize
    data = np.frombuffer(r.take(size), np.uint8).copy()
    r.done()
    if size == 0:  # a layer of no units: torch cannot view 0 bytes as a wider dtype
        return {name: torch.empty(shape, dtype=dtype)}
    return {name: torch.from_numpy(data).view(dtype).reshape(shape)}


def _layer_arrays(name, codebook, index, mask):
    """Check a quantized layer against the contract -> (k, the payload's first fields (dtypes,
    k, codebook), the codebook's bytes, flat mask (numel,), flat index (numel,), positions (nnz,) of mask == 1 and
    their clusters (nnz,) int32)."""
    k = codebook.numel()
    util.require(codebook.dtype == torch.float32 and codebook.dim() == 1 and 1 <= k <= huffman.MAX_ALPHABET,
                 f"{name}.codebook must be float32 of 1..{huffman.MAX_ALPHABET} centroids")
    util.require(index.dtype in INDEX_DTYPES and mask.dtype in MASK_DTYPES,
                 f"{name}: index must be an integer tensor and mask a float tensor "
                 f"(got {index.dtype}, {mask.dtype})")
    flat_mask = mask.detach().cpu().reshape(-1).numpy()
    flat_index = index.detach().cpu().reshape(-1).numpy()
    positions = np.flatnonzero(flat_mask == 1)
    util.require(len(positions) + np.count_nonzero(flat_mask == 0) == len(flat_mask),
                 f"{name}.mask holds values other than 0 and 1")
    clusters = flat_index[positions]
    util.require(np.count_nonzero(clusters) == np.count_nonzero(flat_index),
                 f"{name}.index is not 0 at pruned positions")
    util.require(not len(clusters) or (clusters.min() >= 0 and clusters.max() < k),
                 f"{name}.index holds values outside 0..{k - 1}")
    block = _float_block(codebook.detach().cpu().numpy())
    head = struct.pack("<BBI", DTYPES.index(index.dtype), DTYPES.index(mask.dtype), k) + block
    return k, head, len(block), flat_mask, flat_index, positions, clusters.astype(np.int32)


def _quantized_payload(name, codebook, index, mask, b):
    """Encode layer `name`: codebook (k,) float32, index and mask of the weight's shape.
    b: span bits, 0 = best_span. -> (payload bytes, report row)."""
    k, head, codebook_bytes, flat_mask, flat_index, positions, clusters = _layer_arrays(name, codebook, index, mask)
    util.require(0 <= b <= MAX_INDEX_BITS, f"{name}: index_bits must be 0 (auto) or 1..{MAX_INDEX_BITS}, not {b}")
    nnz = max(len(clusters), 1)
    row = dict(name=name, kind="quantized", shape=list(mask.shape), params=mask.numel(), nonzero=len(clusters),
               clusters=k, weight_bits=max(1, math.ceil(math.log2(k))), codebook_bytes=codebook_bytes)
    # A dense layer (a ternary one: 60-90% non-zero) codes every position, 0 for a pruned weight
    # and 1 + its cluster for the others: a relative index and a cluster code each cost a whole
    # bit at least, 2 bits a weight, where one symbol of 3 costs 1.3-1.6.
    symbols = np.where(flat_mask == 1, flat_index.astype(np.int32) + 1, 0).astype(np.int32)
    # (not with 2^16 centroids: 1 + a cluster would need a 2^16 + 1 symbol alphabet)
    dense_bytes, dense_bits = _write_stream(symbols, k + 1) if not b and k < huffman.MAX_ALPHABET else (None, None)
    b = b or best_span(positions)
    gaps = gap_stream(positions, b)
    cluster_bytes, cluster_bits = _write_stream(clusters, k)
    gap_bytes, gap_bits = _write_stream(gaps, 1 << b)
    if dense_bytes is not None and len(dense_bytes) < len(cluster_bytes) + len(gap_bytes):
        payload = head + struct.pack("<BII", 0, len(clusters), len(symbols)) + dense_bytes
        row.update(weight_bits_huffman=dense_bits / nnz, index_bits=0, fillers=0, index_bits_raw=0.0,
                   index_bits_huffman=0.0, weight_bytes=len(dense_bytes), index_bytes=0)
    else:
        payload = head + struct.pack("<BII", b, len(clusters), len(gaps)) + cluster_bytes + gap_bytes
        row.update(weight_bits_huffman=cluster_bits / nnz, index_bits=b, fillers=len(gaps) - len(clusters),
                   index_bits_raw=b * len(gaps) / nnz, index_bits_huffman=gap_bits / nnz,
                   weight_bytes=len(cluster_bytes), index_bytes=len(gap_bytes))
    row["bytes"] = len(payload) + FRAME
    return payload, row


# --- 'A': a quantized layer under a context model, coded with ANS (coder='ans') -----------------



def _ans_payload(name, codebook, index, mask):
    """Encode layer `name` as an 'A' section, or None where its weight matrix is too wide for
    the counts' Huffman alphabet. The positions: a presence bit per place, under whichever of
    three models is smallest: 'uniform', p = non-zeros / elements; 'margins', after the
    non-zeros per row and per column (Huffman streams), ans.margins_model; 'neighbours', after
    a flag per row and per column (live or not), ans.neighbour_presence on each row read as an
    image, the image shape (of ans.layouts) that codes smallest. The clusters: one static
    distribution per layer (k frequencies u16, scaled so the largest is 65535) or
    ans.neighbour_clusters, the smaller. All through constriction's ANS coder (Duda 2013), which
    spends -log2 p bits a symbol where a Huffman code spends whole bits (a presence bit of
    p = 0.05 costs Huffman 1 bit, ANS 0.07). -> (payload, report row) or None."""
    k, head, codebook_bytes, flat_mask, flat_index, positions, clusters = _layer_arrays(name, codebook, index, mask)
    shape = tuple(mask.shape)
    n_rows, n_cols = ans.matrix(shape)
    if max(n_rows, n_cols) + 1 > huffman.MAX_ALPHABET or not n_rows * n_cols:
        return None
    present = (flat_mask == 1).reshape(n_rows, n_cols)
    bernoulli = ans.bernoulli()
    # uniform: no counts
    p = np.full(present.size, np.clip(len(positions) / present.size, ans.P_MIN, 1 - ans.P_MIN))
    flat = present.reshape(-1).astype(np.int32)
    uniform = struct.pack("<B", 0) + ans.words(lambda c: c.encode_reverse(flat, bernoulli, p))
    # margins: counts, then the live rows x live columns
    rows, cols = present.sum(1), present.sum(0)
    alive_r, alive_c, p = ans.margins_model(rows, cols, len(positions))
    bits = present[np.ix_(alive_r, alive_c)].astype(np.int32).reshape(-1)
    margins = (struct.pack("<B", 1) + _write_stream(rows.astype(np.int32), n_cols + 1)[0]
               + _write_stream(cols.astype(np.int32), n_rows + 1)[0]
               + ans.words(lambda c: c.encode_reverse(bits, bernoulli, p.reshape(-1)) if len(bits) else None))
    freqs = np.zeros(k, np.int64)
    if len(clusters):
        counts = np.bincount(clusters, minlength=k)
        freqs = np.where(counts > 0, np.maximum(1, np.round(counts * 65535 / counts.max())), 0).astype(np.int64)
    # one centroid: every cluster is known, no words
    static = struct.pack("<B", 0) + freqs.astype("<u2").tobytes() + ans.words(
        lambda c: c.encode_reverse(clusters, ans.static_model(freqs)) if len(clusters) and k > 1 else None)
    # each image shape with its neighbours models, against the static ones
    best, centroids = None, codebook.detach().cpu().numpy()
    for h, w in ans.layouts(shape):
        by_neighbours = ans.neighbour_payloads(present, flat_index, centroids, h, w)
        choice = (min(uniform, margins, by_neighbours[0], key=len),
                  min(static, by_neighbours[1], key=len) if by_neighbours[1] else static, (h, w))
        if best is None or len(choice[0]) + len(choice[1]) < len(best[0]) + len(best[1]):
            best = choice
    presence, cluster_words, (h, w) = best
    payload = head + struct.pack("<IHH", len(clusters), h, w) + presence + cluster_words
    nnz = max(len(clusters), 1)
    weight_bytes = len(cluster_words)
    return payload, dict(name=name, kind="quantized", coder="ans", presence=ans.PRESENCE_MODELS[presence[0]],
                         clusters_model=ans.CLUSTER_MODELS[cluster_words[0]], image=[h, w],
                         shape=list(shape), params=mask.numel(), nonzero=len(clusters), clusters=k,
                         weight_bits=max(1, math.ceil(math.log2(k))), codebook_bytes=codebook_bytes,
                         weight_bits_huffman=8 * weight_bytes / nnz, index_bits=0, fillers=0, index_bits_raw=0.0,
                         index_bits_huffman=8 * len(presence) / nnz, weight_bytes=weight_bytes,
                         index_bytes=len(presence), bytes=len(payload) + FRAME)




def _read_ans(r, name, shape, clusters):
    """Decode an 'A' section (see _ans_payload) -> codebook, index and mask of layer `name`,
    every count checked against the model's shape before anything is allocated."""
    index_dtype, mask_dtype = r.dtype(INDEX_DTYPES), r.dtype(MASK_DTYPES)
    numel = math.prod(shape)
    n_rows, n_cols = ans.matrix(shape)
    if not numel:  # the encoder codes an empty layer as a 'Q' section; the models divide by R and C
        raise ValueError(f"an ANS section for a weight of shape {tuple(shape)}, which has no elements")
    codebook = _read_codebook(r, clusters, index_dtype)
    k = len(codebook)
    nnz = r.unpack("<I")[0]
    if nnz > numel:
        raise ValueError(f"{nnz} non-zeros in {numel} elements")
    read_freqs = lambda: np.frombuffer(r.take(2 * k), "<u2").astype(np.int64)
    freqs = None if r.since("static freqs") else read_freqs()
    h, w = r.unpack("<HH") if r.since("images") else (1, 1)
    if not (h and w and n_cols % (h * w) == 0):
        raise ValueError(f"rows read as images of {h} x {w}, which do not divide their {n_cols} columns")
    nb = ans.neighbours(n_cols, h, w)
    bernoulli = ans.bernoulli()
    model = r.unpack("<B")[0]
    if model == 0:  # uniform
        p = np.full(numel, np.clip(nnz / max(numel, 1), ans.P_MIN, 1 - ans.P_MIN))
        present = ans.decode(ans.read_words(r), numel, bernoulli, p).astype(bool)
        if present.sum() != nnz:
            raise ValueError(f"presence bits hold {present.sum()} non-zeros where the section says {nnz}: corrupt")
        present = present.reshape(n_rows, n_cols)
    elif model == 1:  # margins
        rows = _read_stream(r, n_rows, n_cols + 1).astype(np.int64)
        cols = _read_stream(r, n_cols, n_rows + 1).astype(np.int64)
        if rows.sum() != nnz or cols.sum() != nnz:
            raise ValueError(f"row counts sum to {rows.sum()}, column counts to {cols.sum()}, "
                             f"where there are {nnz} non-zeros")
        alive_r, alive_c, p = ans.margins_model(rows, cols, nnz)
        coder = ans.read_words(r)
        if p.size:
            bits = ans.decode(coder, p.size, bernoulli, p.reshape(-1)).reshape(len(alive_r), len(alive_c))
        else:  # no place to code: the stream must be empty too
            ans.end(coder)
            bits = np.zeros((len(alive_r), len(alive_c)), np.int64)
        if not (np.array_equal(bits.sum(1), rows[alive_r]) and np.array_equal(bits.sum(0), cols[alive_c])):
            raise ValueError("presence bits disagree with the row and column counts: corrupt")
        present = np.zeros((n_rows, n_cols), bool)
        present[np.ix_(alive_r, alive_c)] = bits.astype(bool)
    elif model == 2 and r.since("images"):
        present = ans.read_neighbour_presence(r, n_rows, n_cols, nnz, nb)
    else:
        raise ValueError(f"unknown presence model {model}")
    cluster_model = r.unpack("<B")[0] if r.since("images") else 0
    if cluster_model == 0:
        freqs = read_freqs() if freqs is None else freqs
        if nnz and not freqs.any():
            raise ValueError("no cluster has a frequency")
        cluster_coder = ans.read_words(r)
        if nnz and k > 1:
            cluster_ids = ans.decode(cluster_coder, nnz, ans.static_model(freqs))
        else:  # one centroid (from version 7): no words
            ans.end(cluster_coder)
            cluster_ids = np.zeros(nnz, np.int64)
        positions = np.flatnonzero(present)
    elif cluster_model == 1 and k > 1:
        coder = ans.read_words(r)
        categorical = ans.categorical()
        ids = ans.neighbour_clusters(present, codebook.numpy(), np.flatnonzero(present.any(0)), nb,
                                  lambda j, rows, q: ans.symbols(coder, categorical, q))
        ans.end(coder)
        positions = np.flatnonzero(present)
        cluster_ids = ids.reshape(-1)[positions]
    else:
        raise ValueError(f"unknown cluster model {cluster_model}")
    r.done()
    return _layer_tensors(name, shape, codebook, positions, cluster_ids, index_dtype, mask_dtype)


def _read_codebook(r, clusters, index_dtype):
    """A quantized layer's k u32 and codebook (k,) float32, k checked against the header's
    `clusters` and against what its index dtype can hold."""
    k = r.unpack("<I")[0]
    if k != clusters:
        raise ValueError(f"codebook of {k} centroids where the header says {clusters}")
    if k - 1 > np.iinfo(INDEX_DTYPES[index_dtype]).max:
        raise ValueError(f"{k} centroids, more than its {index_dtype} index can name")
    if r.since("float blocks"):
        return torch.from_numpy(_read_float_block(r, k))
    return torch.from_numpy(np.frombuffer(r.take(4 * k), "<f4").copy())


def _read_quantized(r, name, shape, clusters):
    """Decode layer `name` (weight shape `shape`, `clusters` centroids) -> its codebook,
    index and mask, each checked against the model before anything is allocated."""
    r.check_name(name)
    index_dtype, mask_dtype = r.dtype(INDEX_DTYPES), r.dtype(MASK_DTYPES)
    numel = math.prod(r.shape(shape))
    codebook = _read_codebook(r, clusters, index_dtype)
    k = len(codebook)
    b, nnz, entries = r.unpack("<BII")
    if b == 0 and r.since("dense codes"):  # dense codes: one symbol per element, 0 = pruned, 1 + cluster
        if entries != numel or nnz > numel:
            raise ValueError(f"dense codes of {entries} symbols ({nnz} non-zeros) for {numel} elements")
        symbols = _read_stream(r, numel, k + 1)
        positions = np.flatnonzero(symbols)
        if len(positions) != nnz:
            raise ValueError(f"dense codes hold {len(positions)} non-zeros where the section says {nnz}")
        cluster_ids = symbols[positions] - 1
    else:
        if not 1 <= b <= MAX_INDEX_BITS:
            raise ValueError(f"span of {b} bits")
        if nnz > numel or entries > nnz + (numel - nnz) // ((1 << b) - 1):  # fillers move 2**b-1 each
            raise ValueError(f"{nnz} non-zeros in {entries} entries do not fit {numel} elements")
        cluster_ids = _read_stream(r, nnz, k)
        positions = positions_from_gaps(_read_stream(r, entries, 1 << b), b, nnz, numel)
    r.done()
    return _layer_tensors(name, shape, codebook, positions, cluster_ids, index_dtype, mask_dtype)


def _layer_tensors(name, shape, codebook, positions, cluster_ids, index_dtype, mask_dtype):
    """A decoded quantized layer's tensors: {name.codebook, name.index, name.mask} of the weight's
    shape, from the surviving positions (nnz,) into the flat weight and their clusters (nnz,)."""
    numel = math.prod(shape)
    # numpy: np.zeros takes pages the kernel zeroes on first touch, faster for sparse layers
    index = np.zeros(numel, INDEX_DTYPES[index_dtype])
    index[positions] = cluster_ids
    mask = np.zeros(numel, MASK_DTYPES[mask_dtype])
    mask[positions] = 1
    return {f"{name}.codebook": codebook, f"{name}.index": torch.from_numpy(index).reshape(shape),
            f"{name}.mask": torch.from_numpy(mask).reshape(shape)}


# --- whole files ---------------------------------------------------------------------------------

def encode_model(state_dict, model_args, quantized, index_bits=0, info=None, share_tables=True,
                 coder="huffman"):
    """Encode a quantized state dict (the contract of quantization.py: L.codebook, L.index,
    L.mask for each quantized layer L, everything else plain) into the bytes of one file.

    model_args: {'name', 'kwargs'} for models.build_model. quantized: {layer: {'bits',
    'clusters'}}. index_bits: span bits, an int or a per-layer dict ('conv' / 'fc' / '*' /
    names, see prune.layer_value); 0 = best_span. info: more JSON-able header fields.
    share_tables: group the tensors of one role into 'G' sections where that is smaller
    (False writes what version 3 wrote, a section per tensor). coder: 'huffman' (the paper's)
    | 'ans' (each quantized layer also tried as an 'A' section, which is kept where smaller).
    Returns (bytes, report) with report = {'layers': [row per section], 'header_bytes',
    'dense_bytes'}; the rows' bytes plus header_bytes make the file's size."""
    util.require(coder in CODERS, f"unknown coder {coder!r}; choose one of {', '.join(CODERS)}")
    try:
        sections, params, roles = architecture(model_args, quantized)
    except ValueError as e:
        raise util.UserError(str(e)) from None
    want, have = set(state_keys(sections)), set(state_dict)
    util.require(want == have, f"state dict does not match {model_args['name']} with quantized layers "
                 f"{list(quantized)}: missing {sorted(want - have)}, unexpected {sorted(have - want)}")
    for kind, name, shape, _ in sections:
        t = state_dict[name] if kind == "R" else state_dict[f"{name}.index"]
        util.require(tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)} where the model has {shape}")

    # Every other tensor alone: raw, or as a table of its values when that is smaller.
    alone = {}
    for name in (name for kind, name, _, _ in sections if kind == "R"):
        payload, tabled = _raw_payload(name, state_dict[name]), _tabled_payload(name, state_dict[name])
        alone[name] = ("T", tabled) if tabled is not None and len(tabled) < len(payload) else ("R", payload)
    # Tensors of one role (every folded batch-norm's scale, say) as one group where one table
    # and one code for all of them beat a section each.
    groups = {}
    if share_tables:
        by_role = {}
        for pos, (kind, name, _, _) in enumerate(sections):
            if kind == "R":
                by_role.setdefault((roles[name], state_dict[name].dtype), []).append(pos)
        for (role, _), members in by_role.items():
            names = [sections[p][1] for p in members]
            whole = members == _role_members(sections, roles, role)  # the decoder finds them from the role alone
            idle = [_idle_of(sections, p, state_dict) for p in members]
            payload = _group_payload([state_dict[n] for n in names], members, whole, idle) if len(members) > 1 else None
            if payload is not None and len(payload) < sum(len(alone[n][1]) + FRAME for n in names) - FRAME:
                groups[members[0]] = (payload, names)

    header = json.dumps(dict(model=model_args, quantized=quantized, **(info or {})), separators=(",", ":"))
    parts = [MAGIC, struct.pack("<H", VERSION), _section("H", _deflate_header(header.encode("utf-8")))]
    rows, grouped = [], {n for _, names in groups.values() for n in names}
    for pos, (kind, name, shape, clusters) in enumerate(sections):
        if kind == "Q":
            t = {leaf: state_dict[f"{name}.{leaf}"] for leaf in ("codebook", "index", "mask")}
            util.require(tuple(t["mask"].shape) == shape, f"{name}: the mask must have the weight's shape {shape}")
            util.require(t["codebook"].numel() == clusters,
                         f"{name}: {t['codebook'].numel()} centroids but 'quantized' says {clusters}")
            try:
                b = layer_value(index_bits, name, roles[name])
            except KeyError as e:
                raise util.UserError(f"index_bits: {e.args[0]}") from None
            payload, row = _quantized_payload(name, t["codebook"], t["index"], t["mask"], b)
            by_ans = _ans_payload(name, t["codebook"], t["index"], t["mask"]) if coder == "ans" else None
            if by_ans is not None and len(by_ans[0]) < len(payload):
                kind, (payload, row) = "A", by_ans
            row["dense_bytes"] = 4 * math.prod(shape)
        elif pos in groups:
            kind, (payload, names) = "G", groups[pos]
            row = dict(name=f"{roles[name]} x {len(names)}", kind="shared", members=names, shape=None,
                       params=sum(state_dict[n].numel() for n in names), dtype=str(state_dict[name].dtype).split(".")[-1],
                       bytes=len(payload) + FRAME, dense_bytes=sum(4 * state_dict[n].numel() for n in names if n in params))
        elif name in grouped:
            continue
        else:
            t = state_dict[name]
            kind, payload = alone[name]
            row = dict(name=name, kind="raw" if kind == "R" else "tabled", shape=list(shape), params=t.numel(),
                       dtype=str(t.dtype).split(".")[-1], bytes=len(payload) + FRAME,
                       dense_bytes=4 * t.numel() if name in params else 0)
        parts.append(_section(kind, payload))
        rows.append(row)
    parts.append(_section("E", struct.pack("<I", len(parts) - 2)))
    blob = b"".join(parts)
    for row in rows:
        row["ratio"] = row["dense_bytes"] / row["bytes"]
    return blob, dict(layers=rows, header_bytes=len(blob) - sum(r["bytes"] for r in rows),
                      dense_bytes=sum(r["dense_bytes"] for r in rows))


def decode_bytes(blob):
    """Decode a whole file held in memory -> (state dict in the sections' order, header dict).

    The input is treated as hostile: every length and count is checked against the bytes
    left and the tensor shapes of the model the header names before anything is allocated,
    and every section's CRC is checked before it is parsed. Raises FormatError."""
    blob = memoryview(blob)
    if bytes(blob[:len(MAGIC)]) != MAGIC[:len(blob)]:
        raise FormatError("not a compressed model file (wrong magic bytes)")
    if len(blob) < len(MAGIC) + 2:
        raise FormatError(f"file of {len(blob)} bytes ends inside its magic bytes and version: truncated")
    version = struct.unpack_from("<H", blob, len(MAGIC))[0]
    if version not in READABLE_VERSIONS:
        raise FormatError(f"file format version {version}, but this reader knows versions "
                          f"{READABLE_VERSIONS} only")
    pos, index = len(MAGIC) + 2, 0

    def next_section(what):
        nonlocal pos, index
        if len(blob) - pos < FRAME:
            raise FormatError(f"file ends where section {index} ({what}) should start: truncated")
        length, kind = struct.unpack_from("<IB", blob, pos)
        if length > len(blob) - pos - FRAME:
            raise FormatError(f"section {index} ({what}) claims {length} bytes, the file has "
                              f"{len(blob) - pos - FRAME} left: truncated or corrupt")
        payload = blob[pos + 5:pos + 5 + length]
        crc = struct.unpack_from("<I", blob, pos + 5 + length)[0]
        if zlib.crc32(payload, zlib.crc32(blob[pos:pos + 5])) != crc:
            raise FormatError(f"section {index} ({what}) fails its CRC check: the file is corrupt")
        pos, index = pos + FRAME + length, index + 1
        return chr(kind), payload

    def parse(what, readers):
        """Read the next section with readers[its kind] (kind -> fn(_Reader))."""
        got, payload = next_section(what)
        try:
            r = _Reader(payload, version)
            if got not in readers or (got in SINCE and not r.since(got)):
                raise ValueError(f"a section of kind {got!r} where {' or '.join(map(repr, readers))} belongs")
            return readers[got](r)
        except ValueError as e:
            raise FormatError(f"section {index - 1} ({what}): {e}") from None

    header = parse("header", {"H": _header})
    try:
        sections, _, roles = architecture(header["model"], header["quantized"])
    except ValueError as e:
        raise FormatError(f"section 0 (header): {e}") from None
    state, later = {}, {}  # later: {position: a member of an earlier 'G' section}, see _read_group
    for at, (kind, name, shape, clusters) in enumerate(sections):
        if at in later:
            try:
                state.update([_member(later.pop(at), state)])
            except ValueError as e:
                raise FormatError(f"the 'G' section holding {name}: {e}") from None
            continue
        readers = ({"Q": functools.partial(_read_quantized, name=name, shape=shape, clusters=clusters),
                    "A": functools.partial(_read_ans, name=name, shape=shape, clusters=clusters)} if kind == "Q"
                   else {"R": functools.partial(_read_raw, name=name, shape=shape),
                         "T": functools.partial(_read_tabled, name=name, shape=shape),
                         "G": functools.partial(_read_group, position=at, sections=sections, later=later,
                                                roles=roles, state=state)})
        state.update(parse(name, readers))
    end = parse("end marker", {"E": _end})
    if end != index - 1 or pos != len(blob):
        raise FormatError(f"end marker counts {end} sections where {index - 1} precede it, "
                          f"{len(blob) - pos} bytes follow it")
    return state, header


def _end(r):
    count = r.unpack("<I")[0]
    r.done()
    return count


MAX_HEADER = 1 << 20  # bytes of header JSON a decoder inflates at most: a hostile stream cannot balloon
# Version 8's header is a zlib stream primed with this preset dictionary (RFC 1950 FDICT): the
# keys, models, data sets and layer names most headers repeat, so that a LeNet header of 300
# bytes of JSON deflates to about 30 instead of 190. Part of the format: never change it.
HEADER_DICTIONARY = (
    b'{"model":{"name":"torchvision.mobilenet_v2","kwargs":{"in_shape":[3,224,224],"num_classes":1000,'
    b'"pretrained":false,"model_args":{}}},"quantized":{"features.0.0":{"bits":4,"clusters":16},'
    b'"layer1.0.conv1":{"bits":3,"clusters":8},"layer2.0.shortcut.0":{"bits":2,"clusters":4},'
    b'"classifier.1":{"bits":6,"clusters":64}},"data":{"dataset":"cifar100","subset":0,"test_batch_size":1000,'
    b'"image_size":224,"workers":4,"val_split":0.1},"settings":{"index_bits":{"*":0},"coder":"huffman"}}'
    b'resnet18 resnet20 resnet56 alexnet vgg16 fashion_mnist svhn imagenet folder lenet5_caffe lenet5 '
    b'{"model":{"name":"lenet_300_100","kwargs":{"in_shape":[1,28,28],"num_classes":10}},"quantized":'
    b'{"conv1":{"bits":5,"clusters":32},"conv2":{"bits":5,"clusters":32},"fc1":{"bits":3,"clusters":8},'
    b'"fc2":{"bits":3,"clusters":8},"fc3":{"bits":4,"clusters":16}},"data":{"dataset":"mnist","subset":0,'
    b'"test_batch_size":1000},"settings":{"index_bits":{"*":0},"coder":"ans"}}')


def _deflate_header(raw):
    """The header's UTF-8 JSON bytes -> its version-8 zlib stream (level 9, HEADER_DICTIONARY)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
    return deflate.compress(raw) + deflate.flush()


def _header(r):
    raw = bytes(r.take(len(r.buf)))
    if r.since("header dictionary") and not (len(raw) >= 2 and raw[1] & 0x20):  # RFC 1950's FDICT flag
        raise ValueError("header is not zlib data primed with the format's dictionary")
    if r.since("zlib header"):
        inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY) if r.since("header dictionary") else zlib.decompressobj()
        try:
            raw = inflate.decompress(raw, MAX_HEADER)
        except zlib.error:
            raise ValueError("header is not zlib data") from None
        if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
            raise ValueError(f"header is not one zlib stream of at most {MAX_HEADER} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("header is not UTF-8 JSON") from None
    ok = (isinstance(header, dict) and isinstance(header.get("model"), dict)
          and isinstance(header["model"].get("name"), str) and isinstance(header["model"].get("kwargs"), dict)
          and isinstance(header.get("quantized"), dict))
    if not ok:
        raise ValueError("header lacks the model's name, kwargs and quantized layers")
    return header


def decode_file(path):
    """Decode a compressed model file -> (state dict, header). One call, no checkpoint needed:
    load the state dict into quantize.build_quantized_model(header['model'],
    header['quantized']). Raises FormatError (a util.UserError) naming the fault."""
    util.require(os.path.isfile(path), f"no compressed file at {path}")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return decode_bytes(blob)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


def load_compressed(path, device="cpu", model=None):
    """Rebuild the model from a compressed file alone -> (nn.Module on `device` in eval mode,
    with stage 2's layers: codebook, index and mask, as the file holds them; header). Other
    runtimes (plain layers, sparse inference): runtime.load. model: for a file whose network
    comes from a user's factory, that factory ('path/to/file.py:factory'), whose code then
    runs; the file alone never imports anything."""
    if model is not None:
        check_model(model)
    state, header = decode_file(path)
    net = build_quantized_model(without_pretrained_download(header["model"]), header["quantized"])
    net.load_state_dict(state)
    return net.eval().to(device), header


def bit_equal(a, b):
    """Same dtype, shape and bytes (so -0.0 differs from 0.0 and a NaN equals itself)."""
    as_bytes = lambda t: t.detach().cpu().reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))
