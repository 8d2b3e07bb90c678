"""The CIFAR ResNets (He et al. 2016 section 4.2), bf16 training and batch-norm folding: unit
tests on small tensors, and the three stages plus --decode on ResNet-20 as a user runs them."""
import json

import pytest
import torch
import torch.nn as nn

import datasets
import prune
import quantize
import training
import util
from datasets import DataSpec
from conftest import run_script
from models import _BasicBlockA, build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,count,blocks", [("resnet20", 269_722, 3), ("resnet56", 853_018, 9)])
def test_cifar_resnet_parameter_counts(name, count, blocks):
    net = build_model(name)
    assert sum(p.numel() for p in net.parameters()) == count
    assert len(net.layer1) == len(net.layer2) == len(net.layer3) == blocks
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    masked = prune.masked_layers(net)
    assert len(masked) == 6 * blocks + 2  # every conv (no 1x1 shortcut convs: option A) and the fc
    assert all(type(m) not in (nn.Conv2d, nn.Linear) for m in net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 6 * blocks + 1


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = _BasicBlockA(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])  # the 16 channels in the middle
    assert not s[:, :8].any() and not s[:, 24:].any()  # 8 zero channels on each side
    assert block(x).shape == (2, 32, 4, 4)
    assert sum(p.numel() for p in block.parameters()) == 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32  # no shortcut weights
    same = _BasicBlockA(16, 16, stride=1)
    assert same.shortcut(x) is x


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert util.resolve_precision("fp32", cpu) == "fp32" and util.resolve_precision("bf16", cpu) == "bf16"
    assert util.resolve_precision("auto", cpu) == ("bf16" if util.cpu_has_fast_bf16() else "fp32")
    with pytest.raises(util.UserError, match="unknown precision 'fp16'"):
        util.resolve_precision("fp16", cpu)


def test_bf16_training_keeps_pruned_weights_zero_and_state_float32(fake_cifar, tmp_path):
    torch.manual_seed(0)
    train, val, _ = datasets.load_data(DataSpec("cifar10", fake_cifar, 32, 50, 0.2), CPU)
    net = build_model("resnet20")
    prune.prune_by_std(net, 1.0)
    masks = {n: m.mask.clone() for n, m in prune.masked_layers(net)}
    before = {n: m.weight.detach().clone() for n, m in prune.masked_layers(net)}
    training.fit(net, net.parameters(), train, val, 1, 0.05, training.TrainOptions(optimizer="sgd", weight_decay=5e-4, precision="bf16"))
    for name, m in prune.masked_layers(net):
        dead = masks[name] == 0
        assert (m.weight[dead] == 0).all(), name
        assert torch.equal(m.mask, masks[name])
        assert not torch.equal(m.weight[~dead], before[name][~dead])
    # trained in channels_last; the checkpoint is contiguous float32 all the same
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    path = str(tmp_path / "r.pt")
    util.save_checkpoint(path, "pruned", net, dict(name="resnet20", kwargs={}), {}, {})
    state = util.load_checkpoint(path, "pruned", torch.device("cpu"), "")["state_dict"]
    for k, v in state.items():
        assert v.is_contiguous(), k
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32), k


def test_fold_batch_norm_keeps_the_function():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    x = torch.randn(4, 8, 5, 5)
    before = bn(x)
    quantize.fold_batch_norm(bn)
    assert not bn.running_mean.any() and (bn.running_var == 1 - bn.eps).all()
    assert torch.allclose(bn(x), before, rtol=1e-5, atol=1e-6)


def test_round_to_half_known_answer():
    t = torch.tensor([1 / 3, -2.0, 65504.0, 1e-8, 0.1])
    quantize.round_to_half(t)
    assert t.dtype == torch.float32
    # 1/3 and 0.1 to the nearest float16 (11 significant bits); 1e-8 underflows to 0
    assert t.tolist() == [0.333251953125, -2.0, 65504.0, 0.0, 0.0999755859375]
    with pytest.raises(ValueError, match="overflow float16"):
        quantize.round_to_half(torch.tensor([1.0, 7e4]))


def test_share_values_uses_at_most_2_to_the_bits_values():
    t = torch.randn(64)
    assert quantize.share_values(t, 3) <= 8
    assert len(t.unique()) <= 8


def test_relative_sharing_keeps_small_values_apart():
    # folded batch-norm scales span decades: evenly spaced centroids merge all the small ones
    values = torch.logspace(-2, 2.3, 200)
    linear, relative = values.clone(), values.clone()
    quantize.share_values(linear, 4)
    assert quantize.share_values(relative, 4, relative=True) <= 16 and len(relative.unique()) <= 16
    error = lambda v: ((v - values).abs() / values).max()  # noqa: E731
    assert error(relative) < 0.5 < 10 < error(linear)  # neighbours 1.9x apart, against the small ones all merged


def test_share_values_across_tensors_uses_one_table():
    a, b = torch.tensor([0.0, 0.1, 10.0]), torch.tensor([[10.2, 0.2]])
    assert quantize.share_values([a, b], 1) == 2
    assert torch.allclose(a, torch.tensor([0.1, 0.1, 10.1])) and torch.allclose(b, torch.tensor([[10.1, 0.1]]))


def test_resnet20_stages_1_2_3_and_decode(fake_cifar, tmp_path):
    """The three stages and --decode on ResNet-20 in bf16, with a hundred images."""
    out = tmp_path / "out"
    common = [f"--data_root={fake_cifar}", f"--out_dir={out}", "--model=resnet20"]
    r = run_script("pruning.py", *common, "--dataset=cifar10", "--epochs=1", "--restart_epochs=1", "--retrain_epochs=1",
                   "--prune_method=dns", "--sensitivity=1.0", "--optimizer=sgd", "--lr=0.05", "--precision=bf16")
    assert r.returncode == 0, r.stderr
    assert "training precision bf16" in r.stdout and "recipe: config/resnet20.py" in r.stdout
    pruned = json.loads((out / "resnet20_pruned.json").read_text())
    assert pruned["dense"]["epochs"] == 2 and pruned["dense"]["restart_epochs"] == 1  # 1 + a warm restart of 1
    assert [h["epoch"] for h in pruned["history"]["restart"]] == [1]
    r = run_script("quantization.py", *common, "--finetune_epochs=1", "--bits={'conv': 4, 'fc': 5}",
                   "--precision=bf16")  # the recipe's bn_half
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "resnet20_quantized.json").read_text())
    assert "bn_folded" in summary["accuracy"] and summary["accuracy"]["quantized"] == summary["accuracy"]["bn_folded"]
    ckpt = util.load_checkpoint(str(out / "resnet20_quantized.pt"), "quantized", torch.device("cpu"), "")
    for k, v in ckpt["state_dict"].items():
        if k.endswith(("running_mean",)):
            assert not v.any(), k
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
    scales = torch.cat([v for k, v in ckpt["state_dict"].items() if k.endswith(("bn1.weight", "bn2.weight"))])
    assert torch.equal(scales.half().float(), scales) and len(scales.unique()) > 16  # float16 values, unclustered
    r = run_script("huffman_encode.py", *common)
    assert r.returncode == 0, r.stderr
    assert "bit for bit" in r.stdout
    c = json.loads((out / "resnet20_compressed.json").read_text())
    assert c["accuracy"]["decoded"] == c["accuracy"]["quantized"]
    # the scales, one section of 2 bytes a value (and its framing)
    assert any(r["kind"] == "shared" and len(r["members"]) == 19 and r["bytes"] < 2 * 688 + 20 for r in c["layers"])
    # dense bytes: the parameters and the batch-norm statistics, as float32
    norms = sum(m.num_features for m in build_model("resnet20").modules() if isinstance(m, nn.BatchNorm2d))
    assert c["dense_bytes"] == 4 * (269_722 + 2 * norms)
    r = run_script("huffman_encode.py", f"--decode={out / 'resnet20.dc'}", f"--data_root={fake_cifar}",
                   f"--out_dir={tmp_path / 'decoded'}")
    assert r.returncode == 0, r.stderr
    assert f"({c['accuracy']['decoded']:.2f}%)" in r.stdout
