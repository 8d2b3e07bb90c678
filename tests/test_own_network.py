"""Your own network: torchvision builders by name, a user's factory file, grouped and depthwise
convs through every stage, the image-folder data set, the file that names its network without
importing it, and the automatic recipe."""
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn as nn

import dcfile
import models
import prune
import quantize
import runtime
from conftest import CPU, ROOT, assert_bit_equal, quantized_state, rebuild, run_here, sections, write_image_folder
from datasets import DataSpec, data_shape, load_data

EXAMPLE = "examples/separable.py:separable_net"


@pytest.fixture
def registry(monkeypatch):
    """An empty factory registry: what a fresh process has (nothing named yet)."""
    monkeypatch.setattr(models, "_FACTORIES", {})
    return models._FACTORIES


def named_example():
    models.check_model(os.path.join(ROOT, EXAMPLE))
    return dict(in_shape=[3, 16, 16], num_classes=5, model_args={"width": 8})


# --- the model strings --------------------------------------------------------------------------

def test_model_strings_kinds_and_stems():
    assert models.model_kind("lenet5") == "registered" and models.file_stem("lenet5") == "lenet5"
    assert models.model_kind("torchvision.mobilenet_v2") == "torchvision"
    assert models.file_stem("torchvision.mobilenet_v2") == "torchvision.mobilenet_v2"
    assert models.model_kind("nets/small.py:build") == "factory" == models.model_kind("pkg.mod:make_net")
    assert models.factory_key("/home/me/nets/small.py:build") == ("small", "build") == models.factory_key("x/small.py:build")
    assert models.file_stem("nets/small.py:build") == "small.build" and models.file_stem("pkg.mod:f") == "pkg.mod.f"
    assert models.recorded_name("/home/me/nets/small.py:build") == "small.py:build" == models.recorded_name("small.py:build")
    assert models.recorded_name("pkg.mod:f") == "pkg.mod:f" and models.recorded_name("resnet20") == "resnet20"
    for bad in ("lenet6", "nets/small.py:", "small.py:2x", "a b:c", "torchvision.x:y.z"):
        with pytest.raises(ValueError, match="unknown model"):
            models.model_kind(bad)
    with pytest.raises(ValueError, match="did you mean torchvision.mobilenet_v2"):
        models.check_model("torchvision.mobilenet_v22")


def test_torchvision_builder_by_name_masks_every_conv_and_linear():
    net = models.build_model("torchvision.mobilenet_v2", in_shape=[1, 28, 28], num_classes=7, pretrained=False,
                             model_args={"width_mult": 0.25})
    import torchvision

    plain = torchvision.models.get_model("mobilenet_v2", num_classes=7, width_mult=0.25)
    layers = [m for m in net.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    masked = dict(prune.masked_layers(net))
    assert not layers and len(masked) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in plain.modules())
    assert any(m.groups == m.in_channels > 1 for m in masked.values() if isinstance(m, nn.Conv2d))  # depthwise
    assert set(net.state_dict()) == set(plain.state_dict()) | {f"{n}.mask" for n in masked}
    assert net.features[0][0].in_channels == 1  # the data set's channels
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 7) and models.unmaskable(net) == []


@pytest.mark.parametrize("builder", ["googlenet", "inception_v3"])
def test_pretrained_builder_with_auxiliary_heads_loads_and_drops_them(builder, monkeypatch):
    import torchvision
    from torchvision.models._api import WeightsEnum

    # what the download would give: the 1000-class network with its auxiliary heads
    state = torchvision.models.get_model(builder, weights=None, aux_logits=True, init_weights=False).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    net = models.build_model(f"torchvision.{builder}", in_shape=[3, 75, 75] if builder == "inception_v3" else [3, 32, 32],
                             num_classes=10, pretrained=True)
    assert not net.aux_logits and not any("aux" in n.lower() for n, _ in net.named_modules())
    x = torch.randn(2, *([3, 75, 75] if builder == "inception_v3" else [3, 32, 32]))
    assert net.train()(x).shape == (2, 10)  # one output in training mode too: the loss takes it


def test_pretrained_first_conv_sees_a_grey_image_as_the_rgb_one_did():
    import torchvision

    net = torchvision.models.get_model("resnet18", num_classes=1000)  # stands in for pretrained weights
    rgb = net.conv1.weight.detach().clone()
    models._fit_torchvision(net, (1, 32, 32), 7, pretrained=True)
    x = torch.rand(2, 1, 32, 32)
    want = torch.nn.functional.conv2d(x.expand(2, 3, 32, 32), rgb, stride=2, padding=3)
    assert torch.allclose(net.conv1(x), want, atol=1e-5) and net.fc.out_features == 7


def test_layers_the_stages_cannot_mask_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.conv1d = nn.Embedding(10, 4), nn.Conv1d(4, 4, 3)
            self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 2)

    net = prune.to_masked(Odd())
    assert models.unmaskable(net) == [("embed", "Embedding"), ("conv1d", "Conv1d")]


# --- bad --model strings: one line, exit 2, before any work -------------------------------------

def test_bad_model_strings_are_one_line_errors(tmp_path, capsys, registry):
    (tmp_path / "not_a_module.py").write_text("def make(num_classes=10):\n    return [1, 2]\n")
    (tmp_path / "broken.py").write_text("import no_such_package_here\n")
    cases = [("--model=lenet6", "unknown model 'lenet6'"),
             ("--model=torchvision.resnet19", "torchvision has no classification builder 'resnet19'"),
             (f"--model={tmp_path}/missing.py:make", "no file"),
             (f"--model={tmp_path}/not_a_module.py:build", "has no function 'build'"),
             (f"--model={tmp_path}/broken.py:make", "cannot import"),
             (f"--model={tmp_path}/not_a_module.py:make", "returned a list, not an nn.Module")]
    for arg, message in cases:
        code, out, err = run_here("pruning", arg, f"--out_dir={tmp_path}", "--dataset=cifar10",
                                  f"--data_root={tmp_path}/nothing", capsys=capsys)
        if "returned a list" in message:  # the factory runs when the network is built: after the data check
            code, out, err = run_here("pruning", arg, f"--out_dir={tmp_path}", "--dataset=folder",
                                      f"--data_root={write_image_folder(str(tmp_path / 'img'), train=2, test=1)}",
                                      "--image_size=16", capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (arg, err)
    assert not list(tmp_path.glob("*.pt"))


# --- grouped and depthwise convs in every stage -------------------------------------------------

def test_input_units_of_grouped_convs():
    w = torch.arange(4 * 2 * 1 * 1.).reshape(4, 2, 1, 1)  # 4 filters, 2 groups of 2 input channels
    # input channel 0 feeds filters 0 and 1 at place 0; channel 3 feeds filters 2 and 3 at place 1
    assert prune.input_units(w, 2).tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert torch.equal(prune.input_units(w, 1), w.transpose(0, 1).flatten(1))


def test_group_lasso_of_a_depthwise_conv():
    conv = prune.MaskedConv2d(2, 2, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -4.0]).view(2, 1, 1, 1))
    net = nn.Sequential(conv)
    # each channel's one weight is both its output and its input unit: a x 2 x (3 + 4)
    assert prune.group_lasso_penalty(net, {"0": 0.5})().item() == pytest.approx(0.5 * 2 * 7)


def test_erk_keeps_depthwise_convs_dense_at_low_density():
    net = models.build_model("torchvision.mobilenet_v2", in_shape=[3, 32, 32], num_classes=10)
    densities = prune.erk_densities(net, 0.2)
    layers = dict(prune.masked_layers(net))
    depthwise = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(densities[n] == 1.0 for n in depthwise)
    kept = sum(densities[n] * layers[n].weight.numel() for n in layers)
    assert kept == pytest.approx(0.2 * sum(m.weight.numel() for m in layers.values()))


def test_ternary_depthwise_conv():
    torch.manual_seed(0)
    conv = prune.MaskedConv2d(4, 8, 3, padding=2, dilation=2, groups=4)
    x = torch.randn(2, 4, 6, 6)
    quantize.to_ternary(conv, 0.05)
    ternary = conv(x)
    quantize.ternary_to_quantized(conv)
    assert torch.allclose(conv(x), ternary, atol=1e-6) and conv.weight.shape == (8, 1, 3, 3)
    assert len(torch.unique(conv.weight)) <= 3 and len(conv.codebook) == 2


@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_grouped_network_file_round_trip(coder, registry):
    kwargs = named_example()
    state, args, quantized = quantized_state(EXAMPLE, kwargs, density=0.3, clusters=8)
    blob, _ = dcfile.encode_model(state, args, quantized, coder=coder)
    decoded, header = dcfile.decode_bytes(blob)
    assert_bit_equal(state, decoded)
    assert header["model"] == args
    net = quantize.build_quantized_model(args, quantized)
    net.load_state_dict(decoded)
    for name, m in prune.masked_layers(net):
        assert len(torch.unique(m.weight[m.mask.bool()])) <= 2 ** quantized[name]["bits"]
        assert (m.weight[m.mask == 0] == 0).all()


# --- the file names its network and runs no code by itself --------------------------------------

def test_a_hostile_header_imports_nothing(tmp_path, registry):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef run(**kw):\n    pass\n")
    kwargs = named_example()
    state, args, quantized = quantized_state(EXAMPLE, kwargs, density=0.3, clusters=8)
    blob, _ = dcfile.encode_model(state, args, quantized)
    header = dcfile.decode_bytes(blob)[1]
    for name in ("os:system", f"{tmp_path}/evil.py:run", "subprocess:run", "evil:run"):
        hostile = rebuild(blob, {0: dcfile._deflate_header(json.dumps({**header, "model": {**header["model"],
                                                                                         "name": name}}).encode())})
        before = set(sys.modules)
        with pytest.raises(dcfile.FormatError, match="whose code runs only when you name it") as e:
            dcfile.decode_bytes(hostile)
        assert "\n" not in str(e.value) and set(sys.modules) == before and not marker.exists()
    assert sections(blob)[0][1] == "H"


def test_a_factory_file_decodes_when_the_user_names_the_factory(tmp_path, registry):
    kwargs = named_example()
    state, args, quantized = quantized_state(EXAMPLE, kwargs, density=0.3, clusters=8)
    path = tmp_path / "net.dc"
    path.write_bytes(dcfile.encode_model(state, args, quantized)[0])
    registry.clear()  # a new process: nothing named
    with pytest.raises(dcfile.FormatError, match="factory 'separable_net' of module 'separable'"):
        dcfile.load_compressed(str(path))
    # named from another place: the file's path is never used, the user's is
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    shutil.copy(os.path.join(ROOT, "examples", "separable.py"), elsewhere / "separable.py")
    net, _ = runtime.load(str(path), runtime="sparse", model=f"{elsewhere}/separable.py:separable_net")
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)


# --- the data set of image folders --------------------------------------------------------------

def test_folder_data_set(tmp_path):
    root = write_image_folder(str(tmp_path), train=10, test=3, size=24)
    shutil.rmtree(os.path.join(root, "test", "owl"))  # a class the test set lacks keeps its label
    spec = DataSpec("folder", root, 8, 100, 0.2, image_size=16)
    assert data_shape(spec) == ((3, 16, 16), 3)
    train, val, test = load_data(spec, CPU)
    assert train.x.shape == (24, 3, 16, 16) and len(val.y) == 6 and train.augment == "crop_flip"
    assert sorted(set(test.y.tolist())) == [0, 1]  # cat, dog: the training set's labels
    # normalised with the training images' own statistics (the validation images left out)
    x = (train.x.float() - train.mean) / train.std
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2
    # every test image carries the label of the folder it lies in
    labels = {"cat": 0, "dog": 1}
    want = sorted(labels[c] for c in os.listdir(os.path.join(root, "test")) for _ in os.listdir(os.path.join(root, "test", c)))
    assert sorted(test.y.tolist()) == want


def test_folder_data_set_streams_when_it_does_not_fit(tmp_path, monkeypatch):
    import datasets

    root = write_image_folder(str(tmp_path), train=6, test=2, size=20)
    monkeypatch.setattr(datasets, "IN_MEMORY", 100)
    train, val, test = load_data(DataSpec("folder", root, 4, 4, 0.25, image_size=16, workers=0), CPU)
    assert isinstance(train, datasets.FolderBatches) and len(val.y) == 4 and len(test.y) == 6
    xb, yb = next(iter(test))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.int64


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no folder"),
    (lambda root: (os.makedirs(f"{root}/train/cat"), os.makedirs(f"{root}/test/cat")), "holds no class folder"),
    (lambda root: (write_image_folder(root, train=1, test=1), os.makedirs(f"{root}/test/yak"),
                   shutil.copy(f"{root}/test/cat/0000.png", f"{root}/test/yak/a.png")), "no training images: yak"),
])
def test_folder_data_set_errors(tmp_path, capsys, make, message):
    root = str(tmp_path / "data")
    make(root)
    code, _, err = run_here("pruning", "--dataset=folder", f"--data_root={root}", f"--out_dir={tmp_path}",
                            capsys=capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_fashion_mnist_reads_its_folder(tmp_path):
    from conftest import write_fake_mnist

    write_fake_mnist(str(tmp_path), n_train=40, n_test=10)
    os.rename(tmp_path / "MNIST", tmp_path / "FashionMNIST")
    train, _, test = load_data(DataSpec("fashion_mnist", str(tmp_path), 8, 10, 0.0), CPU)
    assert train.x.shape == (40, 1, 28, 28) and len(test.y) == 10 and train.augment == "none"


def test_cifar100_reads_its_folder(tmp_path):
    from conftest import write_fake_cifar

    write_fake_cifar(str(tmp_path), n_train=20, n_test=10)
    os.rename(tmp_path / "CIFAR10", tmp_path / "CIFAR100")
    train, val, test = load_data(DataSpec("cifar100", str(tmp_path), 8, 10, 0.25), CPU)
    assert train.x.shape == (15, 3, 32, 32) and len(val.y) == 5 and len(test.y) == 10


def test_svhn_takes_torchvision_s_arrays(tmp_path, monkeypatch):
    """SVHN comes through torchvision (its .mat files, downloaded where absent); here a stand-in
    for torchvision's class gives the arrays it would: images (N, 3, 32, 32) uint8, labels 0-9."""
    pytest.importorskip("scipy.io")
    import numpy as np
    import torchvision

    class FakeSVHN:
        def __init__(self, root, split, download):
            assert root == os.path.join(str(tmp_path), "SVHN") and download
            n = 12 if split == "train" else 6
            self.data = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            self.labels = np.arange(n) % 10

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    train, val, test = load_data(DataSpec("svhn", str(tmp_path), 4, 6, 0.25), CPU)
    assert train.x.shape == (9, 3, 32, 32) and len(val.y) == 3 and test.y.dtype == torch.int64 and len(test.y) == 6


# --- a user's network through the three stages --------------------------------------------------

def test_a_factory_network_through_the_three_stages(tmp_path, capsys, registry):
    root = write_image_folder(str(tmp_path / "img"), train=12, test=4, size=20)
    out, model = str(tmp_path / "out"), os.path.join(ROOT, EXAMPLE)
    common = [f"--model={model}", f"--out_dir={out}"]
    code, text, err = run_here("pruning", *common, "--dataset=folder", f"--data_root={root}", "--image_size=16",
                               "--epochs=1", "--retrain_epochs=1", "--batch_size=12", "--model_args={'width': 8}",
                               "--prune_method=dns", "--dns_threshold=density", "--erk_alive=0.4",
                               "--group_lasso={'*': 1e-4}", capsys=capsys)
    assert code == 0, err
    code, text, err = run_here("quantization", *common, f"--data_root={root}", "--finetune_epochs=1",
                               "--bits={'conv': 3, 'fc': 4}", capsys=capsys)
    assert code == 0, err
    assert "dead units: not looked for" in text
    summary = json.load(open(f"{out}/separable.separable_net_quantized.json"))
    assert all(r["zeros_kept"] and r["clusters"] <= 2 ** r["bits"] for r in summary["layers"])
    code, text, err = run_here("huffman_encode", *common, "--coder=ans", capsys=capsys)
    assert code == 0, err
    path = f"{out}/separable.separable_net.dc"
    assert dcfile.decode_file(path)[1]["model"]["name"] == "separable.py:separable_net"  # no local folders
    registry.clear()  # decoding in a new process, the factory not named
    code, text, err = run_here("huffman_encode", f"--decode={path}", f"--out_dir={out}", f"--data_root={root}",
                               capsys=capsys)
    assert code == 2 and "whose code runs only when you name it" in err
    code, text, err = run_here("huffman_encode", *common, f"--decode={path}", f"--data_root={root}",
                               "--runtime=sparse", f"--export={out}/plain.pt", capsys=capsys)
    assert code == 0, err
    compressed = json.load(open(f"{out}/separable.separable_net_compressed.json"))
    assert f"({compressed['accuracy']['decoded']:.2f}%)" in text  # the sparse runtime tests as the file does
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import separable
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    plain = separable.separable_net((3, 16, 16), 3, width=8)
    plain.load_state_dict(torch.load(f"{out}/plain.pt", weights_only=True, map_location="cpu"))


# --- the automatic recipe -----------------------------------------------------------------------

def test_automatic_recipe_searches_on_validation_within_its_budget(tmp_path, fake_mnist, capsys):
    out = str(tmp_path)
    code, text, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--epochs=2",
                               "--retrain_epochs=2", "--search_probes=2", "--max_drop=2.0", "--batch_size=32", "--augment=none",
                               capsys=capsys)
    assert code == 0, err
    pruned = json.load(open(f"{out}/lenet_300_100_pruned.json"))
    search = pruned["search"]
    # budget: the probes retrain as long as one retraining does
    assert [p["epochs"] for p in search["probes"]] == [1, 1]
    assert sum(p["epochs"] for p in search["probes"]) + len(pruned["history"]["retrain1"]) == 2 * 2
    # bisection on log(alive): the choice is the sparsest probe within, and pruning holds it
    for p in search["probes"]:
        assert p["within"] == (p["validation"] >= search["target"])
    within = [p["alive"] for p in search["probes"] if p["within"]]
    assert search["alive"] == (min(within) if within else 1.0)
    alive = pruned["params"]["nonzero"] / pruned["params"]["total"]
    assert alive == pytest.approx(search["alive"], abs=0.01)
    code, text, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={out}", "--max_drop=2.0",
                               "--finetune_epochs=1", capsys=capsys)
    assert code == 0, err
    q = json.load(open(f"{out}/lenet_300_100_quantized.json"))
    s = q["search"]
    assert s["floor"] == pytest.approx(pruned["validation"]["dense"] - 2.0)
    assert all(t["within"] == (t["validation"] >= s["floor"]) for t in s["trials"])
    assert {r["name"]: r["bits"] for r in q["layers"]} == s["bits"]
    assert any(t["within"] and t["bits"] == s["bits"] for t in s["trials"])  # the choice was measured
    assert s["within"] == (q["validation"]["quantized"] >= s["floor"]) and s["within"]


def test_where_the_bytes_go_by_kind_of_layer():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import where_bytes
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    q = dict(kind="quantized")
    rows = [dict(q, name="dw", shape=[8, 1, 3, 3], params=72, nonzero=72, bytes=30),
            dict(q, name="g", shape=[8, 2, 3, 3], params=144, nonzero=40, bytes=20),
            dict(q, name="pw", shape=[16, 8, 1, 1], params=128, nonzero=30, bytes=25),
            dict(q, name="c", shape=[8, 3, 3, 3], params=216, nonzero=50, bytes=35),
            dict(q, name="fc", shape=[10, 16], params=160, nonzero=16, bytes=10),
            dict(kind="raw", name="bn.weight", shape=[8], params=8, bytes=16)]
    table = where_bytes.where(dict(layers=rows, header_bytes=14, compressed_bytes=150), {"dw": 8, "g": 4, "pw": 1, "c": 1})
    assert {k: v["bytes"] for k, v in table.items()} == {"depthwise conv": 30, "grouped conv": 20, "pointwise conv": 25,
                                                         "conv": 35, "fc": 10, "stored whole": 16, "header": 14}
    assert sum(v["share"] for v in table.values()) == pytest.approx(1.0)


def test_bit_search_trials_cluster_the_original_weights():
    import copy

    import quantization
    import training

    torch.manual_seed(0)
    net = nn.Sequential(prune.MaskedLinear(16, 32), nn.ReLU(), prune.MaskedLinear(32, 5))
    x = torch.randn(400, 16)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the float network gets all right
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = dict(init="linear", seed=0, entropy_weight={"*": 0.0})
    bits, trials = quantization.search_bits(net, cfg, [(x, y)], 97.0, CPU)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the weights come back
    for t in trials:  # each trial is the network clustered from its original weights at those bits
        trial = copy.deepcopy(net)
        quantize.quantize_model(trial, {"0": t["bits"]["0"], "2": t["bits"]["2"]})
        assert training.percent(*training.evaluate(trial, [(x, y)])[1:]) == pytest.approx(t["validation"])
        assert t["within"] == (t["validation"] >= 97.0)
    assert trials[-1]["within"] or bits != trials[-1]["bits"]
    assert any(t["within"] and t["bits"] == bits for t in trials)
