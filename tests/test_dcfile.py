"""dcfile.py: the .dc container: relative indices, every section kind, round trips bit for bit,
hostile and old-version files."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import dcfile
import quantize
import util
from conftest import (MNIST, SMALL, as_version7, assert_bit_equal, codebook_end, fails, header_json, patch,
                      quantized_state, rebuild, round_trip, sections)
from models import build_model
from prune import masked_layers


def test_gaps_with_fillers_known_answer():
    # span 2**3 - 1 = 7: gap 20 = 7 + 7 + 6 -> two fillers, then 6
    assert dcfile.gap_stream(np.array([0, 1, 21]), 3).tolist() == [1, 1, 0, 0, 6]
    # the first non-zero counts from position -1: position 100 = gap 101 = 33 fillers x 3 + 2
    first_far = dcfile.gap_stream(np.array([100]), 2)
    assert first_far.tolist() == [0] * 33 + [2]
    assert dcfile.positions_from_gaps(first_far, 2, 1, 101).tolist() == [100]
    # a gap of exactly the span needs no filler; one more needs one
    assert dcfile.gap_stream(np.array([6, 14]), 3).tolist() == [7, 0, 1]
    assert dcfile.gap_stream(np.array([], np.int64), 5).tolist() == []

@settings(max_examples=80, deadline=None)
@given(st.sets(st.integers(0, 5000), max_size=200), st.integers(1, dcfile.MAX_INDEX_BITS))
def test_gap_stream_round_trip(positions, b):
    positions = np.array(sorted(positions), np.int64)
    stream = dcfile.gap_stream(positions, b)
    np.testing.assert_array_equal(dcfile.positions_from_gaps(stream, b, len(positions), 5001), positions)
    counts = dcfile.span_counts(dcfile.gap_histogram(positions), b)
    np.testing.assert_array_equal(counts, np.bincount(stream, minlength=1 << b))


def test_bad_gap_streams_are_rejected():
    with pytest.raises(ValueError, match="non-zeros"):  # a trailing filler
        dcfile.positions_from_gaps(np.array([1, 0]), 3, 1, 100)
    with pytest.raises(ValueError, match="non-zeros"):  # fewer non-zeros than claimed
        dcfile.positions_from_gaps(np.array([1, 2]), 3, 3, 100)
    with pytest.raises(ValueError, match="runs past"):
        dcfile.positions_from_gaps(np.array([0, 0, 5]), 3, 1, 15)


def test_best_span_is_the_smallest_stream():
    rng = np.random.default_rng(0)
    for density in (0.02, 0.3, 0.9):
        positions = np.flatnonzero(rng.random(20000) < density)
        sizes = {b: dcfile._stream_size(c, dcfile.huffman.code_lengths(c))
                 for b in range(1, 13) for c in [dcfile.span_counts(dcfile.gap_histogram(positions), b)]}
        assert sizes[dcfile.best_span(positions)] == min(sizes.values())


@pytest.mark.parametrize("index_bits", [0, {"conv": 8, "fc": 5}, 1])
def test_lenet_300_100_round_trip(index_bits):
    state, args, quantized = quantized_state("lenet_300_100", MNIST, density=0.08)
    state["fc1.mask"][:, :100] = 0  # the first non-zero far from position 0, long gaps (fillers)
    state["fc1.index"][:, :100] = 0
    state["fc2.mask"][3, :] = 1  # survivors whose centroid is 0.0 must survive decoding
    state["fc2.index"][3, :] = 0
    _, report = round_trip(state, args, quantized, index_bits)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["fc1"]["fillers"] > 0 and rows["fc2"]["nonzero"] == int(state["fc2.mask"].sum())
    if index_bits == {"conv": 8, "fc": 5}:
        assert rows["fc1"]["index_bits"] == 5 and rows["fc1"]["index_bits_raw"] > 5  # fillers cost
    assert report["dense_bytes"] == 4 * 266610


def test_auto_span_beats_every_fixed_span():
    state, args, quantized = quantized_state("lenet_300_100", MNIST, density=0.05, seed=1)
    sizes = {b: {r["name"]: r["bytes"] for r in dcfile.encode_model(state, args, quantized, b)[1]["layers"]}
             for b in (0, 1, 2, 3, 4, 5, 6, 8, 12)}
    for layer in quantized:
        assert sizes[0][layer] == min(s[layer] for s in sizes.values())


def test_dense_codes_where_few_weights_are_pruned():
    """A ternary-like layer (85% non-zero, 2 values) is stored as one symbol per weight: smaller
    than any span of relative indices; a sparse one keeps its relative indices."""
    state, args, quantized = quantized_state("lenet_300_100", MNIST, density=0.85, clusters=2, seed=3)
    state["fc3.mask"] = (torch.rand(state["fc3.mask"].shape, generator=torch.Generator().manual_seed(1)) < 0.05).float()
    state["fc3.index"] *= state["fc3.mask"].to(torch.uint8)
    blob, report = round_trip(state, args, quantized)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["fc1"]["index_bits"] == rows["fc2"]["index_bits"] == 0 and rows["fc1"]["index_bytes"] == 0
    assert rows["fc3"]["index_bits"] > 0
    for b in (1, 2, 4):
        fixed = {r["name"]: r["bytes"] for r in dcfile.encode_model(state, args, quantized, b)[1]["layers"]}
        assert rows["fc1"]["bytes"] < fixed["fc1"] and rows["fc2"]["bytes"] < fixed["fc2"]
    # 3 symbols of probabilities .15, .425, .425: a Huffman code spends 1.575 bits a weight
    assert rows["fc1"]["weight_bytes"] * 8 / rows["fc1"]["params"] == pytest.approx(1.575, abs=0.01)


def test_a_layer_of_2_16_centroids_keeps_relative_indices():
    """With 65,536 centroids a dense code would need 65,537 symbols (0 for a pruned weight),
    more than a Huffman code holds: the layer keeps its relative indices, nearly dense or not."""
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.9, clusters=2 ** 16, seed=4)
    _, report = round_trip(state, args, quantized)
    assert all(r["index_bits"] > 0 and r["clusters"] == 2 ** 16 for r in report["layers"] if r["kind"] == "quantized")


def test_hostile_dense_codes_are_rejected():
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.9, clusters=2)
    blob, report = dcfile.encode_model(state, args, quantized)
    assert report["layers"][0]["index_bits"] == 0
    q = sections(blob)[1][2]
    span_at, _ = quant_fields(q)
    numel = 64 * 300
    fails(rebuild(blob, {1: patch(q, span_at + 5, "<I", numel - 1)}), "dense codes of")
    fails(rebuild(blob, {1: patch(q, span_at + 1, "<I", numel + 1)}), "dense codes of")
    fails(rebuild(blob, {1: patch(q, span_at + 1, "<I", int(state["fc1.mask"].sum()) - 1)}), "non-zeros where")
    fails(as_version7(blob, 4), "span of 0 bits")  # no dense codes before version 5


def test_lenet5_caffe_edge_layers_round_trip():
    """An all-pruned layer, a one-centroid codebook, int16 indices (> 256 clusters), a fully
    dense layer, and a masked layer left unquantized (stored raw with its mask)."""
    state, args, quantized = quantized_state("lenet5_caffe", MNIST, clusters={"conv2": 1, "fc1": 300},
                                             layers=["conv1", "conv2", "fc1"])
    state["conv1.mask"].zero_()
    state["conv1.index"].zero_()
    state["conv2.mask"].fill_(1)
    assert state["fc1.index"].dtype == torch.int16 and "fc2.weight" in state
    _, report = round_trip(state, args, quantized)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv1"]["nonzero"] == 0 and rows["conv2"]["index_bytes"] < 20  # one symbol: no bits
    assert rows["fc2.weight"]["kind"] == "raw" and rows["fc2.mask"]["dense_bytes"] == 0


def test_resnet18_round_trip_with_batch_norm():
    state, args, quantized = quantized_state(
        "resnet18", {"in_shape": [3, 32, 32], "num_classes": 10, "pretrained": False, "cifar_stem": True},
        density=0.03)
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    state["layer1.0.bn1.running_var"] = torch.rand(64) + 0.5
    blob, report = round_trip(state, args, quantized)
    stats = 2 * sum(m.num_features for m in build_model("resnet18").modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(quantized) == 21 and report["dense_bytes"] == 4 * (11173962 + stats)  # parameters and BN statistics
    assert report["dense_bytes"] / len(blob) > 30


def test_loads_into_stage_2_model(tmp_path):
    import quantize
    net = build_model("lenet5_caffe", **MNIST)
    with torch.no_grad():
        for _, m in masked_layers(net):
            m.mask.copy_((torch.rand_like(m.mask) < 0.2).float())
            m.weight.mul_(m.mask)
    quantized = quantize.quantize_model(net, {"conv": 4, "fc": 3})
    args = dict(name="lenet5_caffe", kwargs=MNIST)
    blob, _ = dcfile.encode_model(net.state_dict(), args, quantized)
    path = tmp_path / "m.dc"
    path.write_bytes(blob)
    decoded, header = dcfile.load_compressed(str(path))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net.eval()(x), decoded.eval()(x)) and header["model"] == args


def test_contract_violations_are_user_errors():
    state, args, quantized = quantized_state("lenet_300_100", SMALL)
    bad = dict(state)
    bad["fc1.index"] = state["fc1.index"].clone()
    bad["fc1.index"][state["fc1.mask"] == 0] = 1
    with pytest.raises(util.UserError, match="not 0 at pruned"):
        dcfile.encode_model(bad, args, quantized)
    bad = dict(state, **{"fc2.mask": state["fc2.mask"] * 0.5})
    with pytest.raises(util.UserError, match="other than 0 and 1"):
        dcfile.encode_model(bad, args, quantized)
    bad = {k: v for k, v in state.items() if k != "fc3.bias"}
    with pytest.raises(util.UserError, match="missing.*fc3.bias"):
        dcfile.encode_model(bad, args, quantized)
    with pytest.raises(util.UserError, match="centroids"):
        dcfile.encode_model(state, args, {**quantized, "fc1": dict(bits=6, clusters=64)})


@pytest.fixture(scope="module")
def small_file():
    """A LeNet-300-100 file with a section per tensor (share_tables=False: the layout the
    hostile tests below patch)."""
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.3)
    return dcfile.encode_model(state, args, quantized, share_tables=False)[0]


def test_intact_file_decodes(small_file):
    assert [k for _, k, _ in sections(small_file)] == ["H", "Q", "R", "Q", "R", "Q", "R", "E"]
    dcfile.decode_bytes(small_file)
    # Shared, the three float32 biases are one section of their values (two frames fewer).
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.3)
    blob, _ = round_trip(state, args, quantized)
    assert [k for _, k, _ in sections(blob)] == ["H", "Q", "G", "Q", "Q", "E"]
    # the group's dtype, stored dtype, m = 0 (every bias), the idle flags' byte (version 9), k = 0
    # and a float block's form byte in place of 3 dtypes (the values raw, or fewer bytes on a grid)
    assert len(blob) <= len(small_file) - 2 * dcfile.FRAME + (1 + 1 + 2 + 1 + 4 + 1) - 3


def test_version_2_files_still_decode_bit_for_bit():
    for name, kwargs in (("lenet_300_100", SMALL), ("resnet20", {"in_shape": [3, 32, 32], "num_classes": 10})):
        state, args, quantized = quantized_state(name, kwargs)
        blob, _ = round_trip(shared_biases(state), args, quantized, share_tables=False)  # as version 3 wrote
        old = as_version2(blob)
        assert len(old) > len(blob)  # the names and dims version 3 leaves out
        decoded, _ = dcfile.decode_bytes(old)
        assert_bit_equal(shared_biases(state), decoded)


def test_wrong_magic_and_version(small_file):
    fails(b"PK\x03\x04" + small_file[4:], "magic")
    fails(small_file[:8] + struct.pack("<H", dcfile.VERSION + 1) + small_file[10:], f"version {dcfile.VERSION + 1}")
    fails(small_file[:8] + struct.pack("<H", 0) + small_file[10:], "version 0")
    fails(b"", "truncated")


def test_every_truncation_is_reported(small_file):
    cuts = sorted({off for off, _, _ in sections(small_file)} | {off + 7 for off, _, _ in sections(small_file)}
                  | set(range(0, len(small_file), 97)) | {9, len(small_file) - 1})
    for cut in cuts:
        fails(small_file[:cut], "truncated")
    fails(small_file + b"\x00", "follow")


@pytest.mark.parametrize("where", ["length", "kind", "payload", "crc"])
def test_a_flipped_bit_in_each_section_is_caught(small_file, where):
    for i, (off, _, payload) in enumerate(sections(small_file)):
        at = {"length": off + 1, "kind": off + 4, "payload": off + 5 + len(payload) // 2,
              "crc": off + 5 + len(payload) + 2}[where]
        flipped = bytearray(small_file)
        flipped[at] ^= 0x10
        message = fails(bytes(flipped), f"section {i}|truncated")
        assert "CRC" in message or "truncated" in message or "end marker" in message


def quant_fields(payload):
    """Offset of the span byte in a 'Q' payload (index dtype, mask dtype, k, codebook), and
    the offset where the streams begin."""
    pos = codebook_end(payload)
    return pos, pos + 9


def header_of(secs):
    """The header dict of a file's sections."""
    return header_json(secs[0][2])


def as_version2(blob):
    """The same file in format version 2, as an earlier release wrote it: the header plain
    JSON, each 'R', 'T' and 'Q' payload starts with its tensor's name, and its dims follow the
    dtype byte(s)."""
    secs = sections(blob)
    header = header_of(secs)
    layout, _, _ = dcfile.architecture(header["model"], header["quantized"])
    secs = sections(as_version7(blob))
    replace = {0: json.dumps(header).encode()}
    for i, (kind, name, shape, _) in enumerate(layout, start=1):
        payload, n_dtypes = secs[i][2], 2 if kind == "Q" else 1
        raw = name.encode()
        replace[i] = (struct.pack("<H", len(raw)) + raw + payload[:n_dtypes]
                      + struct.pack(f"<B{len(shape)}I", len(shape), *shape) + payload[n_dtypes:])
    out = rebuild(blob, replace)
    return out[:8] + struct.pack("<H", 2) + out[10:]


def test_hostile_counts_are_rejected_before_allocating(small_file):
    secs = sections(small_file)
    q = secs[1][2]
    span_at, streams_at = quant_fields(q)
    hostile = {
        "non-zeros": patch(q, span_at + 1, "<I", 2**32 - 1),
        "entries": patch(q, span_at + 5, "<I", 2**32 - 1),
        "span of": patch(q, span_at, "<B", 40),
        "centroids": patch(q, 2, "<I", 2**32 - 1),
        "code of": patch(q, streams_at, "<I", 2**31),
        "needs": patch(q, streams_at + 4 + (5 * struct.unpack_from("<I", q, streams_at)[0] + 7) // 8, "<Q", 2**63),
        "dtype": patch(q, 0, "<B", 200),
    }
    for match, payload in hostile.items():
        fails(rebuild(small_file, {1: payload}), match)
    # version 2's names and dims are checked against the model
    old = as_version2(small_file)
    old_q = sections(old)[1][2]
    name_end = 2 + len("fc1") + 2
    for match, payload in (("shape", patch(old_q, name_end, "<B2I", 2, 2**20, 2**20)),
                           ("another tensor", patch(old_q, 2, "3s", b"fc2"))):
        bad = rebuild(old, {1: payload})  # rebuild writes the current version: set 2 again
        fails(bad[:8] + struct.pack("<H", 2) + bad[10:], match)
    raw = secs[2][2]
    fails(rebuild(small_file, {2: raw[:-4]}), "needs")
    fails(rebuild(small_file, {2: raw + b"\x00"}), "stray")
    header = header_of(secs)
    huge = dict(header, model=dict(name="lenet_300_100", kwargs={"in_shape": [1, 2**20, 2**20]}))
    fails(rebuild(small_file, {0: dcfile._deflate_header(json.dumps(huge).encode())}), "elements")
    unknown = dict(header, model=dict(name="gpt", kwargs={}))
    fails(rebuild(small_file, {0: dcfile._deflate_header(json.dumps(unknown).encode())}), "cannot build")
    fails(rebuild(small_file, {0: dcfile._deflate_header(b"\xff{")}), "JSON")
    fails(rebuild(small_file, {0: b"\xff{"}), "zlib")
    fails(rebuild(small_file, {0: b"\x78\xbb"}), "zlib")  # the FDICT flag, then no stream
    fails(rebuild(small_file, {0: dcfile._deflate_header(b" " * (dcfile.MAX_HEADER + 1))}), "at most")  # a zip bomb
    fails(rebuild(small_file, {0: secs[0][2] + b"\x00"}), "one zlib stream")
    fails(rebuild(small_file, {len(secs) - 1: struct.pack("<I", 3)}), "end marker")
    bad_code = bytearray(q)
    bad_code[streams_at + 4] = 0xFF  # first code lengths 31, 31, ...: over the 24-bit limit
    fails(rebuild(small_file, {1: bytes(bad_code)}), "exceeds|Kraft")


def shared_biases(state):
    """The state with each bias replaced by a few shared values (as quantization.py's bias_bits
    makes them), -0.0 and a NaN among them: bit patterns a table must keep apart."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".bias")]:
        values = torch.tensor([0.0, -0.0, 0.25, -1.5, float("nan")])
        state[key] = values[torch.arange(state[key].numel()) % 5]
    return state


def test_tabled_tensors_round_trip_and_pay():
    state, args, quantized = quantized_state("lenet_300_100", SMALL)
    plain, plain_report = round_trip(state, args, quantized, share_tables=False)
    shared = shared_biases(state)
    blob, report = round_trip(shared, args, quantized, share_tables=False)  # each bias its own table
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["fc1.bias"]["kind"] == rows["fc3.bias"]["kind"] == "tabled"  # 10 values: 5 float16s and codes
    assert [k for _, k, _ in sections(blob)] == ["H", "Q", "T", "Q", "T", "Q", "T", "E"]
    before = {r["name"]: r["bytes"] for r in plain_report["layers"]}
    assert rows["fc1.bias"]["bytes"] < before["fc1.bias"] / 4  # 300 floats -> 5 codes of at most 3 bits
    # A version-1 file cannot hold a table.
    old = as_version2(blob)
    fails(old[:8] + struct.pack("<H", 1) + old[10:], "section 2 .*kind 'T'")


def test_hostile_table_is_rejected():
    state, args, quantized = quantized_state("lenet_300_100", SMALL)
    blob, _ = dcfile.encode_model(shared_biases(state), args, quantized, share_tables=False)
    t = sections(blob)[2][2]
    k_at = 1  # after the dtype byte
    assert struct.unpack_from("<I", t, k_at)[0] == 5
    fails(rebuild(blob, {2: patch(t, k_at, "<I", 301)}), "table of 301 values")
    fails(rebuild(blob, {2: patch(t, k_at, "<I", 0)}), "table of 0 values")
    fails(rebuild(blob, {2: t[:-1]}), "needs")


def resnet20_shared_bn(seed=0):
    """ResNet-20 in stage 2's contract with every batch-norm folded and its scales (and its
    shifts) drawn from one network-wide set of 8 values, as quantization.py's bn_share='network'
    leaves them."""
    state, args, quantized = quantized_state("resnet20", {"in_shape": [3, 32, 32], "num_classes": 10}, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scales, shifts = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    for key, t in state.items():
        if key.endswith(("bn1.weight", "bn2.weight")):
            state[key] = scales[torch.randint(0, 8, t.shape, generator=g)]
        elif key.endswith(("bn1.bias", "bn2.bias")):
            state[key] = shifts[torch.randint(0, 8, t.shape, generator=g)]
        elif key.endswith("running_var"):
            state[key] = torch.full_like(t, 1 - 1e-5)
    return state, args, quantized


def test_shared_tables_round_trip_and_pay():
    state, args, quantized = resnet20_shared_bn()
    alone, _ = round_trip(state, args, quantized, share_tables=False)
    blob, report = round_trip(state, args, quantized)
    kinds = [k for _, k, _ in sections(blob)]
    shared = [r for r in report["layers"] if r["kind"] == "shared"]
    # scales, shifts, running means and running variances of the 19 batch-norms: a group each
    assert kinds.count("G") == len(shared) >= 4 and all(len(r["members"]) == 19 for r in shared)
    assert len(blob) < len(alone) - 19 * 3 * 4 * 4  # at least each scale's and shift's table saved
    decoded, _ = dcfile.decode_bytes(blob)
    layout, _, _ = dcfile.architecture(args, quantized)
    assert list(decoded) == dcfile.state_keys(layout)  # in the model's order, groups or not
    # A file of an earlier version (its header plain JSON) cannot hold a group.
    old = rebuild(as_version7(blob), {0: json.dumps(header_of(sections(blob))).encode()})
    fails(old[:8] + struct.pack("<H", 3) + old[10:], "kind 'G'")


def test_group_tables_halve_where_float16_holds_every_value():
    state, args, quantized = resnet20_shared_bn()
    scales = [k for k in state if k.endswith(("bn1.weight", "bn2.weight"))]
    for k in scales[:-1]:
        state[k] = state[k].half().float()  # exactly representable in float16
    state[scales[-1]] = state[scales[-1]].half().float() * 0 + torch.tensor(-0.0)  # -0.0: float16 keeps it
    blob, _ = round_trip(state, args, quantized)
    forms = [dcfile.FLOAT_FORMS[p[8]] for _, kind, p in sections(blob) if kind == "G" and p[0] == 0]  # m = 0
    # float16 values sit on a grid too, which their table takes where it is smaller still;
    # running_var 1 - 1e-5 is not a float16 (its one value is on a grid of 24 bits)
    assert sorted(forms) == ["float32", "grid", "grid", "grid"]
    # before version 8 the same groups said so in their stored dtype
    stored = [dcfile.DTYPES[p[1]] for _, kind, p in sections(as_version7(blob)) if kind == "G"]
    assert torch.float16 in stored and torch.float32 in stored


def resnet20_half_bn(seed=0):
    """ResNet-20 in stage 2's contract with every batch-norm folded and its scales and shifts
    rounded to float16 (quantization.py's bn_half): 688 distinct values each."""
    state, args, quantized = resnet20_shared_bn(seed)
    g = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if key.endswith(("bn1.weight", "bn2.weight", "bn1.bias", "bn2.bias")):
            state[key] = (torch.rand(t.shape, generator=g) + 0.5).half().float()
    return state, args, quantized


def test_group_holds_float16_values_themselves_where_a_table_costs_more():
    state, args, quantized = resnet20_half_bn()
    blob, report = round_trip(state, args, quantized)
    raw = [(payload, r) for (_, kind, payload), r in zip(sections(blob)[1:], report["layers"]) if kind == "G"
           and struct.unpack_from("<I", payload, 4)[0] == 0 and r["members"][0].endswith(("bn1.weight", "bn1.bias"))]
    assert len(raw) == 2  # the scales and the shifts
    for payload, row in raw:  # float16 or a grid, whichever is smaller: 2 bytes a value at most
        assert dcfile.FLOAT_FORMS[payload[8]] in ("float16", "grid") and len(payload) <= 4 + 4 + 1 + 2 * 688
    # Version 5 had no such group; cut short, the values are missing.
    i, (_, _, g) = next((i, s) for i, s in enumerate(sections(blob)) if s[2] == raw[0][0])
    fails(as_version7(blob, 5), "member positions")  # m = 0, then k = 0: neither in 5
    fails(rebuild(blob, {i: g[:-2]}), "needs")
    fails(rebuild(blob, {i: g + b"\0"}), "stray")


def test_group_of_a_whole_role_names_no_positions():
    state, args, quantized = resnet20_shared_bn()
    blob, _ = round_trip(state, args, quantized)
    groups = [payload for _, kind, payload in sections(blob) if kind == "G"]
    assert len(groups) == 5 and all(struct.unpack_from("<H", g, 2)[0] == 0 for g in groups)  # m = 0
    # One scale apart (float64), the other 18 are a group that lists its positions.
    last = [k for k in state if k.endswith("bn2.weight")][-1]
    state[last] = state[last].double()
    blob, _ = round_trip(state, args, quantized)
    assert sorted(struct.unpack_from("<H", payload, 2)[0] for _, kind, payload in sections(blob) if kind == "G") \
        == [0, 0, 0, 0, 18]
    # A version-5 file cannot name its members by role.
    fails(as_version7(round_trip(*resnet20_shared_bn())[0], 5), "member positions")


def test_hostile_group_is_rejected():
    state, args, quantized = resnet20_shared_bn()
    last = [k for k in state if k.endswith("bn1.weight")][-1]
    state[last] = state[last].double()  # the other 18 scales: a group with its positions listed
    blob, _ = dcfile.encode_model(state, args, quantized)
    i, (_, _, g) = next((i, s) for i, s in enumerate(sections(blob)) if s[1] == "G" and s[2][2] != 0)
    m = struct.unpack_from("<H", g, 2)[0]
    members = list(struct.unpack_from(f"<{m}H", g, 4))
    with_members = lambda ps: patch(g, 4, f"<{m}H", *ps)  # noqa: E731
    layout, _, _ = dcfile.architecture(args, quantized)
    quantized_at = next(p for p, s in enumerate(layout) if s[0] == "Q" and p > members[0])
    for ps in ([members[1]] + members[1:], members[:1] + [members[0]] + members[2:],
               members[:-1] + [len(layout)], sorted(members[:-1] + [quantized_at])):
        fails(rebuild(blob, {i: with_members(ps)}), "member")
    k_at = 4 + 2 * m
    fails(rebuild(blob, {i: patch(g, k_at, "<I", 0)}), "needs|stray")  # k = 0: the members' values, not there
    fails(rebuild(blob, {i: patch(g, 2, "<H", 1)}), "member")
    fails(rebuild(blob, {i: patch(g, 1, "<B", dcfile.DTYPES.index(torch.float64))}), "dtype")  # wider than float32
    fails(rebuild(blob, {i: g[:-1]}), "needs")



def idle_state():
    """LeNet-300-100 in stage 2's contract with 40 of fc1's 300 units and 20 of fc2's 100 left
    with no weight and a bias of 0 (what prune.drop_dead_units leaves), the other biases on a
    few values; fc3's 10 units all keep weights. -> (state, args, quantized, {layer: idle (n,)})."""
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.3)
    g = torch.Generator().manual_seed(1)
    idle = {}
    for layer, n in (("fc1", 40), ("fc2", 20), ("fc3", 0)):
        units = state[f"{layer}.mask"].shape[0]
        out = torch.zeros(units, dtype=torch.bool)
        out[torch.randperm(units, generator=g)[:n]] = True
        for leaf in ("mask", "index"):
            state[f"{layer}.{leaf}"][out] = 0
        state[f"{layer}.bias"] = torch.randint(1, 8, (units,), generator=g).float() / 8 * ~out
        idle[layer] = out
    return state, args, quantized, idle


def bias_group(blob):
    return next(p for _, kind, p in sections(blob) if kind == "G")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the num_classes=0 model
def test_idle_biases_are_left_out_of_their_group():
    state, args, quantized, idle = idle_state()
    blob, _ = round_trip(state, args, quantized)  # bit for bit, the idle zeros placed by the decoder
    g = bias_group(blob)
    # m = 0 (every bias), then one byte of flags for the three biases: fc1 and fc2 leave theirs out
    assert struct.unpack_from("<H", g, 2)[0] == 0 and g[4] == 0b011
    assert struct.unpack_from("<I", g, 5)[0] == 300 + 100 + 10 - 40 - 20  # the values left
    # one idle unit's bias not 0: fc1 codes all 300 of its biases, fc2 still leaves 20 out
    state["fc1.bias"][idle["fc1"].nonzero()[0]] = 0.5
    blob_all, _ = round_trip(state, args, quantized)
    g_all = bias_group(blob_all)
    assert g_all[4] == 0b010 and struct.unpack_from("<I", g_all, 5)[0] == 300 + 100 + 10 - 20
    assert len(g) < len(g_all)
    # -0.0 is not a zero the decoder can place: that bias is coded too
    state, args, quantized, idle = idle_state()
    state["fc2.bias"][idle["fc2"].nonzero()[0]] = -0.0
    assert bias_group(round_trip(state, args, quantized)[0])[4] == 0b001
    # Which tensors can: the bias of a quantized layer that precedes it, no other
    layout = dcfile.architecture(args, quantized)[0]
    assert [dcfile._idle_units(layout, p) for p, (kind, _, _, _) in enumerate(layout) if kind == "R"] \
        == ["fc1", "fc2", "fc3"]
    layout = dcfile.architecture(args, {"fc2": quantized["fc2"]})[0]  # fc1 and fc3 stored whole
    assert [dcfile._idle_units(layout, p) for p, (kind, _, _, _) in enumerate(layout) if kind == "R"] \
        == [None, None, None, "fc2", None, None, None]

    # A layer of no units (num_classes=0): its empty bias decodes, in a group or alone
    state, args, quantized = quantized_state("lenet_300_100", {**SMALL, "num_classes": 0}, density=0.3)
    for share in (True, False):
        round_trip(state, args, quantized, share_tables=share)


def test_hostile_idle_flags_are_rejected():
    state, args, quantized, _ = idle_state()
    blob, _ = dcfile.encode_model(state, args, quantized)
    i = next(j for j, (_, kind, _) in enumerate(sections(blob)) if kind == "G")
    g = bias_group(blob)
    fails(rebuild(blob, {i: patch(g, 4, "<B", 0b1011)}), "past the members")  # a flag for a 4th bias
    fails(rebuild(blob, {i: patch(g, 5, "<I", 411)}), "411 values for 410 elements")
    for total in (351, 349):  # the stream then codes one symbol more or fewer than it holds
        fails(rebuild(blob, {i: patch(g, 5, "<I", total)}), "stream")
    # The values left must be what the masks say, to the last member (the masks are decoded
    # after the group: the count is checked as each member is placed)
    values = dcfile._Values(np.arange(5, dtype=np.uint32), torch.float32, members=2)
    assert list(values.take(2)) == [0, 1]
    with pytest.raises(ValueError, match="takes 2 values where its section has 3 left .the last member"):
        values.take(2)
    with pytest.raises(ValueError, match="takes 4 values where its section has 3 left"):
        dcfile._Values(np.arange(3, dtype=np.uint32), torch.float32, members=2).take(4)
    fails(blob[:8] + struct.pack("<H", 8) + blob[10:], "table")  # version 8 has no flags: k reads them


def test_decode_file_names_the_path(tmp_path, small_file):
    path = tmp_path / "cut.dc"
    path.write_bytes(small_file[:-3])
    with pytest.raises(util.UserError, match="cut.dc: .*truncated"):
        dcfile.decode_file(str(path))


# --- the stages as a user runs them --------------------------------------------------------------


def test_an_index_dtype_too_narrow_for_its_codebook_is_refused():
    # 300 centroids need an int16 index; a hostile file saying uint8 would wrap them silently
    state, args, quantized = quantized_state("lenet_300_100", SMALL, clusters={"fc1": 300}, layers=["fc1"])
    blob, _ = round_trip(state, args, quantized)
    at, payload = next((i, p) for i, (_, kind, p) in enumerate(sections(blob)) if kind == "Q")
    assert payload[0] == dcfile.DTYPES.index(torch.int16)
    fails(rebuild(blob, {at: patch(payload, 0, "<B", dcfile.DTYPES.index(torch.uint8))}),
          "300 centroids, more than its torch.uint8 index can name")


# --- version 8: float blocks, the header's dictionary ---------------------------------------------

def float_block(values):
    return dcfile._float_block(np.array(values, np.float32))


def read_float_block(raw, n):
    r = dcfile._Reader(raw)
    out = dcfile._read_float_block(r, n)
    r.done()
    return out


def test_float_block_known_answer():
    # 0.5, -0.25, 1.0 = 2, -1, 4 times 2**-2; differences 2, -3, 5 zig-zag to 4, 5, 10: 4 bits each
    raw = float_block([0.5, -0.25, 1.0])
    assert raw == bytes([2]) + struct.pack("<hB", -2, 4) + bytes([0b01000101, 0b10100000])
    assert read_float_block(raw, 3).tolist() == [0.5, -0.25, 1.0]
    assert float_block([0.0, 0.0]) == bytes([2]) + struct.pack("<hB", 0, 0)  # zeros: no bits at all
    assert float_block([1 / 3]) == bytes([0]) + struct.pack("<f", 1 / 3)  # 24 significant bits: raw is smaller
    assert float_block([-0.0, 1.5]) == bytes([1]) + np.array([-0.0, 1.5], "<f2").tobytes()  # no grid holds -0.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=40), st.booleans())
def test_float_block_round_trip_bit_for_bit(values, gridded):
    values = np.array(values, np.float32)
    on_grid = None
    if gridded and len(values) and np.isfinite(values).all():
        t = torch.from_numpy(values.copy())
        on_grid = quantize.round_to_grid(t, 8)  # None where every value is 0 (and left as it was)
        values = t.numpy()
    raw = dcfile._float_block(values)
    assert len(raw) <= 1 + 4 * len(values)
    np.testing.assert_array_equal(read_float_block(raw, len(values)).view(np.uint32), values.view(np.uint32))
    if on_grid is not None:  # integers of 8 bits and a sign: differences of 11 bits at most
        assert len(raw) <= 4 + (11 * len(values) + 7) // 8


def test_long_float_blocks_round_trip():
    # codes packed in chunks: more values than one chunk, on a grid of 12 bits
    values = (np.random.default_rng(0).integers(-2048, 2048, dcfile.GRID_CHUNK * 3 + 5) / 1024).astype(np.float32)
    raw = dcfile._float_block(values)
    assert raw[0] == 2 and len(raw) < 2 * len(values)
    np.testing.assert_array_equal(read_float_block(raw, len(values)), values)
    zeros = read_float_block(dcfile._float_block(np.zeros(1 << 20, np.float32)), 1 << 20)
    assert zeros.dtype == np.float32 and not zeros.any()


def test_hostile_float_blocks_are_rejected():
    for raw, match in ((bytes([3]), "form 3"), (bytes([2]) + struct.pack("<hB", 500, 1) + b"\0", "grid of step"),
                       (bytes([2]) + struct.pack("<hB", 0, 41) + bytes(6), "grid of step"),
                       (bytes([2]) + struct.pack("<hB", 0, 8), "needs"), (bytes([0, 0, 0]), "needs"),
                       # 2**25 + 1 has 26 significant bits: no float32
                       (bytes([2]) + struct.pack("<hB", 0, 32) + struct.pack(">I", 2 * (2 ** 25 + 1)), "cannot hold"),
                       (bytes([2]) + struct.pack("<hB", -200, 2) + bytes([0b10000000]), "cannot hold")):  # 2**-200
        with pytest.raises(ValueError, match=match):
            read_float_block(raw, 1)
    with pytest.raises(ValueError, match="sums past"):  # 2**23 codes of 40 bits could wrap int64 running sums
        read_float_block(bytes([2]) + struct.pack("<hB", 0, 40), 2 ** 23)


def test_gridded_codebooks_and_tables_take_a_few_bits_a_value():
    state, args, quantized = quantized_state("lenet_300_100", SMALL, clusters=32)
    plain, plain_report = round_trip(shared_biases(state), args, quantized)
    for key in [k for k in state if k.endswith((".codebook", ".bias"))]:
        state[key] = torch.sort(state[key]).values if key.endswith("codebook") else state[key]
        quantize.round_to_grid(state[key], 8)
    blob, report = round_trip(state, args, quantized)
    rows = {r["name"]: r for r in report["layers"]}
    for layer in quantized:  # 32 sorted centroids of 8 bits: 4 bytes of grid, then a few bits each
        assert rows[layer]["codebook_bytes"] <= 4 + 32 * 9 / 8 < 4 * 32
    # an older reader cannot read a float block: the version-7 layout holds the same tensors
    decoded, _ = dcfile.decode_bytes(as_version7(blob))
    assert_bit_equal(state, decoded)
    assert len(as_version7(blob)) > len(blob)


def test_header_dictionary():
    state, args, quantized = quantized_state("lenet_300_100", MNIST)
    blob, report = dcfile.encode_model(state, args, quantized, info=dict(
        data=dict(dataset="mnist", subset=0, test_batch_size=1000), settings=dict(index_bits={"*": 0}, coder="ans")))
    header = sections(blob)[0][2]
    assert len(header) < 40  # 300 bytes of JSON, most of it in the dictionary
    with pytest.raises(zlib.error):  # without the dictionary, inflate cannot go on
        zlib.decompress(header)
    # a version-7 file's header is plain zlib, and still reads
    _, old_header = dcfile.decode_bytes(as_version7(blob))
    assert old_header == header_json(header)
    fails(rebuild(blob, {0: zlib.compress(json.dumps(header_json(header)).encode())}), "dictionary")
    fails(rebuild(blob, {0: dcfile._deflate_header(b"[]")}), "lacks the model")
    fails(rebuild(blob, {0: b"x"}), "dictionary")
