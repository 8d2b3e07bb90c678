"""Benchmark: Huffman encoding and decoding speed (huffman.py) against a plain Python coder, and
the ANS coder stage 3 uses with --coder=ans (constriction) on the same stream.

    python bench/bench_huffman.py

On one seeded stream of `symbols` symbols drawn from a skewed `alphabet`-symbol distribution
(symbol i has probability proportional to skew**i), times in the same run
  1. huffman.py: count, build the canonical code, pack (numba) / decode with a table (numba);
  2. the textbook coder: a string of '0'/'1' characters joined from a dict of code strings,
     and a decoder that walks the string one bit at a time, looking the prefix up in a dict.
Both use the same code, so their bytes must be identical (checked).
  3. constriction's ANS coder under the stream's own static distribution (what an 'A' section
     does with a layer's clusters), its bits per symbol beside Huffman's. Prints the table and
writes bench/results/huffman.json. Other processes on the machine slow both alike; the load
average is recorded next to the figures.
"""
import os
import sys
import time

import constriction
import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import huffman  # noqa: E402
import util  # noqa: E402

# -----------------------------------------------------------------------------
symbols = 1_000_000         # stream length
alphabet = 32               # distinct symbols (a 5-bit codebook's indices)
skew = 0.75                 # p(i) ~ skew**i: a few common symbols, a long tail of rare ones
repeats = 7                 # timed runs of the compiled coder (the best is kept)
baseline_repeats = 2        # timed runs of the plain Python coder (the best is kept)
seed = 0                    # the stream's random seed
out = "bench/results/huffman.json"  # where the figures are written
# -----------------------------------------------------------------------------
SETTINGS = util.settings_from(globals())


def compiled_encode(stream, n):
    lengths = huffman.code_lengths(np.bincount(stream, minlength=n))
    data, nbits = huffman.encode(stream, lengths)
    return data, nbits, lengths


def python_encode(stream, table):
    """The textbook encoder: join code strings, then turn the '0'/'1' string into bytes."""
    bits = "".join([table[s] for s in stream])
    padded = bits + "0" * (-len(bits) % 8)
    return int(padded, 2).to_bytes(len(padded) // 8, "big") if padded else b"", len(bits)


def python_decode(data, nbits, inverse):
    """The textbook decoder: walk the bits one at a time, looking each prefix up in a dict."""
    bits = bin(int.from_bytes(data, "big"))[2:].zfill(8 * len(data))[:nbits]
    out, prefix = [], ""
    for bit in bits:
        prefix += bit
        if prefix in inverse:
            out.append(inverse[prefix])
            prefix = ""
    return out


def ans_encode(stream, n):
    """constriction's ANS coder with the stream's own symbol frequencies -> (words, model)."""
    model = constriction.stream.model.Categorical(np.bincount(stream, minlength=n).astype(np.float64), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(stream, model)
    return coder.get_compressed(), model


def main(cfg):
    util.require(cfg["symbols"] > 0 and 2 <= cfg["alphabet"] <= huffman.MAX_ALPHABET and 0 < cfg["skew"] <= 1,
                 "need symbols > 0, 2 <= alphabet <= 65536 and 0 < skew <= 1")
    n = cfg["alphabet"]
    p = cfg["skew"] ** np.arange(n)
    p /= p.sum()
    stream = np.random.default_rng(cfg["seed"]).choice(n, cfg["symbols"], p=p).astype(np.int32)
    counts = np.bincount(stream, minlength=n)
    q = counts[counts > 0] / len(stream)
    entropy = float(-(q * np.log2(q)).sum())
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    data, nbits, lengths = compiled_encode(stream, n)
    huffman.decode(data, nbits, len(stream), lengths)
    first_call = time.perf_counter() - t0  # numba compile, or loading its on-disk cache
    t_enc, (data, nbits, lengths) = util.best_time(lambda: compiled_encode(stream, n), cfg["repeats"])
    t_dec, decoded = util.best_time(lambda: huffman.decode(data, nbits, len(stream), lengths), cfg["repeats"])
    assert np.array_equal(decoded, stream), "compiled decoder lost the stream"

    codes = huffman.canonical_codes(lengths)
    table = {s: format(int(codes[s]), f"0{lengths[s]}b") for s in range(n) if lengths[s]}
    inverse = {code: s for s, code in table.items()}
    as_list = stream.tolist()
    b_enc, (py_data, py_bits) = util.best_time(lambda: python_encode(as_list, table), cfg["baseline_repeats"])
    b_dec, py_decoded = util.best_time(lambda: python_decode(py_data, py_bits, inverse), cfg["baseline_repeats"])
    assert py_bits == nbits and py_data == data.tobytes(), "the two encoders disagree"
    assert py_decoded == as_list, "plain Python decoder lost the stream"

    a_enc, (words, model) = util.best_time(lambda: ans_encode(stream, n), cfg["repeats"])
    a_dec, ans_decoded = util.best_time(lambda: constriction.stream.stack.AnsCoder(words).decode(model, len(stream)),
                                        cfg["repeats"])
    assert np.array_equal(ans_decoded, stream), "ANS decoder lost the stream"

    mps = lambda seconds: cfg["symbols"] / seconds / 1e6
    result = dict(
        symbols=cfg["symbols"], alphabet=n, skew=cfg["skew"], seed=cfg["seed"],
        entropy_bits=entropy, bits_per_symbol=nbits / len(stream), max_code_bits=int(lengths.max()),
        compiled=dict(encode_msym_s=mps(t_enc), decode_msym_s=mps(t_dec), encode_s=t_enc, decode_s=t_dec,
                      first_call_s=first_call),
        python=dict(encode_msym_s=mps(b_enc), decode_msym_s=mps(b_dec), encode_s=b_enc, decode_s=b_dec),
        speedup=dict(encode=b_enc / t_enc, decode=b_dec / t_dec),
        ans=dict(encode_msym_s=mps(a_enc), decode_msym_s=mps(a_dec), encode_s=a_enc, decode_s=a_dec,
                 bits_per_symbol=32 * len(words) / len(stream)),
        cpus=os.cpu_count(), load_average=dict(before=load_before, after=os.getloadavg()),
        numba=numba.__version__, numpy=np.__version__, cpu=util.cpu_model())
    print(f"stream: {len(stream)} symbols, {n}-symbol alphabet, p(i) ~ {cfg['skew']}**i; entropy {entropy:.3f} "
          f"bits, Huffman {nbits / len(stream):.3f} bits/symbol (longest code {int(lengths.max())} bits), "
          f"ANS {32 * len(words) / len(stream):.3f}")
    print(f"{'':26}{'encode':>16}{'decode':>16}")
    for name, (e, d) in (("huffman.py (numba)", (t_enc, t_dec)), ("plain Python (str/dict)", (b_enc, b_dec)),
                         ("ANS (constriction)", (a_enc, a_dec))):
        print(f"{name:26}{mps(e):10.1f} Msym/s{mps(d):10.1f} Msym/s")
    print(f"{'speed-up (numba / Python)':26}{b_enc / t_enc:15.0f}x{b_dec / t_dec:15.0f}x")
    print(f"first call (compile or load numba's cache): {first_call:.2f} s; "
          f"load average {load_before[0]:.1f} -> {result['load_average']['after'][0]:.1f} on {os.cpu_count()} CPUs")
    util.write_json(cfg["out"], result)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    util.run_stage(main, SETTINGS)
