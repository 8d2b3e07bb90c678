"""bench/peer_nncodec.py without NNCodec: the signed ranks that hand our quantized weights to it,
the byte accounting and the choice of its QP."""
import os
import sys

import numpy as np
import pytest
import torch

import dcfile
import util
from conftest import ROOT, SMALL, quantized_state

sys.path.insert(0, os.path.join(ROOT, "bench"))
import peer_nncodec  # noqa: E402


def test_signed_ranks_known_answer_and_back():
    # sorted: -1.0 < -0.25 < 0.0 < 0.1 < 0.5, so clusters 0..4 have ranks 0, +2, -1, +1, -2
    codebook = np.array([0.0, 0.5, -0.25, 0.1, -1.0], np.float32)
    index = np.array([[0, 1, 2], [3, 4, 0]], np.uint8)
    mask = np.array([[0, 1, 1], [1, 1, 0]], np.float32)
    ranks, levels, m = peer_nncodec.signed_ranks(codebook, index, mask)
    assert ranks.dtype == np.int32 and ranks.tolist() == [[0, 2, -1], [1, -2, 0]]
    assert levels.dtype == np.float32 and levels.tolist() == pytest.approx([-1.0, -0.25, 0.0, 0.1, 0.5]) and m == 2
    back = peer_nncodec.weights_from_ranks(ranks, levels, m)
    assert np.array_equal(back, np.array([[0, 0.5, -0.25], [0.1, -1.0, 0]], np.float32))
    assert np.array_equal(back, peer_nncodec.layer_weights(codebook, index, mask))


def test_signed_ranks_without_a_zero_centroid_and_with_a_repeated_one():
    ranks, levels, m = peer_nncodec.signed_ranks(np.array([0.3, 0.1], np.float32), np.array([1, 0, 1]),
                                                 np.array([1, 1, 0], np.float32))
    assert ranks.tolist() == [1, 2, 0] and levels.tolist() == pytest.approx([0.0, 0.1, 0.3]) and m == 0
    # two clusters on one value (and a -0.0) are one level: the ranks stand for values
    codebook = np.array([0.0, 0.5, 0.5, -0.0, -2.0], np.float32)
    ranks, levels, m = peer_nncodec.signed_ranks(codebook, np.arange(5), np.ones(5, np.float32))
    assert ranks.tolist() == [0, 1, 1, 0, -1] and len(levels) == 3 and m == 1


def test_ranks_rebuild_a_quantized_state():
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.3, clusters=32, seed=3)
    layers = peer_nncodec.quantized_layers(state, quantized)
    ranks = peer_nncodec.ranks_of(layers)  # raises where a layer is not rebuilt exactly
    assert set(ranks) == set(quantized)
    for name, (codebook, index, mask) in layers.items():
        w = peer_nncodec.layer_weights(codebook, index, mask)
        assert np.array_equal(np.sign(ranks[name]), np.sign(w))  # 0 where pruned, signs kept
        assert np.abs(ranks[name]).max() <= len(codebook) - 1


def test_byte_accounting():
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.2, clusters=16, seed=1)
    blob, report = dcfile.encode_model(state, args, quantized)
    layers = peer_nncodec.section_bytes(report)
    assert list(layers) == list(quantized)
    others = sum(r["bytes"] for r in report["layers"] if r["kind"] != "quantized")
    assert sum(layers.values()) + others + report["header_bytes"] == len(blob)
    # each section holds its codebook: random float32 centroids, 4 bytes each at most (after a form byte)
    assert all(r["codebook_bytes"] <= 1 + 4 * 16 < r["bytes"] for r in report["layers"] if r["kind"] == "quantized")
    header = dict(model=args, quantized=quantized)
    for coder in dcfile.CODERS:
        got = peer_nncodec.ours(state, header, coder)
        assert got["bytes"] == sum(got["layers"].values()) and set(got["layers"]) == set(quantized)
    assert peer_nncodec.ours(state, header, "ans")["bytes"] <= peer_nncodec.ours(state, header, "huffman")["bytes"]
    # NNCodec is charged the codebook as our file stores it: float32, or small integers on a grid
    assert peer_nncodec.codebook_bytes([0.1, 0.2, 1 / 3]) == 1 + 3 * 4
    assert peer_nncodec.codebook_bytes([-0.5, -0.125, 0.125, 0.5]) == 1 + 3 + 2  # 4 codes of 3 bits


def test_lossless_figures_add_the_codebooks_and_name_the_smaller():
    answer = {"integer": dict(bitstream=100, layers={"a": 60, "b": 50}),
              "codebook": dict(bitstream=90, layers={"a": 55, "b": 45})}
    got = peer_nncodec.lossless_figures(answer, {"a": 16, "b": 8})
    assert (got["mode"], got["bytes"]) == ("codebook", 90 + 24)
    assert got["modes"]["integer"]["bytes"] == 124 and got["modes"]["codebook"]["layers"] == {"a": 71, "b": 53}


def test_a_failing_worker_is_reported(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'no module named nncodec' >&2\nexit 3\n")
    python.chmod(0o755)
    with pytest.raises(RuntimeError, match="exit 3.*no module named nncodec"):
        peer_nncodec.run_worker(dict(venv=str(tmp_path / "venv"), threads=1), str(tmp_path), [])
    assert (tmp_path / "jobs.json").read_text().strip() == "[]"


def test_rows_of_other_recipes_are_kept_in_the_results_order():
    runs = [dict(recipe=r, seed=s) for r, s in (("a", 0), ("a", 1), ("b", 0), ("c", 0))]
    earlier = dict(time="then", cpu="Intel", nncodec="2.1.3", settings=dict(threads=1),
                   rows=[dict(recipe="a", seed=0, bytes=1), dict(recipe="a", seed=1, bytes=2, measured="before"),
                         dict(recipe="b", seed=0, bytes=3), dict(recipe="gone", seed=0, bytes=9)])
    now = dict(measured="now", cpu="AMD", nncodec="2.1.3", threads=2)
    got = peer_nncodec.merge_rows([dict(recipe="c", seed=0, bytes=4), dict(recipe="b", seed=0, bytes=5)], now,
                                  earlier, runs)
    assert [(r["recipe"], r["bytes"], r["measured"], r["cpu"]) for r in got] == [
        ("a", 1, "then", "Intel"), ("a", 2, "before", "Intel"), ("b", 5, "now", "AMD"), ("c", 4, "now", "AMD")]
    assert all(set(peer_nncodec.PROVENANCE) <= set(r) for r in got)
    assert peer_nncodec.merge_rows([dict(recipe="a", seed=0)], now, None, runs) == [dict(recipe="a", seed=0, **now)]


def test_first_reaching_qp():
    sweep = [dict(qp=q, bytes=b) for q, b in ((-20, 100), (-22, 150), (-24, 200), (-26, 260))]
    accuracy = {-20: 97.0, -22: 98.5, -24: 98.9, -26: 99.0}
    seen = []

    def validation(entry):
        seen.append(entry["qp"])
        return accuracy[entry["qp"]]

    chosen, walked, reached = peer_nncodec.first_reaching(sweep, validation, 98.9)
    assert (chosen["qp"], reached, seen) == (-24, True, [-20, -22, -24])  # stops at the first reaching
    assert [e["validation"] for e in walked] == [97.0, 98.5, 98.9]
    chosen, walked, reached = peer_nncodec.first_reaching(sweep, lambda e: accuracy[e["qp"]], 99.5)
    assert (chosen["qp"], reached, len(walked)) == (-26, False, 4)  # none reaches: the best
    flat = peer_nncodec.first_reaching(sweep, lambda e: 50.0, 99.0)[0]
    assert flat["qp"] == -20  # a tie goes to fewer bytes


def test_pipeline_network_takes_decoded_weights(tmp_path):
    from models import build_model

    net = build_model("lenet_300_100", **SMALL)
    pruned = dict(model=dict(name="lenet_300_100", kwargs=SMALL), state_dict=net.state_dict())
    w = np.zeros(tuple(net.fc1.weight.shape), np.float32)
    w[0, :3] = [0.5, -0.25, 1.0]
    got = peer_nncodec.decoded_net(pruned, {"fc1": w})
    assert torch.equal(got.fc1.weight, torch.from_numpy(w)) and int(got.fc1.mask.sum()) == 3
    assert torch.equal(got.fc2.weight, net.fc2.weight) and not got.training


def test_missing_venv_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        util.run_stage(peer_nncodec.main, peer_nncodec.SETTINGS, ["--venv=no-such-venv"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--setup=True first" in err and err.count("\n") == 1


def test_table_marks_a_pipeline_that_does_not_reach_ours():
    row = dict(recipe="lenet_300_100", seed=0, ours=dict(huffman=dict(bytes=10552), ans=dict(bytes=8251)),
               nncodec_lossless=dict(bytes=9179, mode="integer"), ans_vs_nncodec=-10.11,
               accuracy=dict(validation=98.63, test=98.85),
               nncodec_pipeline=dict(qp=-22, bytes=8069, validation=98.53, test=98.68, reached=False,
                                     stage1_validation=98.47))
    lines = peer_nncodec.table([row, dict(row, nncodec_pipeline=None)]).splitlines()
    assert len(lines) == 4 and all(line.count("|") == 8 for line in lines)
    assert "| 10,552 | 8,251 | 9,179 (integer) | -10.1% | -22, 8,069, 98.53% / 98.68% (best: none reached ours; " \
           "stage 1 98.47%) | 98.63% / 98.85% |" in lines[2]
    assert "| -10.1% | - | 98.63%" in lines[3]


def test_summary_means_a_recipe_over_its_seeds():
    def row(recipe, seed, huffman, ans, lossless, pipeline):
        return dict(recipe=recipe, seed=seed, ours=dict(huffman=dict(bytes=huffman), ans=dict(bytes=ans)),
                    nncodec_lossless=dict(bytes=lossless),
                    nncodec_pipeline=pipeline and dict(bytes=pipeline[0], reached=pipeline[1]))
    rows = [row("a", 0, 120, 90, 100, (150, True)), row("a", 1, 140, 110, 100, (100, False)),
            row("b", 0, 10, 8, 8, None)]
    lines = peer_nncodec.summary(rows).splitlines()
    assert len(lines) == 4
    # a: ANS 100 against lossless 100; the pipeline only where it reached our accuracy (seed 0: 90 vs 150)
    assert lines[2] == "| a (2 seeds) | 130 | 100 | 100 | +0.0% | 150 (1 of 2 seeds) | -40.0% |"
    assert lines[3] == "| b | 10 | 8 | 8 | +0.0% | - | - |"
