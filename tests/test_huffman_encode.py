"""Stage 3 end to end (huffman_encode.py): stages 1-2-3 and decoding from the command line."""
import json
import os

import pytest

import huffman_encode
import util
from conftest import run_script


def test_stages_1_2_3_and_decode(tmp_path, fake_mnist, capsys):
    out = str(tmp_path / "out")
    common = [f"--data_root={fake_mnist}", f"--out_dir={out}", "--device=cpu"]
    r = run_script("pruning.py", "--epochs=1", "--retrain_epochs=1", "--sensitivity=1.5", *common)
    assert r.returncode == 0, r.stderr
    r = run_script("quantization.py", "--finetune_epochs=1", "--bias_bits=3", *common)
    assert r.returncode == 0, r.stderr
    # shared biases on their 8-bit grid (codebook_bits): the checkpoint counts what is left
    ckpt = util.load_checkpoint(os.path.join(out, "lenet_300_100_quantized.pt"), "quantized", "cpu", "")
    for name in ("fc1", "fc2", "fc3"):
        assert ckpt["quantized"][name]["bias_values"] == len(ckpt["state_dict"][f"{name}.bias"].unique()) <= 8
    r = run_script("huffman_encode.py", *common)
    assert r.returncode == 0, r.stderr
    assert "equal the quantized checkpoint's bit for bit" in r.stdout
    summary = json.load(open(os.path.join(out, "lenet_300_100_compressed.json")))
    tables = {n for r in summary["layers"] for n in ([r["name"]] if r["kind"] == "tabled" else r.get("members", []))}
    assert {"fc1.bias", "fc2.bias"} <= tables  # shared biases: a table each, or one for all
    path = summary["compressed_file"]
    assert summary["compressed_bytes"] == os.path.getsize(path)
    assert summary["accuracy"]["decoded"] == summary["accuracy"]["quantized"]
    size = os.path.getsize(path)
    assert f"dense float32: {summary['dense_bytes']} bytes -> compressed file: {size} bytes" in r.stdout
    assert {"ratio", "layers", "encode_seconds", "decode_seconds"} <= set(summary)

    # Decoding the file alone (in this process: the subprocesses above cover the entry point).
    decode = [f"--decode={path}", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}"]
    util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, decode)
    assert f"({summary['accuracy']['decoded']:.2f}%)" in capsys.readouterr().out
    assert util.load_checkpoint(str(tmp_path / "lenet_300_100_decoded.pt"), "quantized", "cpu", "")

    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(path, "wb").write(blob)
    with pytest.raises(SystemExit) as e:  # a flipped bit: one line on stderr, exit code 2
        util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, decode)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CRC" in err and len(err.strip().splitlines()) == 1

    # The paper's coder, one setting away: Huffman sections only, never smaller than the default
    # (ANS), which keeps each layer's Huffman section where that is smaller.
    util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, common + ["--coder=huffman"])
    paper = json.load(open(os.path.join(out, "lenet_300_100_compressed.json")))
    assert paper["settings"]["coder"] == "huffman" and not any(r.get("coder") == "ans" for r in paper["layers"])
    assert paper["compressed_bytes"] >= summary["compressed_bytes"]
    assert paper["accuracy"]["decoded"] == summary["accuracy"]["decoded"]
