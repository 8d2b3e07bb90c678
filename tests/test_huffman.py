"""Canonical Huffman coding (huffman.py): code lengths, canonical codes, and the compiled
encoder and decoder, on edge cases, seeded random streams and hostile inputs."""
import heapq
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import huffman


def round_trip(symbols, alphabet=None):
    symbols = np.asarray(symbols, dtype=np.int64)
    counts = np.bincount(symbols, minlength=alphabet or 0)
    lengths = huffman.code_lengths(counts)
    data, nbits = huffman.encode(symbols, lengths)
    assert len(data) == (nbits + 7) // 8
    assert nbits == huffman.encoded_bits(counts, lengths)
    out = huffman.decode(data, nbits, len(symbols), lengths)
    np.testing.assert_array_equal(out, symbols)
    return lengths, nbits


def kraft(lengths):
    return sum(2.0 ** -int(l) for l in lengths if l)


def entropy_bits(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum() * counts.sum())


# --- code lengths and canonical codes ---------------------------------------------------------

def test_known_code():
    lengths = huffman.code_lengths([5, 2, 1, 1])
    assert lengths.tolist() == [1, 2, 3, 3]
    codes = huffman.canonical_codes(lengths)
    assert [format(int(c), f"0{l}b") for c, l in zip(codes, lengths)] == ["0", "10", "110", "111"]


def test_canonical_codes_are_prefix_free_and_ordered():
    rng = np.random.default_rng(0)
    lengths = huffman.code_lengths(rng.integers(0, 50, 200))
    codes = huffman.canonical_codes(lengths)
    words = sorted(format(int(c), f"0{l}b") for c, l in zip(codes, lengths) if l)
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))  # sorted: a prefix sits just before
    used = np.flatnonzero(lengths)
    by_rank = used[np.lexsort((used, lengths[used]))]
    left_aligned = [int(codes[s]) << (huffman.MAX_CODE_BITS - int(lengths[s])) for s in by_rank]
    assert left_aligned == sorted(left_aligned)


def test_lengths_are_optimal_when_not_limited():
    """Huffman's code is optimal: compare its cost with a plain reference implementation."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = rng.integers(1, 1000, rng.integers(2, 40))
        heap = list(counts.tolist())
        heapq.heapify(heap)
        cost = 0
        while len(heap) > 1:
            merged = heapq.heappop(heap) + heapq.heappop(heap)
            cost += merged
            heapq.heappush(heap, merged)
        lengths = huffman.code_lengths(counts)
        assert huffman.encoded_bits(counts, lengths) == cost
        assert kraft(lengths) == 1.0


def test_length_limit_keeps_a_prefix_code():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # the deepest possible Huffman tree: 39 levels
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_CODE_BITS and kraft(lengths) <= 1
    huffman.check_lengths(lengths)
    symbols = np.repeat(np.arange(40), np.minimum(counts, 3000))
    np.random.default_rng(2).shuffle(symbols)
    round_trip(symbols, 40)
    assert huffman.code_lengths(counts, limit=8).max() == 8


# --- round trips --------------------------------------------------------------------------------

def test_empty_stream():
    lengths, nbits = round_trip([], 5)
    assert nbits == 0 and not lengths.any()
    assert huffman.decode(b"", 0, 0, np.zeros(0, np.uint8)).shape == (0,)


def test_one_symbol_costs_no_bits():
    lengths, nbits = round_trip([7] * 1000)
    assert nbits == 0 and lengths.tolist() == [0] * 7 + [1]


def test_two_symbols_one_bit_each():
    _, nbits = round_trip([0, 1, 1, 0, 1] * 7)
    assert nbits == 35


def test_full_16_bit_alphabet():
    rng = np.random.default_rng(3)
    symbols = np.concatenate([np.arange(1 << 16), rng.integers(0, 1 << 16, 50000)])
    rng.shuffle(symbols)
    lengths, _ = round_trip(symbols)
    assert np.count_nonzero(lengths) == 1 << 16


@pytest.mark.parametrize("kind", ["skewed", "uniform"])
def test_random_streams_near_entropy(kind):
    rng = np.random.default_rng(4)
    p = 0.5 ** np.arange(32) if kind == "skewed" else np.ones(32)
    symbols = rng.choice(32, 200_000, p=p / p.sum())
    lengths, nbits = round_trip(symbols, 32)
    h = entropy_bits(np.bincount(symbols, minlength=32))
    assert h <= nbits <= h + len(symbols)  # Huffman: within one bit per symbol of the entropy
    if kind == "uniform":
        assert set(lengths.tolist()) == {5}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400), st.integers(0, 3))
def test_round_trip_property(symbols, skew):
    symbols = [s >> skew * 2 for s in symbols]  # fold onto fewer symbols: more repeats
    lengths, nbits = round_trip(symbols)
    if len(set(symbols)) > 1:
        assert nbits >= math.floor(entropy_bits(np.bincount(symbols)))
    assert lengths.max(initial=0) <= huffman.MAX_CODE_BITS and kraft(lengths) <= 1


# --- hostile input: every fault is one ValueError, never a crash or a wrong answer -------------

def encoded(symbols):
    symbols = np.asarray(symbols)
    lengths = huffman.code_lengths(np.bincount(symbols))
    return (*huffman.encode(symbols, lengths), lengths)


@pytest.mark.parametrize("lengths, message", [
    ([1, 1, 1], "Kraft"),
    ([25, 1], "exceeds"),
    ([0, 2, 0], "length 1"),
])
def test_bad_length_tables_are_rejected(lengths, message):
    with pytest.raises(ValueError, match=message):
        huffman.decode(b"\x00", 8, 1, np.array(lengths, np.uint8))


def test_stream_faults_are_detected():
    rng = np.random.default_rng(5)
    data, nbits, lengths = encoded(rng.integers(0, 10, 1000))
    with pytest.raises(ValueError, match="bytes cannot hold"):
        huffman.decode(data[:-1], nbits, 1000, lengths)
    with pytest.raises(ValueError, match="cannot hold"):  # a count no stream of nbits can hold
        huffman.decode(data, nbits, 1 << 40, lengths)
    with pytest.raises(ValueError, match="used"):  # fewer symbols than the bits encode
        huffman.decode(data, nbits, 999, lengths)
    with pytest.raises(ValueError, match="ends before|used"):  # more symbols than bits
        huffman.decode(data[:-2], nbits - 16, 1000, lengths)


def test_incomplete_code_rejects_unused_code_words():
    lengths = np.array([1, 2], np.uint8)  # codes 0 and 10; 11 is no code word
    assert huffman.decode(np.array([0b01000000], np.uint8), 3, 2, lengths).tolist() == [0, 1]
    with pytest.raises(ValueError, match="no code word"):
        huffman.decode(np.array([0b11000000], np.uint8), 2, 1, lengths)


def test_encode_rejects_symbols_outside_the_code():
    with pytest.raises(ValueError):
        huffman.encode(np.array([0, 3]), np.array([1, 1], np.uint8))
    with pytest.raises(ValueError):
        huffman.encode(np.array([0, 1, 2]), np.array([1, 0, 1], np.uint8))
    with pytest.raises(ValueError):
        huffman.encode(np.array([-1]), np.array([1, 1], np.uint8))
