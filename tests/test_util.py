"""util.py: the settings parser, the per-layer table, atomic files and checkpoints."""
import os
import re

import pytest
import torch
import torch.nn as nn

import prune
import util
from models import build_model
from prune import MaskedLinear


def test_layer_stats_count_the_mask():
    layer = MaskedLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.mask.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert util.layer_stats(nn.Sequential(layer))[0]["nonzero"] == 1


def test_table_format_matches_original_run():
    stats = util.layer_stats(build_model("lenet5"))
    table = util.layer_table(stats).splitlines()
    assert table[0] == "conv1.weight      | nonzeros =   150 /   150 (100.00%) | total_pruned =    0 | shape = (6, 1, 5, 5)"
    assert table[-1] == "alive: 167566, pruned : 0, total: 167566, Compression rate :    1.00x ( 0.00% pruned)"
    row = dict(name="fc1.weight", shape=[1024, 120], total=122880, nonzero=8747)
    rest = dict(name="rest", shape=[44686], total=167566 - 122880, nonzero=43681 - 8747)
    lines = util.layer_table([row, rest]).splitlines()
    assert lines[0] == "fc1.weight        | nonzeros =  8747 / 122880 ( 7.12%) | total_pruned = 114133 | shape = (1024, 120)"
    assert lines[-1] == "alive: 43681, pruned : 123885, total: 167566, Compression rate :    3.84x ( 73.93% pruned)"

DEFAULTS = dict(model="lenet5", lr=0.1, epochs=3, pretrained=False, sensitivity={"*": 1.0})


def test_overrides_parse_types():
    cfg = util.parse_settings(DEFAULTS, ["--model=resnet18", "--lr=1", "--epochs=5", "--pretrained=True",
                                         "--sensitivity=0.5"])
    assert cfg == dict(model="resnet18", lr=1.0, epochs=5, pretrained=True, sensitivity={"*": 0.5})
    assert type(cfg["lr"]) is float
    cfg = util.parse_settings(DEFAULTS, ["--sensitivity={'fc1': 2, '*': 0.25}"])
    assert cfg["sensitivity"] == {"fc1": 2.0, "*": 0.25}
    assert DEFAULTS["model"] == "lenet5"  # defaults untouched


@pytest.mark.parametrize("arg,message", [
    ("--modle=x", "unknown setting 'modle'; valid settings: model, lr, epochs"),
    ("--epochs=2.5", "setting epochs expects int"),
    ("--pretrained=1", "setting pretrained expects bool"),
    ("--lr=fast", "setting lr expects float"),
    ("--sensitivity={'*': 'high'}", "expects float"),
    ("--model=16", "setting model expects str, got 16 (int); quote it as a string, '16'"),
    ("epochs=2", "give settings as --key=value"),
])
def test_override_errors(arg, message):
    with pytest.raises(util.UserError, match=re.escape(message)):
        util.parse_settings(DEFAULTS, [arg])


def test_settings_from_takes_lowercase_literals_only():
    ns = {"lr": 0.1, "MODELS": {"a": 1}, "torch": torch, "_x": 1, "f": print, "bits": {"*": 5}}
    assert util.settings_from(ns) == {"lr": 0.1, "bits": {"*": 5}}


def test_written_files_keep_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        util.write_bytes(str(tmp_path / "a.dc"), b"x")
        util.write_json(str(tmp_path / "a.json"), {})
    finally:
        os.umask(old)
    for name in ("a.dc", "a.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644


def test_checkpoint_round_trip_and_stage_check(tmp_path):
    net = build_model("lenet5")
    prune.prune_by_std(net, 1.0)
    path = str(tmp_path / "c.pt")
    args = dict(name="lenet5", kwargs=dict(in_shape=[1, 28, 28], num_classes=10))
    util.save_checkpoint(path, "pruned", net, args, {"lr": 0.1}, {"accuracy": {"pruned": 1.0}})
    ckpt = util.load_checkpoint(path, "pruned", torch.device("cpu"), "run pruning.py")
    again = build_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"])
    again.load_state_dict(ckpt["state_dict"])
    for (n, a), b in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    assert ckpt["settings"] == {"lr": 0.1} and os.listdir(tmp_path) == ["c.pt"]  # no temp left
    with pytest.raises(util.UserError, match="is a 'pruned' checkpoint but this stage needs a 'quantized' one"):
        util.load_checkpoint(path, "quantized", torch.device("cpu"), "run pruning.py")
    with pytest.raises(util.UserError, match="no checkpoint at"):
        util.load_checkpoint(str(tmp_path / "none.pt"), "pruned", torch.device("cpu"), "run pruning.py")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(util.UserError, match="not a readable checkpoint"):
        util.load_checkpoint(str(tmp_path / "bad.pt"), "pruned", torch.device("cpu"), "run pruning.py")


# --- pruning.py as a user runs it -----------------------------------------------------------
