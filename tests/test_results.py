"""The shipped results: bench/verify.py on the committed .dc files, the faults it must catch,
and the generated blocks of the README and docs/experiments.md against their scripts' output."""
import glob
import json
import os
import re
import shutil
import sys

import pytest

from conftest import ROOT, SHARED_DATA

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_inference  # noqa: E402
import coders  # noqa: E402
import context_models  # noqa: E402
import levers  # noqa: E402
import peer_nncodec  # noqa: E402
import recode  # noqa: E402
import results_table  # noqa: E402
import util  # noqa: E402
import verify  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "results.json")
SHIPPED = [r for r in json.load(open(RESULTS))["runs"] if "file" in r]


def run_verify(capsys, *args):
    """bench/verify.py in this process -> (exit code, stdout, stderr)."""
    code = 0
    try:
        util.run_stage(verify.main, verify.SETTINGS, list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_shipped_file_verifies(capsys):
    """Every committed file decodes to its row: on the real test and validation sets where
    ../shared/data holds them (MNIST and CIFAR-10), else its hash, bytes and ratio."""
    assert SHIPPED, "results.json ships no file"
    have = {"mnist": os.path.isdir(os.path.join(SHARED_DATA, "MNIST")),
            "cifar10": os.path.isdir(os.path.join(SHARED_DATA, "CIFAR10"))}
    retest = sorted({r["recipe"] for r in SHIPPED if have.get(r.get("dataset", "mnist"))})
    if retest:
        code, out, err = run_verify(capsys, f"--data_root={SHARED_DATA}", f"--recipes={retest!r}")
        assert code == 0, err
        assert out.count("| ok") == sum(r["recipe"] in retest for r in SHIPPED) and "re-tested" in out
    if len(retest) < len({r["recipe"] for r in SHIPPED}):
        code, out, err = run_verify(capsys, "--data_root=")
        assert code == 0, err
        assert out.count("| ok") == len(SHIPPED)


@pytest.fixture
def shipped_copy(tmp_path):
    """results.json and one shipped file copied to tmp_path, the run pointing at the copy."""
    results = json.load(open(RESULTS))
    run = next(r for r in results["runs"] if "file" in r)
    copy = tmp_path / os.path.basename(run["file"])
    shutil.copy(os.path.join(ROOT, run["file"]), copy)
    results["runs"] = [{**run, "file": str(copy)}]
    results["rows"] = verify.summarise(results["runs"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return path, copy, results


def test_verify_catches_a_changed_byte(shipped_copy, capsys):
    path, copy, _ = shipped_copy
    assert run_verify(capsys, f"--results={path}", "--readme=", "--data_root=")[0] == 0
    blob = bytearray(copy.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    copy.write_bytes(bytes(blob))
    code, out, err = run_verify(capsys, f"--results={path}", "--readme=", "--data_root=")
    assert code == 1 and "DIFFERS" in out
    assert "sha256" in err and "does not decode" in err and "CRC" in err


def test_verify_catches_a_changed_figure(shipped_copy, capsys, tmp_path):
    path, _, results = shipped_copy
    changed = json.loads(json.dumps(results))
    changed["runs"][0]["compressed_bytes"] += 1
    path.write_text(json.dumps(changed))
    code, _, err = run_verify(capsys, f"--results={path}", "--readme=", "--data_root=")
    assert code == 1 and re.search(r"bytes where results.json records", err)
    assert "where its runs give" in err  # the row's mean no longer follows from its runs
    # a README whose table is not the one results.json gives
    path.write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    text = results_table.table(results["rows"])
    readme.write_text(f"{results_table.BEGIN}\n{text.replace('|', '| ', 1)}\n{results_table.END}\n")
    code, _, err = run_verify(capsys, f"--results={path}", f"--readme={readme}", "--data_root=")
    assert code == 1 and "results table is not the one results.json gives" in err
    readme.write_text(f"{results_table.BEGIN}\n{text}\n{results_table.END}\n")
    assert run_verify(capsys, f"--results={path}", f"--readme={readme}", "--data_root=")[0] == 0


def test_recode_rewrites_a_file_smaller_and_its_figures(shipped_copy, capsys, tmp_path):
    """A file written with a section per tensor (as version 3 did): recode.py groups its biases
    into one section, checks the new file decodes to the same tensors, and writes its bytes,
    ratio and sha256; a file it would not shrink is kept; the README table follows."""
    import dcfile
    from conftest import SMALL, assert_bit_equal, quantized_state
    path, copy, results = shipped_copy
    state, args, quantized = quantized_state("lenet_300_100", SMALL, density=0.3)
    loose, _ = dcfile.encode_model(state, args, quantized, share_tables=False)
    copy.write_bytes(loose)
    run = {**results["runs"][0], "compressed_bytes": len(loose), "ratio": results["runs"][0]["dense_bytes"] / len(loose),
           "sha256": verify.sha256(str(copy))}
    path.write_text(json.dumps({**results, "runs": [run], "rows": verify.summarise([run])}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{results_table.BEGIN}\nold\n{results_table.END}\n")

    def run_recode(*args):
        util.run_stage(recode.main, recode.SETTINGS, [f"--results={path}", f"--readme={readme}", *args])
        return capsys.readouterr().out

    assert "recoded" in run_recode("--dry_run=True") and copy.read_bytes() == loose  # nothing written
    assert "recoded" in run_recode()
    new = copy.read_bytes()
    assert len(new) < len(loose)
    assert_bit_equal(dcfile.decode_bytes(loose)[0], dcfile.decode_bytes(new)[0])
    after = json.loads(path.read_text())
    assert after["runs"][0]["compressed_bytes"] == len(new) and after["runs"][0]["sha256"] == verify.sha256(str(copy))
    assert after["rows"] == verify.summarise(after["runs"])
    assert results_table.table(after["rows"]) in readme.read_text()
    assert run_verify(capsys, f"--results={path}", f"--readme={readme}", "--data_root=")[0] == 0
    assert "kept" in run_recode() and copy.read_bytes() == new  # already as small as it gets


def blocks(text):
    """{name: content} of every generated block `<!-- name:begin -->...<!-- name:end -->`."""
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- (\S+):begin -->\n(.*?)\n<!-- \1:end -->", text, re.S)}


def test_generated_blocks_are_what_their_scripts_write():
    readme = blocks(open(os.path.join(ROOT, "README.md")).read())
    doc = blocks(open(os.path.join(ROOT, "docs", "experiments.md")).read())
    assert set(readme) == {"results", "networks", "nncodec"}
    assert readme["results"] == results_table.table(json.load(open(RESULTS))["rows"])
    inference = bench_inference.recorded(os.path.join(ROOT, "bench", "results"))
    assert inference and readme["networks"] == bench_inference.networks_block(
        {k: r for k, r in inference.items() if r["networks"]})
    assert doc["inference"] == bench_inference.layers_block({k: r for k, r in inference.items() if r.get("paper_layers")})
    recorded = {os.path.basename(p)[len("levers_"):-len(".json")]: json.load(open(p))
                for p in glob.glob(os.path.join(ROOT, "bench", "results", "levers_*.json"))}
    assert set(doc) == {"coders", "context_models", "inference", "peer_nncodec"} | {f"levers:{name}" for name in recorded}
    assert doc["context_models"] == context_models.block(json.load(open(os.path.join(ROOT, "bench", "results",
                                                                                      "context_models.json"))))
    peer = json.load(open(os.path.join(ROOT, "bench", "results", "peer_nncodec.json")))
    assert doc["peer_nncodec"] == peer_nncodec.block(peer) and readme["nncodec"] == peer_nncodec.summary(peer["rows"])
    for name, done in recorded.items():
        assert doc[f"levers:{name}"] == levers.lever_table(done["runs"], done["chosen"], done["budget"]), name
    assert doc["coders"] == coders.block(json.load(open(os.path.join(ROOT, "bench", "results", "coders.json"))))
