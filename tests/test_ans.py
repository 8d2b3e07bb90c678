"""ans.py: the ANS context models, through 'A' sections of dcfile.py: round trips, known
answers of the neighbours models, corrupt sections."""
import struct

import numpy as np
import pytest
import torch

import ans
import dcfile
from conftest import (MNIST, as_version7, assert_bit_equal, codebook_end, fails, patch, quantized_state, rebuild,
                      round_trip, sections)


def ans_layer(mask, index, k):
    """A lenet_300_100 state whose fc1 has this mask and index (k clusters), fc2 and fc3 as made."""
    state, args, quantized = quantized_state("lenet_300_100", MNIST, density=0.05, clusters=k)
    state["fc1.mask"], state["fc1.index"] = mask.float(), (index * mask).to(torch.uint8)
    state["fc1.codebook"] = torch.linspace(-1, 1, k)
    return state, args, quantized


@pytest.mark.parametrize("case", ["empty", "one symbol", "skewed", "uniform", "rows and columns of own densities"])
def test_ans_round_trip(case):
    g = torch.Generator().manual_seed(5)
    shape, k = (300, 784), 8
    if case == "empty":
        mask, index = torch.zeros(shape), torch.zeros(shape, dtype=torch.long)
    elif case == "one symbol":
        mask, index = torch.rand(shape, generator=g) < 0.1, torch.full(shape, 3)
    elif case == "skewed":
        mask = torch.rand(shape, generator=g) < 0.02
        index = torch.where(torch.rand(shape, generator=g) < 0.9, 4, torch.randint(0, k, shape, generator=g))
    elif case == "uniform":
        mask, index = torch.rand(shape, generator=g) < 0.5, torch.randint(0, k, shape, generator=g)
    else:  # a pruned layer's shape: busy neurons and inputs, quiet ones and dead ones
        rows, cols = torch.rand(shape[0], 1, generator=g) ** 3, torch.rand(1, shape[1], generator=g) ** 3
        mask = torch.rand(shape, generator=g) < 0.8 * rows * cols
        index = torch.randint(0, k, shape, generator=g)
    state, args, quantized = ans_layer(mask, index, k)
    blob, report = round_trip(state, args, quantized)
    ans_blob, ans_report = dcfile.encode_model(state, args, quantized, coder="ans")
    decoded, _ = dcfile.decode_bytes(ans_blob)
    assert_bit_equal(state, decoded)
    assert len(ans_blob) <= len(blob)  # each layer keeps the smaller of its two sections
    fc1 = {r["name"]: r for r in ans_report["layers"]}["fc1"]
    if case in ("skewed", "rows and columns of own densities"):
        # Huffman spends a whole bit at least on each gap and cluster symbol; ANS does not
        assert fc1.get("coder") == "ans" and fc1["bytes"] < 0.95 * {r["name"]: r for r in report["layers"]}["fc1"]["bytes"]


def flips_caught(blob, a, offsets, shape):
    """Flip bits of section 1's payload `a` at each offset (CRC made valid again) -> how many
    the decoder caught, each with one line; a flip the model cannot see decodes to other
    clusters, never to another shape."""
    caught = 0
    for offset in offsets:
        bad = bytearray(a)
        bad[offset] ^= 0x55
        try:
            state, _ = dcfile.decode_bytes(rebuild(blob, {1: bytes(bad)}))
        except dcfile.FormatError as e:
            assert "\n" not in str(e)
            caught += 1
        else:
            assert state["fc1.index"].shape == shape
    return caught


def test_corrupt_or_truncated_ans_sections_are_one_clear_error(monkeypatch):
    g = torch.Generator().manual_seed(6)
    rows, cols = torch.rand(300, 1, generator=g) ** 3, torch.rand(1, 784, generator=g) ** 3
    mask = torch.rand(300, 784, generator=g) < 0.8 * rows * cols
    state, args, quantized = ans_layer(mask, torch.randint(0, 8, (300, 784), generator=g), 8)
    blob, report = dcfile.encode_model(state, args, quantized, coder="ans")
    secs = sections(blob)
    assert secs[1][1] == "A"
    a = secs[1][2]
    nnz_at = codebook_end(a)
    fails(rebuild(blob, {1: a[:-4]}), "needs|ANS")  # truncated inside the cluster words
    fails(rebuild(blob, {1: a[:len(a) // 2]}), "needs|ANS|counts")
    fails(rebuild(blob, {1: patch(a, nnz_at, "<I", 300 * 784 + 1)}), "non-zeros in")
    assert report["layers"][0]["presence"] == "margins"
    fails(rebuild(blob, {1: patch(a, nnz_at, "<I", int(mask.sum()) + 1)}), "sum to")
    model_at = nnz_at + 4 + 4  # after the image h x w
    fails(rebuild(blob, {1: patch(a, model_at, "<B", 3)}), "unknown presence model 3")
    fails(rebuild(blob, {1: patch(a, model_at - 4, "<HH", 5, 5)}), "do not divide")
    fails(rebuild(blob, {1: patch(a, model_at - 4, "<HH", 0, 1)}), "do not divide")
    fails(rebuild(blob, {1: patch(a, 2, "<I", 7)}), "centroids where the header says")
    with monkeypatch.context() as m:  # the static cluster model: its model byte, then the frequencies
        m.setattr(ans, "CONTEXT_CLUSTERS", 1)
        static, static_report = dcfile.encode_model(state, args, quantized, coder="ans")
    row, s = static_report["layers"][0], sections(static)[1][2]
    assert row["clusters_model"] == "static"
    fails(rebuild(static, {1: patch(s, len(s) - row["weight_bytes"] + 1, "16s", bytes(16))}),
          "no cluster has a frequency")
    # flipped bits inside the ANS words (CRC made valid again): caught by the decoder's checks
    assert flips_caught(blob, a, range(len(a) - 200, len(a), 13), state["fc1.index"].shape) > 0
    fails(as_version7(blob, 4), "kind 'A'")  # no 'A' before version 5
    # a hostile header can make a layer empty (a zero in_shape); its 'A' section is refused
    with pytest.raises(ValueError, match="has no elements"):
        dcfile._read_ans(dcfile._Reader(a), "fc1", (300, 0), 8)


def receptive_fields(rows, seed):
    """fc1 of an MNIST LeNet-300-100 as pruning leaves it, made by hand: each live neuron keeps
    about half the pixels of one disc of the 28 x 28 image, positive weights inside a smaller
    disc, negative around it (centre-surround); a third of the neurons and the image's border
    dead. -> (mask (rows, 784) bool, index (rows, 784) long into 8 clusters, -1..1)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = 6 + 16 * torch.rand(rows, 2, generator=g)
    radius = 3 + 3 * torch.rand(rows, 1, 1, generator=g)
    d = ((y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2).sqrt()
    mask = (d < radius) & (torch.rand(rows, 28, 28, generator=g) < 0.5) & (torch.rand(rows, 1, 1, generator=g) < 0.67)
    positive = d < radius / 2
    index = torch.where(positive, torch.randint(4, 8, mask.shape, generator=g), torch.randint(0, 4, mask.shape, generator=g))
    return mask.reshape(rows, 784), index.reshape(rows, 784)


def test_neighbours_models_known_answers():
    # a (2, 2, 3) image: columns 0..5 channel 0, 6..11 channel 1; 12 = no neighbour
    nb = ans.neighbours(12, 2, 3)
    none = 12
    assert nb[:, 4].tolist() == [3, 1, 0, 2]          # y=1, x=1: left, up, up-left, up-right
    assert nb[:, 0].tolist() == [none] * 4            # a channel's first place has none
    assert nb[:, 6].tolist() == [none] * 4            # channel 1 does not see channel 0
    assert nb[:, 5].tolist() == [4, 2, 1, none]       # the right edge has no up-right
    # adaptive counts: the first column has no data (p = 1/2); after a column of 1, 1, 0 in
    # context 0 (no live neighbour), the next column's context-0 rows see p = 2.5 / 4
    got = []
    bits = {0: np.array([1, 1, 0], bool), 1: np.array([0, 0, 1], bool)}
    ans.neighbour_presence(3, 2, [0, 1], ans.neighbours(2, 1, 2), lambda j, p: got.append(p) or bits[j])
    assert got[0].tolist() == [0.5] * 3
    assert got[1][2] == pytest.approx(2.5 / 4)       # row 2: its left neighbour is absent
    assert got[1][0] == pytest.approx(0.5)           # rows 0, 1: context 1 (left present), unseen
    # clusters: a context (left, up sign) starts from the prior, then counts what it saw
    present = np.zeros((2, 3), bool)
    present[:, :2] = True
    seen = []
    ans.neighbour_clusters(present, np.array([-1.0, 1.0]), [0, 1], ans.neighbours(2, 1, 2),
                               lambda j, rows, q: seen.append(q) or np.array([1, 1]))
    assert seen[0].tolist() == [[0.5, 0.5]] * 2
    assert seen[1][0].tolist() == [0.5, 0.5]          # context: left neighbour non-negative, unseen yet


@pytest.mark.parametrize("k", [1, 8])
def test_neighbours_models_code_receptive_fields(k):
    mask, index = receptive_fields(300, seed=7)
    state, args, quantized = ans_layer(mask, index if k > 1 else torch.zeros_like(index), k)
    huff, huff_report = round_trip(state, args, quantized)
    blob, report = dcfile.encode_model(state, args, quantized, coder="ans")
    decoded, _ = dcfile.decode_bytes(blob)
    assert_bit_equal(state, decoded)
    fc1 = {r["name"]: r for r in report["layers"]}["fc1"]
    assert fc1["presence"] == "neighbours" and fc1["image"] == [28, 28]  # the image, not a sequence
    if k > 1:
        assert fc1["clusters_model"] == "neighbours"
    # half the pixels of a disc at random: about a bit a place inside it, which Huffman's gaps
    # spend too; the saving is what the neighbours tell (0.90 of Huffman's bytes when written)
    assert fc1["bytes"] < 0.93 * {r["name"]: r for r in huff_report["layers"]}["fc1"]["bytes"]


def test_corrupt_neighbours_sections_are_one_clear_error():
    mask, index = receptive_fields(300, seed=8)
    state, args, quantized = ans_layer(mask, index, 8)
    blob, report = dcfile.encode_model(state, args, quantized, coder="ans")
    a = sections(blob)[1][2]
    assert sections(blob)[1][1] == "A" and report["layers"][0]["presence"] == "neighbours"
    model_at = codebook_end(a) + 4 + 4
    live_rows, live_cols = struct.unpack_from("<II", a, model_at + 1)
    fails(rebuild(blob, {1: patch(a, model_at + 1, "<I", 301)}), "live rows")
    fails(rebuild(blob, {1: patch(a, model_at + 1, "<I", live_rows - 1)}), "flags mark")
    fails(rebuild(blob, {1: patch(a, model_at + 5, "<I", live_cols + 1)}), "flags mark")
    fails(rebuild(blob, {1: patch(a, codebook_end(a), "<I", int(mask.sum()) + 1)}), "non-zeros|live rows")
    words = struct.unpack_from("<I", a, model_at + 9)[0]
    cluster_model_at = model_at + 13 + 4 * words
    assert a[cluster_model_at] == 1
    fails(rebuild(blob, {1: patch(a, cluster_model_at, "<B", 2)}), "unknown cluster model 2")
    fails(rebuild(blob, {1: a[:-4]}), "needs|ANS")
    fails(rebuild(blob, {1: a[:model_at + 40]}), "needs|ANS")
    assert flips_caught(blob, a, range(model_at + 13, len(a), 37), state["fc1.index"].shape) > 0
    fails(as_version7(blob, 6), "section 1")  # a version-6 reader's 'A' has no image


def test_more_centroids_than_the_cluster_contexts_take_are_coded_static(monkeypatch):
    """Above ans.CONTEXT_CLUSTERS centroids the encoder codes clusters with the static model; a
    file that names the neighbours model for them (another encoder's) still decodes, its
    probabilities computed a few rows at a time (CONTEXT_CELLS): the same bytes either way."""
    k = ans.CONTEXT_CLUSTERS + 44
    mask, index = receptive_fields(300, seed=9)
    state, args, quantized = quantized_state("lenet_300_100", MNIST, density=0.05, clusters=k)
    state["fc1.mask"], state["fc1.index"] = mask.float(), (index * 37 % k * mask).to(torch.int16)
    blob, report = dcfile.encode_model(state, args, quantized, coder="ans")
    decoded, _ = dcfile.decode_bytes(blob)
    assert_bit_equal(state, decoded)
    assert {r["name"]: r for r in report["layers"]}["fc1"]["clusters_model"] == "static"
    monkeypatch.setattr(ans, "CONTEXT_CLUSTERS", 2 ** 16)
    # and the static words and the Huffman section made long, so that the neighbours words are kept
    monkeypatch.setattr(ans, "static_model", lambda freqs, real=ans.static_model: real(np.ones_like(freqs)))
    monkeypatch.setattr(dcfile, "_quantized_payload", lambda *a, real=dcfile._quantized_payload: (
        real(*a)[0] + bytes(10 ** 6), real(*a)[1]))
    blob, report = dcfile.encode_model(state, args, quantized, coder="ans")
    assert {r["name"]: r for r in report["layers"]}["fc1"]["clusters_model"] == "neighbours"
    monkeypatch.setattr(ans, "CONTEXT_CELLS", 3 * k)  # three rows a run
    assert dcfile.encode_model(state, args, quantized, coder="ans")[0] == blob
    decoded, _ = dcfile.decode_bytes(blob)
    assert_bit_equal(state, decoded)
