"""The research scripts under bench/: the sensitivity scan, the one-command pipeline with its
results table, and the figures."""
import copy
import hashlib
import json
import os
import sys

import pytest
import torch

import datasets
import training
import util
from conftest import ROOT
from datasets import DataSpec
from models import build_model
from prune import to_masked

sys.path.insert(0, os.path.join(ROOT, "bench"))
import pipeline  # noqa: E402
import levers  # noqa: E402
import plots  # noqa: E402
import results_table  # noqa: E402
import sensitivity  # noqa: E402

CPU = torch.device("cpu")


def test_sensitivity_scan_curves(fake_mnist):
    torch.manual_seed(0)
    train, val, _ = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 1000, 0.1, subset=400), CPU)
    net = to_masked(build_model("lenet_300_100"))
    training.fit(net, net.parameters(), train, val, 1, 1e-2, training.TrainOptions(weight_decay=0.0))
    before = copy.deepcopy(net.state_dict())
    curves, base = sensitivity.sensitivity_scan(net, val, [0.0, 0.5, 1.0, 4.0])
    assert list(curves) == ["fc1", "fc2", "fc3"]
    for rows in curves.values():
        assert rows[0]["alive"] == 1.0 and rows[0]["accuracy"] == base  # s = 0 prunes nothing
        alive = [r["alive"] for r in rows]
        assert alive == sorted(alive, reverse=True) and alive[-1] < 0.01  # 4 std: almost all pruned
    assert curves["fc1"][-1]["accuracy"] < base  # and that costs accuracy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the net is left as it was


def test_suggested_sensitivities_are_the_largest_within_tolerance():
    rows = lambda *accs: [dict(sensitivity=s, accuracy=a) for s, a in zip((0.0, 0.5, 1.0, 1.5), accs)]  # noqa: E731
    curves = {"a": rows(90, 89.5, 88.2, 80), "b": rows(90, 90, 89.9, 89.0), "c": rows(90, 85, 84, 83)}
    assert sensitivity.suggest(curves, 90.0, 2.0) == {"a": 1.0, "b": 1.5, "c": 0.0}
    assert sensitivity.suggest(curves, 90.0, 0.2) == {"a": 0.0, "b": 1.0, "c": 0.0}


def write_recipe(path, model, stages):
    """A recipe file: the model and {stage: settings}."""
    path.write_text(f"model = {model!r}\n" + "".join(f"{s} = {v!r}\n" for s, v in stages.items()))


def test_pipeline_seeds_results_table_and_plots(fake_mnist, tmp_path):
    tiny = dict(pruning=dict(subset=400, epochs=1, retrain_epochs=1, lr=0.01, sensitivity={"*": 1.0}),
                quantization=dict(bits={"*": 3}, bias_bits={"*": 2}, finetune_epochs=1), huffman_encode={})
    recipes = tmp_path / "config"
    recipes.mkdir()
    for name in ("lenet_300_100", "older"):
        write_recipe(recipes / f"{name}.py", "lenet_300_100", tiny)
    earlier = dict(recipe="older", seed=0, model="lenet5_caffe", params=431080, device="cpu", alive=3.0,
                   error=dict(dense=0.7, retrained=0.8, quantized=0.75, decoded=0.75), val_error=0.6, dense_bytes=1724320,
                   compressed_bytes=17243, ratio=100.0, epochs=50, minutes=20.0)
    (tmp_path / "results.json").write_text(json.dumps(dict(runs=[earlier])))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.BEGIN}\nold table\n{results_table.END}\nrest\n")
    out = tmp_path / "results.json"
    util.run_stage(pipeline.main, pipeline.SETTINGS, [
        "--recipes=['lenet_300_100']", "--seeds=2", "--jobs=2", f"--data_root={fake_mnist}",
        f"--out_dir={tmp_path / 'runs'}", f"--readme={readme}", f"--out={out}", "--hardware=test machine",
        f"--recipe_dir={recipes}", f"--ship={tmp_path / 'dc'}"])
    results = json.loads(out.read_text())
    for r in results["runs"][:2]:
        assert r["compressed_bytes"] == os.path.getsize(os.path.join(r["folder"], "lenet_300_100.dc"))
        # the file ships beside the results, under its hash
        shipped = open(r["file"], "rb").read()
        assert r["file"] == str(tmp_path / "dc" / f"lenet_300_100-seed{r['seed']}.dc")
        assert shipped == open(os.path.join(r["folder"], "lenet_300_100.dc"), "rb").read()
        assert r["sha256"] == hashlib.sha256(shipped).hexdigest() and r["val_split"] == 0.1
        assert r["ratio"] == pytest.approx(r["dense_bytes"] / r["compressed_bytes"])
        assert set(r["stage_seconds"]) == {"pruning", "quantization", "huffman_encode"}
    row = results["rows"][0]
    assert row["seeds"] == 2 and row["epochs"] == 1 + 1 + 1
    assert row["error"]["decoded"] == pytest.approx(sum(r["error"]["decoded"] for r in results["runs"][:2]) / 2)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text
    assert "| lenet_300_100 (2 seeds) | 266,610 |" in text and "test machine" in text

    # A run of another recipe, made earlier, stays in the results and the table, after ours.
    assert [(r["recipe"], r["seed"]) for r in results["runs"]] == \
        [("lenet_300_100", 0), ("lenet_300_100", 1), ("older", 0)]
    assert "| older | 431,080 | 0.70% -> 0.80% -> 0.75% -> **0.75%** |" in text

    # Run again with reuse: nothing is retrained, a third seed would be; a changed recipe is not reused.
    log = os.path.join(results["runs"][0]["folder"], "stage.log")
    stamp = os.path.getmtime(log)
    util.run_stage(pipeline.main, pipeline.SETTINGS, [
        "--recipes=['lenet_300_100']", "--seeds=2", "--reuse=True", f"--out_dir={tmp_path / 'runs'}",
        "--readme=", f"--out={out}", f"--recipe_dir={recipes}", "--ship="])
    again = json.loads(out.read_text())
    assert [r.get("reused") for r in again["runs"][:2]] == [True, True] and os.path.getmtime(log) == stamp
    assert [r["ratio"] for r in again["runs"]] == [r["ratio"] for r in results["runs"]]
    recipe = util.read_recipe(recipes / "lenet_300_100.py")
    assert pipeline.stages_done(results["runs"][1]["folder"], recipe, 1) == 3
    assert pipeline.stages_done(results["runs"][1]["folder"], recipe, 0) == 0
    recipe["quantization"]["bits"] = {"*": 4}
    assert pipeline.stages_done(results["runs"][1]["folder"], recipe, 1) == 1  # stage 1 is kept, 2 and 3 rerun

    seed0 = results["runs"][0]["folder"]
    util.run_stage(plots.main, plots.SETTINGS, [f"--run={seed0}", f"--out={tmp_path / 'plots'}"])
    for name in ("lenet_300_100_weights.png", "lenet_300_100_bytes.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(os.path.join(seed0, "lenet_300_100_compressed.json")))
    groups = {g["group"]: g for g in plots.byte_groups(summary)}
    assert set(groups) == {"fc1", "fc2", "fc3", "biases", "header, version, end"}
    assert sum(g["bytes"] for g in groups.values()) == summary["compressed_bytes"]
    assert groups["fc1"]["params"] == 784 * 300 and groups["biases"]["params"] == 300 + 100 + 10
    assert "| **file** |" in (tmp_path / "plots" / "lenet_300_100_bytes.md").read_text()
    # validation beside test: each run's row carries the validation error it was chosen by
    assert all(0 <= r["val_error"] <= 100 for r in results["runs"][:2])
    assert "validation error" in text.splitlines()[2]


def test_byte_groups_of_a_residual_network():
    summary = dict(compressed_bytes=1000, ratio=10.0, layers=[
        dict(name="conv1", kind="quantized", nonzero=10, params=100, weight_bytes=5, index_bytes=6, bytes=30),
        dict(name="layer1.0.conv1", kind="quantized", nonzero=20, params=200, weight_bytes=7, index_bytes=8, bytes=40),
        dict(name="layer1.1.conv2", kind="quantized", nonzero=30, params=200, weight_bytes=9, index_bytes=9, bytes=50),
        dict(name="layer1.0.bn1.weight", kind="raw", params=16, bytes=70),
        dict(name="bn1.running_mean", kind="tabled", params=16, bytes=20),
        dict(name="fc.bias", kind="raw", params=10, bytes=45)])
    groups = {g["group"]: g for g in plots.byte_groups(summary)}
    assert groups["layer1"] == dict(group="layer1", nonzero=50, params=400, weight_bytes=16, index_bytes=17, bytes=90)
    assert groups["batch-norm"]["bytes"] == 90 and groups["biases"]["bytes"] == 45
    assert groups["header, version, end"]["bytes"] == 1000 - 30 - 90 - 90 - 45


def test_pipeline_overrides_take_each_runs_seed(tmp_path):
    overrides = {"pruning": {"init_from": "runs/a/seed{seed}/lenet5_caffe_initial.pt", "restart_epochs": 0}}
    cfg = dict(out_dir=str(tmp_path), recipe_dir="config", data_root="data")
    for seed in (0, 2):
        folder, argv = pipeline.commands("lenet5_caffe", seed, cfg, overrides)
        assert f"--init_from=runs/a/seed{seed}/lenet5_caffe_initial.pt" in argv[0]
        assert "--restart_epochs=0" in argv[0] and not any("init_from" in a for a in argv[1])
    recipe = dict(pruning=dict(model="lenet5_caffe"), quantization={}, huffman_encode={})
    summary = dict(settings=dict(model="lenet5_caffe", seed=2, restart_epochs=0,
                                 init_from="runs/a/seed2/lenet5_caffe_initial.pt"))
    (tmp_path / "lenet5_caffe_pruned.json").write_text(json.dumps(summary))
    assert pipeline.stages_done(str(tmp_path), recipe, 2, overrides) == 1  # its own seed's dense network
    summary["settings"].update(seed=1, init_from="runs/a/seed1/lenet5_caffe_initial.pt")
    (tmp_path / "lenet5_caffe_pruned.json").write_text(json.dumps(summary))
    assert pipeline.stages_done(str(tmp_path), recipe, 2, overrides) == 0


def test_pipeline_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_:
        util.run_stage(pipeline.main, pipeline.SETTINGS, ["--recipes=['vgg']"])
    assert exit_.value.code == 2
    assert "no recipe ['vgg'] in config; choose from lenet_300_100" in capsys.readouterr().err


def test_levers_choose_on_validation_never_on_test():
    run = lambda label, val, test, ratio: dict(label=label, val_error=val, error=dict(decoded=test), ratio=ratio)  # noqa: E731
    runs = [run("a", 1.20, 1.50, 80.0), run("b", 1.29, 1.10, 95.0), run("c", 1.35, 1.00, 120.0)]
    # c has the best test error and ratio, but its validation error is over the budget
    assert levers.select(runs, 1.30)["label"] == "b"
    assert levers.select(runs, 1.40)["label"] == "c"
    assert levers.select(runs, 1.00)["label"] == "a"  # none within: the lowest validation error
    swapped = [dict(r, error=dict(decoded=5.0)) for r in runs]  # test error changes nothing
    assert [levers.select(x, 1.30)["label"] for x in (runs, swapped)] == ["b", "b"]


def test_levers_rounds_build_on_the_best_run(fake_mnist, tmp_path, monkeypatch):
    recipes = tmp_path / "config"
    recipes.mkdir()
    write_recipe(recipes / "tiny.py", "lenet_300_100", dict(
        pruning=dict(subset=300, epochs=1, retrain_epochs=1, sensitivity={"*": 0.5}),
        quantization=dict(bits={"*": 3}, finetune_epochs=0), huffman_encode={}))
    monkeypatch.setitem(levers.LEVERS, "tiny", dict(budget=100.0, rounds=[
        {"prune harder": dict(pruning=dict(sensitivity={"*": 1.5}))},
        {"2-bit": dict(quantization=dict(bits={"*": 2}))}]))
    doc = tmp_path / "experiments.md"
    doc.write_text("<!-- levers:tiny:begin -->\n<!-- levers:tiny:end -->\n")
    out = tmp_path / "levers.json"
    util.run_stage(levers.main, levers.SETTINGS, [
        "--recipe=tiny", f"--recipe_dir={recipes}", f"--data_root={fake_mnist}", f"--out_dir={tmp_path / 'runs'}",
        f"--doc={doc}", f"--out={out}", "--jobs=1"])
    result = json.loads(out.read_text())
    base, harder, two_bit = result["runs"]
    # any run is within a 100% budget, so each round keeps the smaller file
    assert harder["ratio"] > base["ratio"] and two_bit["ratio"] > harder["ratio"]
    assert result["chosen"] == "2-bit"
    assert result["overrides"] == {"pruning": {"sensitivity": {"*": 1.5}}, "quantization": {"bits": {"*": 2}}}
    # the 2-bit run quantized the "prune harder" network; that one pruned the recipe's dense network
    pruned = json.load(open(os.path.join(two_bit["folder"], "lenet_300_100_pruned.json")))
    assert pruned["settings"]["init_from"] == os.path.join(base["folder"], "lenet_300_100_initial.pt")
    assert pruned["params"]["nonzero"] == json.load(open(os.path.join(
        harder["folder"], "lenet_300_100_pruned.json")))["params"]["nonzero"]
    assert "| 2: **2-bit** |" in doc.read_text()
    table = doc.read_text()
    doc.write_text("<!-- levers:tiny:begin -->\n<!-- levers:tiny:end -->\n")
    util.run_stage(levers.main, levers.SETTINGS, ["--recipe=tiny", "--render=True", f"--doc={doc}", f"--out={out}"])
    assert doc.read_text() == table  # the table is rebuilt from the recorded runs alone


def test_recipe_time_runs_the_recipe_short_and_scales_each_phase(fake_mnist, tmp_path):
    import recipe_time
    recipes = tmp_path / "config"
    recipes.mkdir()
    write_recipe(recipes / "lenet_300_100.py", "lenet_300_100", dict(
        pruning=dict(subset=400, epochs=3, retrain_epochs=4, lr=0.01, sensitivity={"*": 1.0}),
        quantization=dict(bits={"*": 3}, bias_bits={"*": 2}, finetune_epochs=3), huffman_encode={}))
    out = tmp_path / "time.json"
    util.run_stage(recipe_time.main, recipe_time.SETTINGS, [
        "--recipe=lenet_300_100", f"--recipe_dir={recipes}", f"--data_root={fake_mnist}", "--short=1",
        f"--out_dir={tmp_path / 'run'}", f"--out={out}", "--threads=1"])
    r = json.loads(out.read_text())
    assert set(r["phases"]) == {"dense", "retraining", "fine-tuning"}  # the recipe has no warm restart
    assert [(p["epochs_run"], p["recipe_epochs"]) for p in r["phases"].values()] == [(1, 3), (1, 4), (1, 3)]
    pruned = json.loads((tmp_path / "run" / "lenet_300_100_pruned.json").read_text())
    assert len(pruned["history"]["train"]) == 1 and len(pruned["history"]["retrain1"]) == 1  # really cut short
    rest = sum((p["recipe_epochs"] - p["epochs_run"]) * p["last_epoch_seconds"] for p in r["phases"].values())
    assert r["minutes"] * 60 == pytest.approx(sum(r["stage_seconds"].values()) + rest)
    assert set(r["stage_seconds"]) == {"pruning", "quantization", "huffman_encode"} and r["machine"]["cpu"]


def test_inference_benchmark_times_whole_networks(tmp_path):
    """bench/bench_inference.py on a small random-mask ResNet-20: every side timed at each
    batch, each layer's form recorded, the sparse runtime's outputs the dense export's."""
    import subprocess
    out = tmp_path / "inference_test_threads2.json"
    net = {"resnet20": [{"in_shape": [3, 12, 12], "num_classes": 10}, 0.2]}
    subprocess.run([sys.executable, "bench/bench_inference.py", "--paper_layers=False", "--files=[]",
                    f"--networks={net!r}", "--model_batches=[1, 3]", "--warmup=0", "--repeats=1", "--runs=1",
                    "--threads=2", f"--out={out}", "--readme=", "--doc="], cwd=ROOT, check=True, capture_output=True,
                   text=True)
    result = json.loads(out.read_text())
    (entry,) = result["networks"].values()
    assert 0.15 < entry["density"] < 0.25 and set(entry["batches"]) == {"1", "3"}
    for row in entry["batches"].values():
        assert all(row[side] > 0 for side in ("dense", "dense_folded", "sparse"))
        assert row["error"] < 1e-5 and len(row["forms"]) == 20  # 19 convs and the fc layer
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_inference
    table = bench_inference.networks_block(bench_inference.recorded(str(tmp_path)))
    assert table.count("| resnet20 at 20% (random masks) |") == 2  # a row a batch
