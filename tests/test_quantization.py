"""Stage 2 end to end (quantization.py): the stage on a stage-1 run, shared biases, entropy
weight, distillation, TTQ, and its one-line errors."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

import datasets
import dcfile
import pruning
import quantization
import training
import util
from conftest import CPU, run_here, run_script
from datasets import DataSpec
from models import build_model
from prune import masked_layers, prune_by_percentile
from quantize import load_quantized
from test_quantize import check_quantized, code_entropy


@pytest.fixture(scope="module")
def stage1(fake_mnist, tmp_path_factory):
    """out_dir holding stage 1's lenet_300_100_pruned.pt, made by pruning.py's main."""
    out = str(tmp_path_factory.mktemp("stage1"))
    with contextlib.redirect_stdout(io.StringIO()):
        util.run_stage(pruning.main, pruning.SETTINGS, [
            "--model=lenet_300_100", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400", "--epochs=2",
            "--retrain_epochs=1", "--lr=0.01", "--retrain_lr=0.001", "--sensitivity=1.0", "--device=cpu"],
            stage="pruning")
    return out


def test_stage1_to_stage2_smoke(fake_mnist, stage1):
    r = run_script("quantization.py", f"--data_root={fake_mnist}", f"--out_dir={stage1}", "--finetune_epochs=1",
                   "--lr=0.001", "--bits=5", "--bias_bits=0")
    assert r.returncode == 0, r.stderr
    for line in ("--- Pruned and retrained (stage 1) ---", "--- After clustering (linear init) ---",
                 "--- After fine-tuning the centroids ---", "Accuracy: retrained "):
        assert line in r.stdout
    assert r.stdout.count("Test set: Average loss: ") == 4
    summary = json.loads(open(os.path.join(stage1, "lenet_300_100_quantized.json")).read())
    assert set(summary["accuracy"]) == set(summary["validation"]) == {"retrained", "clustered", "finetuned", "gridded",
                                                                      "quantized"}
    assert summary["accuracy"]["quantized"] == summary["accuracy"]["gridded"]
    assert [(l["name"], l["bits"], l["clusters"]) for l in summary["layers"]] == \
        [("fc1", 5, 32), ("fc2", 5, 32), ("fc3", 5, 32)]
    # centroids closer than the 8-bit grid's step share its value
    assert all(l["distinct"] <= 32 for l in summary["layers"])
    pruned = util.load_checkpoint(os.path.join(stage1, "lenet_300_100_pruned.pt"), "pruned", CPU, "")
    assert summary["accuracy"]["retrained"] == pytest.approx(pruned["metrics"]["accuracy"]["retrained"])
    assert summary["settings"]["pruning"] == pruned["settings"]

    net, ckpt = load_quantized(os.path.join(stage1, "lenet_300_100_quantized.pt"), CPU)
    assert ckpt["quantized"] == {n: dict(bits=5, clusters=32) for n in ("fc1", "fc2", "fc3")}
    assert ckpt["settings"]["pruning"] == pruned["settings"] and ckpt["model"] == pruned["model"]
    assert ckpt["metrics"]["pruning"]["accuracy"] == pruned["metrics"]["accuracy"]
    zeros = {n[:-len(".weight")]: v == 0 for n, v in pruned["state_dict"].items() if n.endswith(".weight")}
    check_quantized(net, {n: 5 for n in zeros}, zeros)
    for name, m in masked_layers(net):  # every codebook on a power-of-two grid, its largest |value| 8 bits
        e, n = dcfile._grid(m.codebook.detach().numpy())
        assert np.abs(n).max() <= 2 ** 8, name
    _, test = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 1000, 0.1, subset=400), CPU)[1:]
    loss, correct, total = training.evaluate(net, test)
    assert 100 * correct / total == pytest.approx(summary["accuracy"]["gridded"])


def test_shared_biases_have_at_most_2_to_the_bias_bits_values(fake_mnist, stage1, tmp_path, capsys):
    shutil.copy(os.path.join(stage1, "lenet_300_100_pruned.pt"), tmp_path)
    code, out, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}",
                              "--finetune_epochs=0", "--bias_bits={'*': 2, 'fc3': 0}", "--codebook_bits=0", capsys=capsys)
    assert code == 0, err
    assert "--- After sharing the biases ---" in out and "biases shared" in out
    net, ckpt = load_quantized(str(tmp_path / "lenet_300_100_quantized.pt"), CPU)
    pruned = util.load_checkpoint(str(tmp_path / "lenet_300_100_pruned.pt"), "pruned", CPU, "")["state_dict"]
    for name in ("fc1", "fc2"):
        distinct = torch.unique(net.state_dict()[f"{name}.bias"])
        assert len(distinct) <= 4 and ckpt["quantized"][name]["bias_bits"] == 2
        assert ckpt["quantized"][name]["bias_values"] == len(distinct)
        # each shared value is the mean of the biases it replaced (a k-means centroid)
        old, new = pruned[f"{name}.bias"], net.state_dict()[f"{name}.bias"]
        for v in distinct:
            assert v.item() == pytest.approx(old[new == v].mean().item(), abs=1e-6)
    assert torch.equal(net.fc3.bias, pruned["fc3.bias"]) and "bias_bits" not in ckpt["quantized"]["fc3"]
    summary = json.load(open(tmp_path / "lenet_300_100_quantized.json"))
    _, test = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 1000, 0.1, subset=400), CPU)[1:]
    assert 100 * training.evaluate(net, test)[1] / len(test.y) == pytest.approx(summary["accuracy"]["bias_shared"])


def test_entropy_weight_shortens_the_index_streams(fake_mnist, stage1, tmp_path, capsys):
    entropies = {}
    for weight in (0.0, 0.3):
        out = tmp_path / str(weight)
        out.mkdir()
        shutil.copy(os.path.join(stage1, "lenet_300_100_pruned.pt"), out)
        code, _, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={out}", "--finetune_epochs=0",
                                "--bits=4", f"--entropy_weight={{'*': {weight}, 'fc3': 0.0}}", capsys=capsys)
        assert code == 0, err
        net, ckpt = load_quantized(str(out / "lenet_300_100_quantized.pt"), CPU)
        pruned = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", CPU, "")["state_dict"]
        check_quantized(net, {"fc1": 4, "fc2": 4, "fc3": 4}, {n: pruned[f"{n}.weight"] == 0 for n in ("fc1", "fc2", "fc3")})
        entropies[weight] = {n: code_entropy(m.index[m.mask.bool()].long()) for n, m in masked_layers(net)}
    for name in ("fc1", "fc2"):
        assert entropies[0.3][name] < entropies[0.0][name] - 0.2, entropies
    assert entropies[0.3]["fc3"] == entropies[0.0]["fc3"]  # left at 0: plain k-means


def test_distillation_from_the_dense_network(fake_mnist, stage1, tmp_path, capsys):
    for name in ("lenet_300_100_pruned.pt", "lenet_300_100_initial.pt"):
        shutil.copy(os.path.join(stage1, name), tmp_path)
    code, _, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}", "--finetune_epochs=1",
                            "--distill=0.5", "--distill_temperature=2.0", capsys=capsys)
    assert code == 0, err
    summary = json.load(open(tmp_path / "lenet_300_100_quantized.json"))
    assert summary["settings"]["distill"] == 0.5 and len(summary["history"]["finetune"]) == 1
    net, _ = load_quantized(str(tmp_path / "lenet_300_100_quantized.pt"), CPU)
    pruned = util.load_checkpoint(str(tmp_path / "lenet_300_100_pruned.pt"), "pruned", CPU, "")["state_dict"]
    check_quantized(net, {"fc1": 3, "fc2": 3, "fc3": 4}, {n: pruned[f"{n}.weight"] == 0 for n in ("fc1", "fc2", "fc3")})


def write_bad_stage(out_dir):
    """A {model}_pruned.pt that is really stage 1's 'initial' checkpoint."""
    net = build_model("lenet_300_100")
    args = dict(name="lenet_300_100", kwargs=dict(in_shape=[1, 28, 28], num_classes=10))
    util.save_checkpoint(os.path.join(out_dir, "lenet_300_100_pruned.pt"), "initial", net, args, {}, {})


@pytest.mark.parametrize("args,message", [
    ([], "lenet_300_100_pruned.pt is a 'initial' checkpoint but this stage needs a 'pruned' one"),
    (["--model=lenet5"], "no checkpoint at {out}/lenet5_pruned.pt: run pruning.py --model=lenet5"),
    (["--bits=0"], "bits must be in 1..16"),
    (["--bits={'conv': 8, '*': 17}"], "bits must be in 1..16"),
    (["--entropy_weight={'*': -0.1}"], "entropy_weight must be >= 0"),
    (["--distill=1.5"], "distill must be in [0, 1]"),
    (["--teacher=snapshots"], "teacher=snapshots teaches through distillation: set --distill"),
    (["--teacher=best", "--distill=0.5"], "unknown teacher 'best'; choose dense or snapshots"),
    (["--distill=0.5"], "no checkpoint at {out}/lenet_300_100_initial.pt: distill needs stage 1's dense network"),
    (["--init=uniform"], "unknown init 'uniform'; choose one of linear, density, random, kmeans++"),
    (["--bits={'fc1': 4}"], "bits: no value for layer 'fc2' (add a '*' default)"),
    (["--finetune_epochs=-1"], "finetune_epochs must be >= 0"),
    (["--bias_bits=17"], "bias_bits must be 0 (float32 biases) or 1..16"),
    (["--bn_half=True", "--bn_bits=4"], "bn_half and bn_bits both store the batch-norms: set one"),
    (["--bn_half=True", "--fold_bn=False"], "bn_half rounds folded batch-norms: set --fold_bn=True"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, stage1, capsys, args, message):
    out = str(tmp_path)
    if args and args[0].startswith(("--bits={'fc1'", "--distill=0.5")):  # needs a real stage-1 checkpoint
        shutil.copy(os.path.join(stage1, "lenet_300_100_pruned.pt"), out)
    else:
        write_bad_stage(out)
    for suffix in ("_quantized.pt", "_quantized.json"):  # an earlier result must survive
        open(os.path.join(out, "lenet_300_100" + suffix), "w").write("earlier")
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit) as exit_info:
        util.run_stage(quantization.main, quantization.SETTINGS, [f"--out_dir={out}", "--device=cpu", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(out=out) in err[0]
    assert sorted(os.listdir(out)) == before
    assert open(os.path.join(out, "lenet_300_100_quantized.json")).read() == "earlier"


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    r = run_script("quantization.py", f"--out_dir={tmp_path}", "--bits=20", timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: bits must be in 1..16, got {'*': 20}"
    assert os.listdir(tmp_path) == []


def test_resnet18_quantizes_end_to_end(fake_mnist, tmp_path):
    # Stage 1's checkpoint is made directly (training ResNet-18 on the CPU is slow); stage 2
    # then runs whole: k-means on all 21 layers of the nested blocks, 2 fine-tuning batches.
    torch.manual_seed(0)
    kwargs = dict(in_shape=[1, 28, 28], num_classes=10, pretrained=False, cifar_stem=False)
    net = build_model("resnet18", **kwargs)
    prune_by_percentile(net, 60.0)
    stage1 = util.parse_settings(pruning.SETTINGS, ["--model=resnet18", "--subset=16", "--batch_size=8",
                                                    "--test_batch_size=16", "--val_split=0"])
    util.save_checkpoint(str(tmp_path / "resnet18_pruned.pt"), "pruned", net, dict(name="resnet18", kwargs=kwargs),
                         stage1, {"accuracy": {}})
    quantization.main(util.parse_settings(quantization.SETTINGS, [
        f"--data_root={fake_mnist}", f"--out_dir={tmp_path}", "--model=resnet18", "--device=cpu",
        "--finetune_epochs=1", "--fold_bn=False", "--bits={'conv': 8, '*': 5}"]))

    net, ckpt = load_quantized(str(tmp_path / "resnet18_quantized.pt"), CPU)
    bits = {n: q["bits"] for n, q in ckpt["quantized"].items()}
    assert len(bits) == 21 and bits["layer3.1.conv2"] == 8 and bits["layer2.0.downsample.0"] == 8 and bits["fc"] == 5
    pruned = util.load_checkpoint(str(tmp_path / "resnet18_pruned.pt"), "pruned", CPU, "")
    check_quantized(net, bits, {n: pruned["state_dict"][n + ".weight"] == 0 for n in bits})
    # batch-norm is trained with the centroids: its statistics follow the quantized weights
    assert not torch.equal(ckpt["state_dict"]["bn1.running_mean"], pruned["state_dict"]["bn1.running_mean"])
    summary = json.loads((tmp_path / "resnet18_quantized.json").read_text())
    assert all(l["distinct"] <= 2 ** l["bits"] and l["zeros_kept"] for l in summary["layers"])
    assert len(summary["history"]["finetune"]) == 1
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_ttq_from_the_dense_network_then_stage_3(fake_mnist, tmp_path, capsys):
    """method=ttq from stage 1's dense checkpoint: the inner layers hold at most 3 values, the
    first and last stay float32 and train, and stage 3 round-trips the result bit for bit."""
    code, out, err = run_here("pruning", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}",
                              "--subset=400", "--epochs=1", "--retrain_epochs=0", "--device=cpu", capsys=capsys)
    assert code == 0, err
    initial = util.load_checkpoint(str(tmp_path / "lenet5_initial.pt"), "initial", CPU, "")["state_dict"]
    code, out, err = run_here("quantization", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}",
                              "--source=initial", "--method=ttq", "--finetune_epochs=1", "--lr=1e-3",
                              "--ttq_threshold={'*': 0.05, 'fc1': 0.1}", capsys=capsys)
    assert code == 0, err
    assert "--- Dense (stage 1) ---" in out and "Accuracy: dense " in out
    net, ckpt = load_quantized(str(tmp_path / "lenet5_quantized.pt"), CPU)
    layers = dict(masked_layers(net))
    assert list(ckpt["quantized"]) == ["conv2", "conv3", "fc1"]  # conv1 and fc2: first and last, float32
    for name in ckpt["quantized"]:
        w = layers[name].weight.detach()
        assert len(w.unique()) <= 3 and 0 < (w == 0).float().mean() < 1
    for name in ("conv1", "fc2"):
        w = layers[name].weight
        assert w.dtype == torch.float32 and len(w.unique()) > 3 and not torch.equal(w, initial[name + ".weight"])
    code, out, err = run_here("huffman_encode", "--model=lenet5", f"--data_root={fake_mnist}",
                              f"--out_dir={tmp_path}", capsys=capsys)
    assert code == 0, err
    assert "all 18 tensors equal the quantized checkpoint's bit for bit" in out
    assert "(equal)" in out
