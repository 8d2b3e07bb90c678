"""Canonical Huffman coding of integer symbol streams (Deep Compression section 4).

A code is described by its code lengths alone, one per symbol of the alphabet (0 = unused):
the canonical code assigns codes in order of (length, symbol), so a file stores the lengths
and never a tree. Lengths are capped at MAX_CODE_BITS, which bounds the decoder's window and
lets it reject a hostile length table.

Bits are packed most-significant first. Encoding and decoding are compiled loops (numba):
encode gathers each symbol's code and shifts it into a 64-bit accumulator; decode peeks
FAST_BITS bits into a lookup table and falls back, for the rare longer codes, to the
canonical "first code of each length" search.
"""
import heapq

import numba
import numpy as np

MAX_CODE_BITS = 24   # longest code; must stay <= 32 so the decoder's 64-bit window always holds one code after a refill
FAST_BITS = 11       # the decoder's lookup table has 2**FAST_BITS entries (8 KiB, stays in L1 cache)
MAX_ALPHABET = 1 << 16


def code_lengths(counts, limit=MAX_CODE_BITS):
    """Huffman code lengths for symbol counts, capped at `limit` bits.

    counts: (n,) non-negative integers, n <= MAX_ALPHABET. Returns (n,) uint8 lengths, 0 for
    symbols that do not occur. A single used symbol gets length 1 (encode() then spends no
    bits on it). Ties are broken by symbol number, so the result is deterministic."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or len(counts) > MAX_ALPHABET or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D array of at most {MAX_ALPHABET} non-negative integers")
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), np.uint8)
    m = len(used)
    if m <= 1:
        lengths[used] = 1
        return lengths
    # The classic merge of the two rarest subtrees; the heap holds one entry per used symbol
    # (never one per stream element). parent[] records the tree, leaves are 0..m-1.
    heap = [(int(c), i) for i, c in enumerate(counts[used])]
    heapq.heapify(heap)
    parent = [0] * (2 * m - 1)
    node = m
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
        node += 1
    depth = [0] * (2 * m - 1)
    for i in range(2 * m - 3, -1, -1):  # parents are created after their children
        depth[i] = depth[parent[i]] + 1
    depth = np.array(depth[:m], dtype=np.int64)
    if depth.max() > limit:
        depth = _limit_depths(depth, counts[used], limit)
    lengths[used] = depth
    return lengths


def _limit_depths(depth, counts, limit):
    """Cap code lengths at `limit` and restore the Kraft inequality sum(2**-l) <= 1.

    Clamping the deep codes overfills the code space; each step then lengthens by one bit the
    rarest of the deepest codes still shorter than the limit, which frees the smallest possible
    amount (2**-(l+1)) at the smallest cost. depth, counts: (m,) int64 -> (m,) int64."""
    depth = np.minimum(depth, limit)
    excess = int(np.sum(np.left_shift(1, limit - depth))) - (1 << limit)  # in units of 2**-limit
    buckets = [[] for _ in range(limit + 1)]
    for s in np.lexsort((-np.arange(len(depth)), -counts)):  # commonest first, so pop() takes the rarest
        buckets[depth[s]].append(s)
    while excess > 0:
        l = next(l for l in range(limit - 1, 0, -1) if buckets[l])
        s = buckets[l].pop()
        depth[s] = l + 1
        buckets[l + 1].append(s)
        excess -= 1 << (limit - l - 1)
    return depth


def check_lengths(lengths):
    """Reject a length table that is not a prefix code: lengths in 0..MAX_CODE_BITS, at most
    MAX_ALPHABET of them, Kraft sum <= 1, and a lone used symbol of length 1. Raises ValueError."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or len(lengths) > MAX_ALPHABET:
        raise ValueError(f"a code has at most {MAX_ALPHABET} symbols")
    if len(lengths) and int(lengths.max()) > MAX_CODE_BITS:
        raise ValueError(f"code length {int(lengths.max())} exceeds {MAX_CODE_BITS} bits")
    used = lengths[lengths > 0].astype(np.int64)
    if len(used) == 1 and used[0] != 1:
        raise ValueError("a code with one symbol must give it length 1")
    if int(np.sum(np.left_shift(1, MAX_CODE_BITS - used))) > 1 << MAX_CODE_BITS:
        raise ValueError("code lengths violate the Kraft inequality (not a prefix code)")


def canonical_codes(lengths):
    """Canonical code of each symbol from its length: (n,) lengths -> (n,) uint32 codes.

    Symbols sorted by (length, symbol) take consecutive codes; moving to a longer length
    appends zeros (DEFLATE's rule, RFC 1951 section 3.2.2)."""
    check_lengths(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    order, first, _ = _canonical_order(lengths)
    codes = np.zeros(len(lengths), np.uint32)
    ls = lengths[order]
    group_start = np.searchsorted(ls, ls)  # index of the first symbol of each symbol's length
    codes[order] = first[ls] + np.arange(len(order)) - group_start
    return codes


def _canonical_order(lengths):
    """-> (used symbols sorted by (length, symbol), first code of each length (MAX_CODE_BITS+2,),
    number of codes of each length (MAX_CODE_BITS+2,)), all int64."""
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]
    count = np.bincount(lengths[used], minlength=MAX_CODE_BITS + 2).astype(np.int64)
    count[0] = 0
    first = np.zeros(MAX_CODE_BITS + 2, np.int64)
    for l in range(1, MAX_CODE_BITS + 2):
        first[l] = (first[l - 1] + count[l - 1]) << 1
    return order, first, count


def encoded_bits(counts, lengths):
    """Size in bits of a stream with these symbol counts under these code lengths."""
    counts = np.asarray(counts, dtype=np.int64)
    if np.count_nonzero(counts) <= 1:
        return 0
    return int(np.dot(counts, np.asarray(lengths, dtype=np.int64)))


def encode(symbols, lengths):
    """Huffman-encode a stream. symbols: (N,) integers in [0, len(lengths)) with a non-zero
    length. Returns (uint8 bytes, MSB-first and zero-padded to a whole byte, number of bits).
    A code with a single used symbol costs no bits: the count alone rebuilds the stream."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    if len(symbols) and symbols.min() < 0:
        raise ValueError("negative symbol")
    counts = np.bincount(symbols, minlength=len(lengths))  # one pass: range check and size
    if len(counts) > len(lengths) or counts[lengths == 0].any():
        raise ValueError("a symbol outside the code's alphabet")
    if np.count_nonzero(lengths) <= 1:
        return np.zeros(0, np.uint8), 0
    codes = canonical_codes(lengths)
    nbits = int(counts @ lengths.astype(np.int64))
    out = np.zeros((nbits + 7) // 8 + 8, np.uint8)  # +8: whole 32-bit words may be written
    _pack(symbols, codes, lengths, out)
    return out[:(nbits + 7) // 8], nbits


def decode(data, nbits, count, lengths):
    """Decode `count` symbols from `nbits` bits of `data` (uint8, as encode() returned it)
    under the code with these lengths. Returns (count,) int32.

    The caller bounds `count`; everything else is checked here: the length table is a prefix
    code, the data holds nbits bits, each window is a code word, and the symbols use exactly
    nbits bits. Raises ValueError otherwise, never reads outside `data`."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    check_lengths(lengths)
    data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if len(data) != (nbits + 7) // 8:
        raise ValueError(f"{len(data)} bytes cannot hold exactly {nbits} bits")
    used = np.count_nonzero(lengths)
    if count == 0 or used == 1:
        if nbits != 0 or (count and not used):
            raise ValueError("bits present where the code needs none")
        return np.full(count, np.argmax(lengths > 0) if used else 0, np.int32)
    if used == 0:
        raise ValueError("symbols to decode but the code is empty")
    if not int(lengths[lengths > 0].min()) * count <= nbits <= MAX_CODE_BITS * count:
        raise ValueError(f"{nbits} bits cannot hold {count} symbols of this code")
    max_len = int(lengths.max())
    fast_bits = min(FAST_BITS, max_len)
    order, first, n_len = _canonical_order(lengths.astype(np.int64))
    ls = lengths[order].astype(np.int64)
    short = ls <= fast_bits
    fast = np.zeros(1 << fast_bits, np.int32)
    entries = np.repeat((order[short] << 5) | ls[short], 1 << (fast_bits - ls[short]))
    fast[:len(entries)] = entries  # canonical codes fill the table from 0 upwards
    limit = (first + n_len) << np.maximum(max_len - np.arange(MAX_CODE_BITS + 2), 0)
    offset = np.concatenate([[0], np.cumsum(n_len)[:-1]])
    padded = np.zeros(len(data) + 8, np.uint8)
    padded[:len(data)] = data
    out = np.empty(count, np.int32)
    got = _unpack(padded, out, fast, fast_bits, max_len, limit, first, offset, order.astype(np.int32))
    if got == -1:
        raise ValueError("bit stream holds a sequence that is no code word")
    if got == -2:
        raise ValueError("bit stream ends before its last symbol")
    if got != nbits:
        raise ValueError(f"stream used {got} bits, header says {nbits}")
    return out


@numba.njit(cache=True, nogil=True)
def _pack(symbols, codes, lengths, out):
    """Append each symbol's code to a 64-bit accumulator; flush 32 bits at a time."""
    acc = np.uint64(0)
    nacc = 0
    o = 0
    for i in range(symbols.shape[0]):
        s = symbols[i]
        l = np.int64(lengths[s])
        acc = (acc << np.uint64(l)) | np.uint64(codes[s])  # bits above nacc are stale, masked below
        nacc += l
        if nacc >= 32:
            nacc -= 32
            w = acc >> np.uint64(nacc)
            out[o] = np.uint8((w >> np.uint64(24)) & np.uint64(255))
            out[o + 1] = np.uint8((w >> np.uint64(16)) & np.uint64(255))
            out[o + 2] = np.uint8((w >> np.uint64(8)) & np.uint64(255))
            out[o + 3] = np.uint8(w & np.uint64(255))
            o += 4
    while nacc > 0:
        if nacc >= 8:
            nacc -= 8
            out[o] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(255))
        else:
            out[o] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(255))
            nacc = 0
        o += 1


@numba.njit(cache=True, nogil=True)
def _unpack(data, out, fast, fast_bits, max_len, limit, first, offset, order):
    """Decode len(out) symbols. data ends with 8 zero bytes of padding. Returns the number of
    bits consumed; -1 at a window that starts no code word (an incomplete code), -2 when the
    data runs out."""
    buf = np.uint64(0)  # the next bits of the stream, left-aligned
    cnt = 0             # how many bits of buf are valid
    p = 0
    used = 0
    nd = data.shape[0]
    fshift = np.uint64(64 - fast_bits)
    wshift = np.uint64(64 - max_len)
    for i in range(out.shape[0]):
        if cnt < max_len:
            while cnt <= 56 and p < nd:
                buf |= np.uint64(data[p]) << np.uint64(56 - cnt)
                p += 1
                cnt += 8
            if cnt < max_len:  # past the padding: the stream is shorter than its symbols claim
                return -2
        e = fast[buf >> fshift]
        l = e & 31
        if l != 0:
            out[i] = e >> 5
        else:
            w = np.int64(buf >> wshift)
            l = fast_bits + 1
            while l <= max_len and w >= limit[l]:
                l += 1
            if l > max_len:
                return -1
            out[i] = order[offset[l] + (w >> (max_len - l)) - first[l]]
        buf = buf << np.uint64(l)
        cnt -= l
        used += l
    return used
