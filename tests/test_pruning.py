"""Stage 1: masked layers, pruning rules, models, util (settings, data, table, checkpoints),
and pruning.py run as a user runs it."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torchvision

import prune
import util
from conftest import SHARED_DATA, run_here, run_script
from models import Ensemble, build_model, teacher_from
from prune import MaskedConv2d, MaskedLinear, drop_dead_units, masked_layers


# --- threshold math on hand-made tensors ----------------------------------------------------

def test_std_threshold_known_answer():
    w = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    # unbiased std of {-2,-1,1,2} = sqrt(10/3)
    assert prune.std_threshold(w, torch.ones(4), 0.6) == pytest.approx(0.6 * (10 / 3) ** 0.5)
    # survivors only: std of {-2, 2} = sqrt(8) (the zeros already pruned do not count)
    assert prune.std_threshold(w, torch.tensor([1.0, 0, 0, 1]), 1.0) == pytest.approx(8 ** 0.5)


def test_prune_by_std_prunes_below_threshold_and_zeroes_weights():
    layer = MaskedLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-2.0, -1.0], [1.0, 2.0]]))
    net = nn.Sequential(layer)
    thresholds = prune.prune_by_std(net, 0.6, "all")  # 0.6 * 1.826 = 1.095 > 1
    assert list(thresholds) == ["0"]
    assert layer.mask.tolist() == [[1, 0], [0, 1]]
    assert layer.weight.tolist() == [[-2, 0], [0, 2]]
    prune.prune_by_std(net, 0.5, "all")  # survivors {-2, 2}: threshold 0.5 * 2.83 = 1.41 keeps both
    assert layer.mask.sum() == 2


def test_percentile_threshold_known_answer():
    w = torch.tensor([4.0, -1.0, 3.0, -2.0])
    assert prune.percentile_threshold(w, 50) == 3.0  # |w| < 3 -> the two smallest go
    assert prune.percentile_threshold(w, 0) == 0.0
    assert prune.percentile_threshold(w, 100) == float("inf")


def test_global_threshold_is_shared_and_prunes_pooled_percentile():
    a, b = MaskedLinear(4, 1, bias=False), MaskedLinear(4, 1, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
        b.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    t = prune.prune_global(nn.Sequential(a, b), 50, "all")
    assert set(t.values()) == {1.0}
    assert a.mask.sum() == 0 and b.mask.sum() == 4  # the small layer loses everything


def test_per_layer_percentile_and_layer_value_precedence():
    setting = {"fc1": 1, "layer4.*": 2, "conv": 3, "*": 4}
    assert prune.layer_value(setting, "fc1", "fc") == 1
    assert prune.layer_value(setting, "layer4.0.conv1", "conv") == 2
    assert prune.layer_value(setting, "conv2", "conv") == 3
    assert prune.layer_value(setting, "fc2", "fc") == 4
    assert prune.layer_value(0.5, "anything", "fc") == 0.5


def test_surgery_step_known_answer_with_hysteresis():
    layer = MaskedLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.05, 0.105, 0.095, -0.2]]))
        layer.mask.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    model = nn.Sequential(layer)
    prune.surgery_step(model, {"0": 0.1}, band=0.1)
    # below 0.09: pruned; inside 0.09..0.11: unchanged; above 0.11 (in magnitude): spliced back
    assert layer.mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert layer.weight.tolist()[0] == pytest.approx([0.05, 0.105, 0.095, -0.2])  # surgery keeps weights


def test_scaled_surgery_thresholds_follow_the_weight_scale():
    layer = MaskedLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 1.0]]))
    model = nn.Sequential(layer)
    thresholds = {"0": 0.25}
    prune.surgery_step(model, thresholds, band=0.0, sensitivities={"0": 1.0})
    std = float(layer.weight.detach().std())
    assert thresholds["0"] == pytest.approx(std)  # re-derived: 1.0 x the std of all the weights
    assert layer.mask.tolist() == [[0.0, 0.0, float(0.3 >= std), 1.0]]
    with torch.no_grad():
        layer.weight.mul_(10)  # the same weights, ten times the scale: the same mask
    before = layer.mask.clone()
    prune.surgery_step(model, thresholds, band=0.0, sensitivities={"0": 1.0})
    assert torch.equal(layer.mask, before) and thresholds["0"] == pytest.approx(10 * std)
    prune.surgery_step(model, {"0": std}, band=0.0)  # a fixed threshold splices them all back
    assert layer.mask.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_density_held_surgery_keeps_each_layers_fraction_whatever_the_weights_do():
    layer = MaskedLinear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8]]))
    model = nn.Sequential(layer)
    thresholds = {"0": 0.0}
    prune.surgery_step(model, thresholds, band=0.0, densities={"0": 0.25})
    assert float(thresholds["0"]) == pytest.approx(0.65)  # halfway between 0.6 dropped and 0.7 kept
    assert layer.mask.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1]]
    with torch.no_grad():  # the weights reshuffle and shrink: the two largest are still the two kept
        layer.weight.copy_(torch.tensor([[0.05, -0.01, 0.02, 0.03, -0.04, 0.06, 0.0, -0.001]]))
    prune.surgery_step(model, thresholds, band=0.0, densities={"0": 0.25})
    assert layer.mask.tolist() == [[1, 0, 0, 0, 0, 1, 0, 0]] and float(thresholds["0"]) == pytest.approx(0.045)
    # a band keeps the state of weights near the threshold, as for the other rules
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.05, -0.01, 0.02, 0.03, -0.046, 0.06, 0.0, -0.001]]))
    prune.surgery_step(model, thresholds, band=0.1, densities={"0": 0.25})
    # t = 0.048: 0.046 (now among the two largest) and 0.05 lie inside 0.0432..0.0528 and keep their state
    assert layer.mask.tolist() == [[1, 0, 0, 0, 0, 1, 0, 0]] and float(thresholds["0"]) == pytest.approx(0.048)
    prune.surgery_step(model, thresholds, band=0.0, densities={"0": 0.0})
    assert layer.mask.sum() == 0
    prune.surgery_step(model, thresholds, band=0.0, densities={"0": 1.0})
    assert layer.mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 1]]  # every weight above 0 (a weight at 0 stays dead)


def test_ramped_density_follows_the_cubic_schedule():
    # Zhu & Gupta 2017: d + (1 - d)(1 - t / T)^3, from 1 at step 0 to d at step T, then d
    got = [prune.ramped({"a": 0.2, "b": 1.0}, t, 4) for t in (0, 1, 2, 4, 9)]
    assert [g["a"] for g in got] == pytest.approx([1.0, 0.2 + 0.8 * 27 / 64, 0.3, 0.2, 0.2])
    assert all(g["b"] == 1.0 for g in got)
    assert prune.ramped({"a": 0.2}, 0, 0) == {"a": 0.2}  # no ramp: the target at once


def test_gradual_surgery_lowers_the_held_density_step_by_step():
    torch.manual_seed(0)
    layer = MaskedLinear(10, 10, bias=False)
    model = nn.Sequential(layer)
    step = prune.gradual_surgery(model, {"0": 0.0}, 0.0, {"0": 0.2}, 4)
    alive = []
    for _ in range(6):
        step()
        alive.append(int(layer.mask.sum()))
    assert alive == [54, 30, 21, 20, 20, 20]  # 100 x (0.2 + 0.8 (1 - t / 4)^3), rounded


def test_dns_splices_gradients_and_finishes_with_exact_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(6, 3))
    layer = model[0]
    thresholds = prune.prune_dns(model, 1.0)
    pruned = layer.mask == 0
    assert pruned.any() and layer.splice and (layer.weight[pruned] != 0).all()  # kept, not zeroed
    x = torch.randn(5, 6)
    expected = x @ (layer.weight * layer.mask).T + layer.bias
    out = model(x)
    assert torch.equal(out, expected)  # computes with weight * mask exactly
    out.sum().backward()
    assert (layer.weight.grad[pruned] != 0).all()  # straight-through: pruned weights still learn
    layer.weight.grad = None
    prune.finish_surgery(model)
    assert not layer.splice and (layer.weight[pruned] == 0).all()
    model(x).sum().backward()
    assert (layer.weight.grad[pruned] == 0).all()  # after surgery they stay pruned
    assert set(thresholds) == {"0"} and thresholds["0"] > 0


def test_layer_stats_count_the_mask():
    layer = MaskedLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.mask.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert util.layer_stats(nn.Sequential(layer))[0]["nonzero"] == 1


def test_prune_layers_fc_leaves_convs_dense():
    net = build_model("lenet5")
    prune.prune_by_std(net, 1.0, "fc")
    assert net.conv1.mask.all() and net.conv3.mask.all()
    assert not net.fc1.mask.all() and not net.fc2.mask.all()


# --- pruned weights stay exactly zero through retraining ------------------------------------

@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_pruned_weights_stay_zero_through_retraining(fake_mnist, opt):
    torch.manual_seed(0)
    train, val, _ = util.load_data("mnist", fake_mnist, 64, 200, 0.1, 0, torch.device("cpu"), 0)
    net = build_model("lenet5_caffe")
    prune.prune_by_percentile(net, 80, "all")
    masks = {n: m.mask.clone() for n, m in prune.masked_layers(net)}
    before = {n: m.weight.detach().clone() for n, m in prune.masked_layers(net)}
    util.fit(net, net.parameters(), train, val, 1, 1e-2, weight_decay=1e-3, optimizer=opt)
    for name, m in prune.masked_layers(net):
        dead = masks[name] == 0
        assert torch.equal(m.mask, masks[name])
        assert (m.weight[dead] == 0).all(), name  # exactly zero, not small
        assert not torch.equal(m.weight[~dead], before[name][~dead])  # survivors did train


# --- models and the converter ---------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("lenet_300_100", 266_610), ("lenet5", 167_566),
                                        ("lenet5_caffe", 431_080)])
def test_parameter_counts(name, count):
    net = build_model(name)
    assert sum(p.numel() for p in net.parameters()) == count
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_converter_masks_every_layer_and_keeps_names():
    reference = torchvision.models.resnet18(num_classes=10)
    net = build_model("resnet18", num_classes=10)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for name, m in net.named_modules():
        assert type(m) not in (nn.Conv2d, nn.Linear), f"{name} was not converted"
    masked = prune.masked_layers(net)
    assert len(masked) == 21  # 20 convs (3 of them 1x1 downsamples) + fc
    assert all(isinstance(m, (MaskedConv2d, MaskedLinear)) for _, m in masked)
    assert {n for n, _ in masked} >= {"conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"}
    assert isinstance(net.bn1, nn.BatchNorm2d)  # batch-norm stays dense


def test_resnet18_cifar_stem_and_same_function_as_unmasked():
    torch.manual_seed(0)
    net = build_model("resnet18", in_shape=[3, 32, 32], num_classes=10, cifar_stem=True).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.conv1, plain.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.endswith("mask")})
    assert torch.allclose(net(x), plain.eval()(x), atol=1e-5)


# --- table format ---------------------------------------------------------------------------

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


def test_test_line_format():
    assert util.test_line(0.0486, 9852, 10000) == "Test set: Average loss: 0.0486, Accuracy: 9852/10000 (98.52%)"


# --- settings overrides ---------------------------------------------------------------------

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
    ("epochs=2", "give settings as --key=value"),
])
def test_override_errors(arg, message):
    with pytest.raises(util.UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        util.parse_settings(DEFAULTS, [arg])


def test_settings_from_takes_lowercase_literals_only():
    ns = {"lr": 0.1, "MODELS": {"a": 1}, "torch": torch, "_x": 1, "f": print, "bits": {"*": 5}}
    assert util.settings_from(ns) == {"lr": 0.1, "bits": {"*": 5}}


# --- data -----------------------------------------------------------------------------------

def test_load_data_split_is_fixed_and_disjoint(fake_mnist):
    a = util.load_data("mnist", fake_mnist, 32, 100, 0.25, 0, torch.device("cpu"), seed=1)
    b = util.load_data("mnist", fake_mnist, 32, 100, 0.25, 0, torch.device("cpu"), seed=2)
    assert len(a[0].y) == 450 and len(a[1].y) == 150 and len(a[2].y) == 200
    assert torch.equal(a[1].x, b[1].x)  # the validation split does not depend on the seed
    xb, yb = next(iter(a[0]))
    assert xb.shape == (32, 1, 28, 28) and xb.dtype == torch.float32 and yb.shape == (32,)
    assert sum(len(y) for _, y in a[0]) == 450


def test_cifar_image_folder_and_augmentation(fake_cifar):
    train, val, test = util.load_data("cifar10", fake_cifar, 16, 50, 0.0, 0, torch.device("cpu"), 0)
    assert train.x.shape == (100, 3, 32, 32) and len(test.y) == 50 and train.augment == "crop_flip"
    xb, _ = next(iter(train))
    assert xb.shape == (16, 3, 32, 32)
    # a crop of a padded image: every output pixel is a source pixel or padding (black)
    b = util.Batches(torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4), torch.zeros(1, dtype=torch.long),
                     1, (0.0,), (1 / 255,), augment="crop_flip")
    out = next(iter(b))[0]
    assert set(out.flatten().tolist()) <= set(range(17))


def test_mnist_shift_augmentation_moves_by_at_most_2_pixels(fake_mnist):
    train = util.load_data("mnist", fake_mnist, 600, 100, 0.0, 0, torch.device("cpu"), 0, augment="shift")[0]
    plain = util.load_data("mnist", fake_mnist, 600, 100, 0.0, 0, torch.device("cpu"), 0)[0]
    assert plain.augment == "none" and train.augment == "shift"
    torch.manual_seed(0)
    image = (torch.rand(50, 1, 28, 28) * 255).to(torch.uint8)
    b = util.Batches(image, torch.zeros(50, dtype=torch.long), 50, (0.0,), (1 / 255,), augment="shift", seed=3)
    out = next(iter(b))[0]
    for moved, source in zip(out, image.float()):
        # some shift (dy, dx) in -2..2 maps the source onto the output, with black coming in
        padded = torch.nn.functional.pad(source, (2, 2, 2, 2))
        assert any(torch.equal(moved, padded[:, 2 + dy:30 + dy, 2 + dx:30 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    with pytest.raises(util.UserError, match="unknown augment 'rotate'"):
        util.Batches(image, torch.zeros(50, dtype=torch.long), 50, (0.0,), (1.0,), augment="rotate")


def test_missing_data_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as dsu

    def no_network(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(dsu, "download_url", no_network)
    monkeypatch.setattr(dsu, "download_and_extract_archive", no_network)
    with pytest.raises(util.UserError, match="mnist train set not found under .* --data_root"):
        util.load_data("mnist", str(tmp_path), 32, 100, 0.1, 0, torch.device("cpu"), 0)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "MNIST")), reason="no ../shared/data")
def test_real_mnist_loads():
    train, val, test = util.load_data("mnist", SHARED_DATA, 128, 1000, 0.1, 0, torch.device("cpu"), 0)
    assert (len(train.y), len(val.y), len(test.y)) == (54000, 6000, 10000)
    assert train.x.dtype == torch.uint8 and set(test.y.unique().tolist()) == set(range(10))


# --- checkpoints ----------------------------------------------------------------------------

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

def test_pruning_script_end_to_end(fake_mnist, tmp_path):
    out = tmp_path / "out"
    r = run_script("pruning.py", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={out}",
                   "--epochs=2", "--retrain_epochs=1", "--prune_iterations=2", "--lr=0.01", "--retrain_lr=0.001",
                   "--sensitivity=1.0", "--optimizer=adam", "--prune_method=std", "--augment=none")
    assert "recipe: config/lenet5.py" in r.stdout  # the model's recipe, under these overrides
    assert r.returncode == 0, r.stderr
    for header in ("--- Before pruning ---", "--- After pruning (iteration 2) ---", "--- After Retraining ---"):
        assert header in r.stdout
    assert "Pruning with threshold : " in r.stdout and "Test set: Average loss: " in r.stdout
    summary = json.loads((out / "lenet5_pruned.json").read_text())
    assert set(summary["accuracy"]) == {"dense", "pruned", "retrained"}
    assert summary["accuracy"]["dense"] > 50  # the synthetic classes are learnable
    assert summary["params"]["total"] == 167_566
    assert summary["params"]["nonzero"] == sum(l["nonzero"] for l in summary["layers"])
    assert summary["params"]["nonzero"] < 0.5 * 167_566  # two iterations at sensitivity 1
    assert {"model", "dataset", "settings", "seconds", "layers"} <= set(summary)
    ckpt = util.load_checkpoint(str(out / "lenet5_pruned.pt"), "pruned", torch.device("cpu"), "")
    assert ckpt["metrics"]["accuracy"] == summary["accuracy"]
    assert os.path.isfile(out / "lenet5_initial.pt")


def test_a_layer_without_a_sensitivity_is_one_line(fake_mnist, tmp_path, capsys):
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}", "--subset=100",
                            "--sensitivity={'fc1': 1.0}", capsys=capsys)
    assert code == 2 and err.strip() == "error: sensitivity: no value for layer 'fc2' (add a '*' default)"
    assert os.listdir(tmp_path) == []


def test_dns_from_a_dense_checkpoint(fake_mnist, tmp_path, capsys):
    dense = tmp_path / "dense"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={dense}", "--subset=400",
                            "--epochs=2", "--retrain_epochs=1", "--lr=0.01", capsys=capsys)
    assert code == 0, err
    out = tmp_path / "dns"  # (with a group lasso on fc1 while it retrains)
    code, stdout, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                 f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                                 "--sensitivity=1.0", "--retrain_epochs=2", "--retrain_lr=0.01", "--optimizer=sgd",
                                 "--group_lasso={'fc1': 1e-4, '*': 0.0}", capsys=capsys)
    assert code == 0, err
    assert "dense network from" in stdout
    # the run's folder holds its dense network too (stage 2's source=initial reads it there)
    load = lambda folder: util.load_checkpoint(str(folder / "lenet_300_100_initial.pt"), "initial",  # noqa: E731
                                               torch.device("cpu"), "")["state_dict"]
    assert all(torch.equal(v, load(dense)[k]) for k, v in load(out).items())
    first = json.loads((dense / "lenet_300_100_pruned.json").read_text())
    summary = json.loads((out / "lenet_300_100_pruned.json").read_text())
    assert summary["accuracy"]["dense"] == first["accuracy"]["dense"]  # the same dense network
    assert "train" not in summary["history"]
    ckpt = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"), "")
    state = ckpt["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w, m = state[f"{layer}.weight"], state[f"{layer}.mask"]
        assert torch.equal(w != 0, m == 1) and 0 < m.mean() < 0.6  # surgery ended: zeros exactly where pruned
    # density-held surgery (under distillation, which moves a std rule's density): each layer ends with exactly
    # as many weights as the std rule left when surgery started (no band: no weight keeps its state)
    held = tmp_path / "held"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--dns_band=0.0", "--distill=0.9", "--sensitivity=1.0",
                            "--retrain_epochs=2", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    start, end = load(dense), util.load_checkpoint(str(held / "lenet_300_100_pruned.pt"), "pruned",
                                                    torch.device("cpu"), "")["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w0 = start[f"{layer}.weight"]
        assert int(end[f"{layer}.mask"].sum()) == int((w0.abs() >= w0.std()).sum()), layer
        assert not torch.equal(end[f"{layer}.mask"], (w0.abs() >= w0.std()).float()), layer  # others chosen
    # densities by the layers' shapes (erk_alive): each layer ends with the Erdos-Renyi-kernel count
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}_erk", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--erk_alive=0.1", "--dns_band=0.0",
                            "--retrain_epochs=1", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    end = util.load_checkpoint(f"{held}_erk/lenet_300_100_pruned.pt", "pruned", torch.device("cpu"),
                               "")["state_dict"]
    erk = prune.erk_densities(build_model("lenet_300_100"), 0.1)  # fc1 8.0%, fc2 23%, fc3 100%
    for layer in ("fc1", "fc2", "fc3"):
        assert abs(int(end[f"{layer}.mask"].sum()) - erk[layer] * end[f"{layer}.mask"].numel()) <= 1, layer
    # ramped (gradual pruning over the first half of surgery): the same counts at the end
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}_ramp", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--dns_ramp=0.5", "--dns_band=0.0", "--sensitivity=1.0",
                            "--retrain_epochs=2", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    end = util.load_checkpoint(f"{held}_ramp/lenet_300_100_pruned.pt", "pruned", torch.device("cpu"),
                               "")["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w0 = start[f"{layer}.weight"]
        assert int(end[f"{layer}.mask"].sum()) == int((w0.abs() >= w0.std()).sum()), layer
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--model=lenet5",
                            f"--init_from={dense}/lenet_300_100_initial.pt", capsys=capsys)
    assert code == 2 and "not the" in err and "lenet5" in err


def test_retrain_weight_decay_acts_on_retraining_only(fake_mnist, tmp_path, capsys):
    dense = tmp_path / "dense"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={dense}", "--subset=400",
                            "--epochs=1", "--retrain_epochs=0", capsys=capsys)
    assert code == 0, err
    norms = {}
    for wd in (0.0, 20.0):  # fixed masks (std rule), the same batches: only the penalty differs
        out = tmp_path / f"wd{wd}"
        code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=std",
                                "--sensitivity=1.0", "--retrain_epochs=1", "--retrain_lr=0.01", "--optimizer=sgd",
                                f"--retrain_weight_decay={wd}", "--weight_decay=0.0", capsys=capsys)
        assert code == 0, err
        state = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"),
                                     "")["state_dict"]
        norms[wd] = sum(float(state[f"{n}.weight"].norm()) for n in ("fc1", "fc2", "fc3"))
        summary = json.loads((out / "lenet_300_100_pruned.json").read_text())
        assert summary["settings"]["retrain_weight_decay"] == wd
    # 3 steps at lr 0.01 x 20 with momentum shrink the survivors by about half; the loss's gradients cannot
    assert norms[20.0] < 0.8 * norms[0.0], norms


def test_erk_densities_known_answer():
    net = nn.Sequential(MaskedLinear(4, 2), MaskedLinear(20, 10))  # 8 weights (6 / 8), 200 (30 / 200)
    # 25% of 208 = 52: the factor 52 / (0.75 x 8 + 0.15 x 200) would give layer 0 a density over 1,
    # so it keeps all 8 and layer 1 the other 44 of its 200
    assert prune.erk_densities(net, 0.25) == {"0": 1.0, "1": pytest.approx(0.22)}
    assert prune.erk_densities(net, 1.0) == {"0": 1.0, "1": pytest.approx(1.0)}
    assert prune.erk_densities(net, 0.0) == {"0": 0.0, "1": 0.0}
    d = prune.erk_densities(build_model("resnet20"), 0.2)
    layers = dict(masked_layers(build_model("resnet20")))
    assert sum(d[n] * m.weight.numel() for n, m in layers.items()) == pytest.approx(0.2 * 268336)
    assert d["conv1"] == d["fc"] == 1.0 and d["layer1.0.conv1"] > d["layer2.1.conv1"] > d["layer3.1.conv1"]


def test_prune_by_percentile_for_surgery_keeps_the_largest():
    layer = MaskedLinear(5, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2, 3, -4, 5], [-6, 7, -8, 9, -10]]))
    net = nn.Sequential(layer)
    prune.prune_by_percentile(net, {"0": 100 * (1 - 0.3)}, surgery=True)
    assert layer.mask.tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert layer.weight.abs().min() == 1 and layer.splice  # surgery keeps the weights to splice back
    prune.prune_by_percentile(net, {"0": 100.0})
    assert layer.mask.sum() == 0 and layer.weight.abs().sum() == 0


def test_ensemble_averages_its_members_logits():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]])), a.bias.zero_()
        b.weight.copy_(torch.tensor([[3.0, 0, 0], [0, 0, 1]])), b.bias.fill_(1.0)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert Ensemble([a, b])(x).tolist() == [[(1 + 4) / 2, (2 + 4) / 2]]


def test_teacher_from_a_checkpoint_with_a_snapshot():
    first, last = build_model("lenet_300_100"), build_model("lenet_300_100")
    args = dict(name="lenet_300_100", kwargs={})
    ckpt = dict(model=args, state_dict=last.state_dict(), snapshots=[first.state_dict()])
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(teacher_from(ckpt, "dense")(x), last(x))
        assert torch.allclose(teacher_from(ckpt, "snapshots")(x), (first(x) + last(x)) / 2, atol=1e-6)
        no_snapshot = teacher_from(dict(model=args, state_dict=last.state_dict()), "snapshots")
        assert torch.equal(no_snapshot(x), last(x))  # a network without snapshots teaches alone
    with pytest.raises(ValueError, match="unknown teacher 'best'"):
        teacher_from(ckpt, "best")


def test_a_warm_restart_keeps_a_snapshot_that_teaches(fake_mnist, tmp_path, capsys):
    """The network at the end of the first cosine cycle is kept in the restarted {model}_initial.pt,
    carried on by init_from, and teaches beside the last one in stages 1 and 2."""
    common = [f"--data_root={fake_mnist}", "--subset=300", "--prune_method=std", "--sensitivity=1.0"]
    first = tmp_path / "first"
    code, _, err = run_here("pruning", *common, f"--out_dir={first}", "--epochs=1", "--retrain_epochs=0",
                            capsys=capsys)
    assert code == 0, err
    load = lambda folder: util.load_checkpoint(str(folder / "lenet_300_100_initial.pt"), "initial",  # noqa: E731
                                               torch.device("cpu"), "")
    assert "snapshots" not in load(first)  # no restart, nothing kept
    restarted = tmp_path / "restarted"
    code, stdout, err = run_here("pruning", *common, f"--out_dir={restarted}", "--restart_epochs=1",
                                 f"--init_from={first}/lenet_300_100_initial.pt", "--retrain_epochs=1",
                                 "--distill=0.5", "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    ckpt = load(restarted)
    (snapshot,) = ckpt["snapshots"]
    assert all(torch.equal(v, snapshot[k]) for k, v in load(first)["state_dict"].items())
    assert not torch.equal(snapshot["fc1.weight"], ckpt["state_dict"]["fc1.weight"])  # the restart trained on
    carried = tmp_path / "carried"  # init_from without a restart keeps the snapshots it read
    code, stdout, err = run_here("pruning", *common, f"--out_dir={carried}", "--retrain_epochs=1",
                                 f"--init_from={restarted}/lenet_300_100_initial.pt", "--distill=0.5",
                                 "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    assert "and 1 snapshot(s)" in stdout
    assert torch.equal(load(carried)["snapshots"][0]["fc2.weight"], snapshot["fc2.weight"])
    code, _, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={restarted}",
                            "--finetune_epochs=1", "--distill=0.5", "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    summary = json.loads((restarted / "lenet_300_100_quantized.json").read_text())
    assert summary["settings"]["teacher"] == "snapshots" and len(summary["history"]["finetune"]) == 1
    # without a snapshot to teach with: one line, before any training, nothing written
    for stage, args in (("pruning", [f"--init_from={first}/lenet_300_100_initial.pt", "--retrain_epochs=1"]),
                        ("quantization", ["--finetune_epochs=1"])):
        out = tmp_path / f"none_{stage}"
        if stage == "quantization":
            out.mkdir()
            for name in ("lenet_300_100_pruned.pt", "lenet_300_100_initial.pt"):
                (out / name).write_bytes((first / name).read_bytes())
        before = sorted(os.listdir(out)) if out.exists() else []
        subset = ["--subset=300"] if stage == "pruning" else []
        code, _, err = run_here(stage, f"--data_root={fake_mnist}", f"--out_dir={out}", *subset,
                                "--distill=0.5", "--teacher=snapshots", *args, capsys=capsys)
        assert code == 2 and "holds no snapshot" in err and len(err.strip().splitlines()) == 1, err
        assert (sorted(os.listdir(out)) if out.exists() else []) == before


@pytest.mark.parametrize("args,message", [
    (["--model=vgg"], "unknown model 'vgg'"),
    (["--teacher=best", "--distill=0.5"], "unknown teacher 'best'; choose dense or snapshots"),
    (["--teacher=snapshots"], "teacher=snapshots teaches through distillation: set --distill"),
    (["--teacher=snapshots", "--distill=0.5"], "teacher=snapshots needs a warm restart to keep a snapshot"),
    (["--dataset=svhn"], "unknown dataset 'svhn'"),
    (["--sensitivty=1"], "unknown setting 'sensitivty'; valid settings: model, dataset"),
    (["--epochs=ten"], "setting epochs expects int"),
    (["--sensitivity=-0.5"], "sensitivity must be >= 0"),
    (["--prune_method=dns", "--dns_band=1.5"], "dns_band must be in [0, 1)"),
    (["--dns_threshold=quantile"], "unknown dns_threshold 'quantile'; choose fixed, scaled or density"),
    (["--dns_ramp=0.5"], "dns_ramp ramps the held density: set --dns_threshold=density"),
    (["--dns_ramp=1.5", "--dns_threshold=density"], "dns_ramp must be in [0, 1], got 1.5"),
    (["--erk_alive=0.2"], "erk_alive sets the densities that surgery holds: set --prune_method=dns"),
    (["--erk_alive=1.5", "--dns_threshold=density"], "erk_alive must be in [0, 1] (0 = off), got 1.5"),
    (["--group_lasso={'*': -1e-4}"], "group_lasso must be >= 0"),
    (["--retrain_weight_decay=-1e-4"], "weight decay must be >= 0"),
    (["--init_from=/nonexistent/x.pt"], "no checkpoint at /nonexistent/x.pt"),
    # a file, not a folder: torchvision's download stops at making its folder, before any network
    ([f"--data_root={__file__}"], f"mnist train set not found under {__file__}"),
    # settings are checked before the data loads (here it would fail)
    (["--optimizer=rmsprop", f"--data_root={__file__}"], "unknown optimizer 'rmsprop'; choose one of adam, sgd"),
    (["--sensitivity={'fc1': 1.0}", f"--data_root={__file__}"], "sensitivity: no value for layer 'fc2'"),
])
def test_pruning_script_bad_input(tmp_path, args, message, capsys):
    code, _, err = run_here("pruning", f"--out_dir={tmp_path}", *args, capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {err.strip()[7:]}"]  # one line
    assert message in err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "MNIST")), reason="no ../shared/data")
def test_pruning_script_on_real_mnist_subset(tmp_path, capsys):
    code, _, err = run_here("pruning", "--model=lenet_300_100", f"--data_root={SHARED_DATA}", f"--out_dir={tmp_path}",
                            "--subset=6000", "--epochs=3", "--retrain_epochs=2", "--sensitivity=1.0", capsys=capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "lenet_300_100_pruned.json").read_text())
    assert summary["accuracy"]["dense"] > 88  # 5,400 real digits, 3 epochs
    assert summary["accuracy"]["retrained"] > summary["accuracy"]["pruned"] - 1
    assert summary["params"]["nonzero"] < 0.45 * summary["params"]["total"]


# --- dead units ------------------------------------------------------------------------------------

def test_group_lasso_known_answer_and_whole_units():
    fc = MaskedLinear(3, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]]))
    fc.mask[0, 2] = 0  # pruned: costs nothing
    penalty = prune.group_lasso_penalty(nn.Sequential(fc), {"0": 0.5})
    # rows (3 weights each): |(3, 4, 0)| = 5 and 5; columns (2 each): 3, 4, 5
    rows, cols = 3 ** 0.5 * (5 + 5), 2 ** 0.5 * (3 + 4 + 5)
    assert torch.allclose(penalty(), torch.tensor(0.5 * (rows + cols)))
    # its gradient is the unit direction of each group, scaled: a group is pulled to 0 as a whole
    penalty().backward()
    expected = 0.5 * (3 ** 0.5 * torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
                      + 2 ** 0.5 * torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(fc.weight.grad, expected)
    assert prune.group_lasso_penalty(nn.Sequential(fc), {"0": 0.0})() == 0  # off
    # a conv's units are its filters and its input channels
    conv = MaskedConv2d(2, 3, 3)
    conv_penalty = prune.group_lasso_penalty(nn.Sequential(conv), {"0": 1.0})()
    w = conv.weight.detach()
    by_hand = 18 ** 0.5 * w.flatten(1).norm(dim=1).sum() + 27 ** 0.5 * w.transpose(0, 1).flatten(1).norm(dim=1).sum()
    assert torch.allclose(conv_penalty, by_hand)


def test_group_lasso_training_empties_whole_units(fake_mnist):
    """Trained under a strong group lasso then pruned, LeNet-300-100 loses whole units: its
    hidden units lose all their inputs, and pixels all their weights (stage 2's dead-unit pass
    then drops the units); without it, none do."""
    torch.manual_seed(0)
    train, val, _ = util.load_data("mnist", fake_mnist, 64, 256, 0.1, 0, torch.device("cpu"), 0, "none")
    counts = {}
    for strength in (0.0, 3e-3):
        torch.manual_seed(0)
        net = build_model("lenet_300_100")
        penalty = prune.group_lasso_penalty(net, {n: strength for n, _ in masked_layers(net)}) if strength else None
        util.fit(net, net.parameters(), train, val, 5, 0.05, 0.0, optimizer="sgd", penalty=penalty)
        prune.prune_by_std(net, {"*": 1.0})
        counts[strength] = int((net.fc1.mask.sum(1) == 0).sum()), int((net.fc1.mask.sum(0) == 0).sum())
    assert counts[0.0] == (0, 0) and min(counts[3e-3]) > 50, counts  # hidden units and pixels


def test_dead_units_known_answer():
    torch.manual_seed(0)
    net = build_model("lenet_300_100")
    with torch.no_grad():
        net.fc1.weight[0] = 0  # neuron 0 of fc1 has no input: it outputs relu(bias) = 2
        net.fc1.bias[0] = 2.0
        net.fc3.weight[:, 5] = 0  # neuron 5 of fc2 feeds nothing
        net.fc3.weight[:, 7] = 0  # neuron 7 of fc2 feeds nothing and has no input
        net.fc2.weight[7] = 0
    w2, b2 = net.fc2.weight[:, 0].clone(), net.fc2.bias.clone()
    w2[5] = 0  # neuron 5's incoming weights go first (unread), its bias no longer matters
    x = torch.randn(16, 1, 28, 28)
    before = net(x).detach()
    b1 = net.fc1.bias.clone()
    # fc2 row 5, column 0; fc1 neuron 0 (folded, then read by nothing) and fc2 neurons 5 and 7
    # (without inputs, read by nothing) keep no bias
    assert drop_dead_units(net) == dict(unread=1, constant=1, weights=300 + 98, biases=3)
    assert torch.equal(net.fc2.mask[5], torch.zeros(300)) and torch.equal(net.fc2.weight[5], torch.zeros(300))
    assert (net.fc2.mask[:, 0] == 0).all()
    b2[5] = b2[7] = 0
    assert torch.allclose(net.fc2.bias, b2 + 2.0 * w2)
    assert net.fc1.bias[0] == 0 and torch.equal(net.fc1.bias[1:], b1[1:])
    assert torch.allclose(net(x), before, atol=1e-5)
    assert drop_dead_units(net) == dict(unread=0, constant=0, weights=0, biases=0)  # nothing left to find
    assert drop_dead_units(build_model("resnet20")) is None  # not a chain


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "lenet5_caffe"])
def test_dead_units_keep_the_outputs_on_random_inputs(name):
    """Sparse random masks leave many dead units in every layer; the network's outputs stay."""
    torch.manual_seed(1)
    net = build_model(name).eval()
    with torch.no_grad():
        for _, m in masked_layers(net):
            m.mask.copy_((torch.rand_like(m.mask) < 0.03).float())
            m.mask[:3] = 0  # units without inputs, whatever the density
            m.bias.uniform_(-1, 1)
    x = torch.randn(32, 1, 28, 28)
    before = net(x).detach()
    found = drop_dead_units(net)
    assert found["unread"] > 0 and found["constant"] > 0 and found["weights"] > 0 and found["biases"] > 0
    assert torch.allclose(net(x), before, atol=1e-5, rtol=1e-5)
