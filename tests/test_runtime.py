"""The plain export and the sparse runtime (runtime.py): kernels against dense products on
hand-made shapes, layers and whole decoded models against the plain export, and the
--export / --runtime options of huffman_encode.py --decode."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import dcfile
import huffman_encode
import runtime as rt
import util
from models import build_model
from prune import MASKED, masked_layers
from quantize import build_quantized_model
from conftest import SMALL, quantized_state


def random_csr_case(rows, cols, density, k=32, seed=0):
    """A random weight in codebook-CSR form and its dense (rows, cols) float32 equivalent."""
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) < density
    codebook = rng.standard_normal(k).astype(np.float32)
    cluster = rng.integers(0, k, (rows, cols))
    dense = np.where(mask, codebook[cluster], 0).astype(np.float32)
    row_ptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    col = np.nonzero(mask)[1].astype(np.uint16 if cols <= 2 ** 16 else np.int32)
    return row_ptr, col, cluster[mask].astype(np.uint8), codebook, dense


@pytest.mark.parametrize("rows,cols,density", [(7, 5, 0.0), (64, 300, 0.05), (33, 17, 0.5), (10, 100, 1.0),
                                               (300, 784, 0.02)])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_kernel_equals_the_dense_product(rows, cols, density, n):
    row_ptr, col, cluster, codebook, dense = random_csr_case(rows, cols, density)
    x = np.random.default_rng(1).standard_normal((cols, n)).astype(np.float32)
    got = rt.spmm(row_ptr, col, cluster, codebook, x)
    assert got.shape == (rows, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, dense @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols,density", [(7, 5, 0.0), (64, 300, 0.05), (33, 17, 0.5), (10, 100, 1.0),
                                               (300, 784, 0.02), (40, 70000, 0.01)])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_packed_kernel_equals_the_dense_product(rows, cols, density, n):
    row_ptr, col, cluster, codebook, dense = random_csr_case(rows, cols, density)
    form = dict(row_ptr=row_ptr, col=col, cluster=cluster, codebook=codebook)
    packed = rt.pack(form)
    if cols > 2 ** 16:  # a column needs 17 bits: the split layout only
        assert packed is None
        return
    # each word holds its column in the low 16 bits and its cluster above them
    assert packed["packed"].dtype == np.uint32
    assert np.array_equal(packed["packed"] & 0xFFFF, col) and np.array_equal(packed["packed"] >> 16, cluster)
    x = np.random.default_rng(1).standard_normal((cols, n)).astype(np.float32)
    got = rt.multiply(packed, x)
    assert got.shape == (rows, n) and got.dtype == np.float32
    tol = 1e-5 * np.sqrt(max(1.0, cols * density))  # float32 sums of ~cols x density terms, in any order
    np.testing.assert_allclose(got, dense.astype(np.float64) @ x, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(rt.multiply(form, x), got, rtol=1e-5, atol=tol)  # the split layout alike
    np.testing.assert_allclose(rt.multiply(packed, x, gather=True), got, rtol=1e-5, atol=tol)  # the gather loop


def test_pack_refuses_what_does_not_fit_16_bits():
    form = dict(row_ptr=np.array([0, 1], np.int32), col=np.array([2 ** 16 - 1], np.uint16),
                cluster=np.array([2 ** 16 - 1], np.uint16), codebook=np.zeros(2 ** 16, np.float32))
    assert rt.pack(form)["packed"].tolist() == [2 ** 32 - 1]  # the largest column and cluster fit
    assert rt.pack(dict(form, codebook=np.zeros(2 ** 16 + 1, np.float32))) is None
    assert rt.pack(dict(form, col=form["col"].astype(np.int32))) is None  # a layer of more than 65,536 inputs


def test_large_codebooks_keep_their_cluster_indices():
    layer = nn.Linear(300, 400, bias=False)  # pruned, not quantized: 120,000 distinct values
    with torch.no_grad():
        layer.weight.copy_(torch.arange(120000, dtype=torch.float32).reshape(400, 300) / 120000 - 0.5)
    layer.mask = torch.ones_like(layer.weight)
    form = rt.csr_from_layer(layer)
    assert len(form["codebook"]) == 120000 and form["cluster"].dtype == np.int32
    x = np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32)
    np.testing.assert_allclose(rt.multiply(form, x), layer.weight.detach().numpy() @ x, rtol=1e-4, atol=1e-4)


def test_kernel_empty_rows_and_a_single_non_zero():
    row_ptr = np.array([0, 0, 1, 1], np.int32)  # rows 0 and 2 empty; row 1 holds w[1, 3]
    col, cluster = np.array([3], np.uint16), np.array([2], np.uint8)
    codebook = np.array([0.5, -1.0, 2.5], np.float32)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert rt.spmm(row_ptr, col, cluster, codebook, x).tolist() == [[0, 0], [15, 17.5], [0, 0]]
    packed = rt.pack(dict(row_ptr=row_ptr, col=col, cluster=cluster, codebook=codebook))
    assert rt.multiply(packed, x).tolist() == [[0, 0], [15, 17.5], [0, 0]]
    assert rt.multiply(packed, x[:, :1]).tolist() == [[0], [15], [0]]


def test_parallel_and_serial_kernels_agree():
    row_ptr, col, cluster, codebook, _ = random_csr_case(500, 900, 0.2)
    x = np.random.default_rng(2).standard_normal((900, 4)).astype(np.float32)
    a, b = (np.empty((500, 4), np.float32) for _ in range(2))
    rt._spmm_serial(row_ptr, col, cluster, codebook, x, a)
    rt._spmm_parallel(row_ptr, col, cluster, codebook, x, b)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    packed = rt.pack(dict(row_ptr=row_ptr, col=col, cluster=cluster, codebook=codebook))
    args = (packed["row_ptr"], packed["packed"], packed["codebook"])
    c, d = np.empty((500, 4), np.float32), np.empty((500, 4), np.float32)
    rt._spmm_packed_serial(*args, x, c)
    rt._spmm_packed_parallel(*args, x, d)
    np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
    v = np.ascontiguousarray(x[:, 0])  # batch 1, compiled scalar
    c, d = np.empty(500, np.float32), np.empty(500, np.float32)
    rt._call_scalar(rt._spmm_packed_serial, *args, v, c)
    rt._call_scalar(rt._spmm_packed_parallel, *args, v, d)
    np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, a[:, 0], rtol=1e-5, atol=1e-5)


def masked_conv(cin, cout, k, stride, padding, dilation, groups, density, bias, seed=0):
    """A MaskedConv2d at `density`, its surviving weights on a 16-value grid (a codebook)."""
    from prune import MaskedConv2d
    g = torch.Generator().manual_seed(seed)
    layer = MaskedConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-8, 8, layer.weight.shape, generator=g) / 8)
        if bias:
            layer.bias.copy_(torch.randn(cout, generator=g))
    layer.mask.copy_((torch.rand(layer.weight.shape, generator=g) < density).float())
    if cout > 2:
        layer.mask[1] = 0  # an empty filter: its output is the bias alone
    return layer.eval()


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups", [
    (3, 8, 3, 1, 1, 1, 1), (4, 6, 3, 2, 1, 1, 1), (5, 7, 5, 1, 0, 1, 1), (4, 4, 3, 1, 2, 2, 1),
    (6, 9, (3, 1), (2, 1), (1, 0), 1, 3), (8, 8, 3, 2, 1, 1, 8), (8, 8, 3, 1, 1, 1, 8), (6, 10, 1, 1, 0, 1, 1),
    (6, 10, 1, 2, 0, 1, 1), (3, 5, 4, 3, 2, (1, 2), 1), (16, 16, (2, 3), (3, 2), (0, 1), 1, 4)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_sparse_conv_equals_conv2d(cin, cout, k, stride, padding, dilation, groups, density):
    """Direct sparse convolution (both kernels) against F.conv2d over strides, padding,
    dilation, groups (depthwise included), batches 1 and 3, odd sizes, empty filters."""
    layer = masked_conv(cin, cout, k, stride, padding, dilation, groups, density, bias=density > 0)
    plain = rt.plain_layer(layer)
    for parallel in (False, True):
        sparse = rt.SparseConv2d(layer, parallel=parallel)
        for n, hw in ((1, (11, 9)), (3, (8, 13)), (1, (11, 9))):  # the second (11, 9) reuses its offsets
            x = torch.randn(n, cin, *hw, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                want, got = plain(x), sparse(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert set(sparse._plans) == {(11, 9), (8, 13)}
        with pytest.raises(ValueError, match="input channels"):
            sparse(torch.randn(1, cin + 1, 11, 9))
    with pytest.raises(ValueError, match="smaller than the padded kernel"):
        rt.SparseConv2d(masked_conv(2, 3, 3, 1, 0, 1, 1, 0.5, True))(torch.randn(1, 2, 2, 5))


def test_fastest_form_is_recorded_and_every_form_agrees(tmp_path):
    """to_sparse times each layer's forms on its own input and records the one it runs; every
    form it can pick gives the plain network's outputs."""
    net = quantized_net("resnet20", {"in_shape": [3, 16, 16], "num_classes": 10}, density=0.2)
    x = torch.randn(2, 3, 16, 16)
    sparse, chosen, folded = rt.to_sparse(net, x[:1])
    # a ResNet block calls its batch norms and ReLUs in forward(): every conv takes its batch norm
    assert folded == [n for n, m in masked_layers(net) if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    assert set(chosen) == {n for n, _ in masked_layers(net)}
    assert set(chosen.values()) <= set(rt.FORMS)
    runs = dict(sparse.named_modules())
    for name, form in chosen.items():
        kind = {"dense": (nn.Conv2d, nn.Linear), "sparse": (rt.SparseConv2d, rt.SparseLinear),
                "sparse-parallel": rt.SparseConv2d, "sparse-gemm": rt.SparseConv2d}[form]
        layer = runs[name]
        if form == "dense" and isinstance(layer, nn.Sequential):  # a dense conv with its ReLU folded in
            assert isinstance(layer[1], nn.ReLU)
            layer = layer[0]
        assert isinstance(layer, kind) and not isinstance(layer, MASKED)
    with torch.no_grad():
        want = rt.to_plain(net)(x)
        torch.testing.assert_close(sparse(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        # every conv forced sparse gives the same outputs
        forced = rt._replace(copy.deepcopy(net), lambda _, m: rt.SparseLinear(m) if isinstance(m, nn.Linear)
                             else rt.SparseConv2d(m, parallel=True))
        torch.testing.assert_close(forced(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_network_slower_as_a_whole_runs_dense(monkeypatch):
    """Where every layer timed alone chose a sparse form but the network so built loses to the
    all-dense one, every layer runs dense; where it wins, the choice stands."""
    net = quantized_net("lenet5_caffe", {"in_shape": [1, 28, 28], "num_classes": 10}, density=0.2)
    x = torch.randn(1, 1, 28, 28)
    for whole in ("dense", "chosen"):
        monkeypatch.setattr(rt, "fastest", lambda candidates, x, whole=whole: whole if "chosen" in candidates
                            else next(k for k in candidates if k != "dense"))
        fast, chosen, _ = rt.to_sparse(net, x)
        assert set(chosen.values()) == ({"dense"} if whole == "dense" else {"sparse"})
        assert all(not isinstance(m, (rt.SparseConv2d, rt.SparseLinear)) for m in fast.modules()) == (whole == "dense")
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


def test_epilogue_folds_bias_batch_norm_and_activation():
    """Known answers: scale = gamma / sqrt(var + eps), shift = (bias - mean) * scale + beta,
    clamped to ReLU's [0, inf) or ReLU6's [0, 6]."""
    bn = nn.BatchNorm2d(2, eps=1.0).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
        bn.running_var.copy_(torch.tensor([3.0, 0.0]))
        bn.weight.copy_(torch.tensor([2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.25, -4.0]))
    e = rt.epilogue(2, torch.tensor([1.0, 2.0]), bn, nn.ReLU6())
    np.testing.assert_allclose(e, [[1.0, 3.0], [0.75, 5.0], [0.0, 0.0], [6.0, 6.0]])
    e = rt.epilogue(2, None, None, nn.ReLU())
    np.testing.assert_allclose(e, [[1, 1], [0, 0], [0, 0], [np.inf, np.inf]])
    assert np.isneginf(rt.epilogue(3)[2]).all() and np.isposinf(rt.epilogue(3)[3]).all()


def test_batch_norm_and_activation_fold_into_every_form():
    """conv, BatchNorm2d, ReLU / ReLU6 in one nn.Sequential run as one layer in each form, the
    batch norms leave the model, and the outputs stay the plain network's."""
    from prune import MaskedConv2d, MaskedLinear
    torch.manual_seed(0)
    net = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                        MaskedConv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        MaskedConv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Flatten(), MaskedLinear(4 * 5 * 5, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
        if isinstance(m, MASKED):
            m.mask.copy_((torch.rand_like(m.mask) < 0.5).float())
    net.eval()
    x = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        want = net(x)
        for forms in (rt.FORMS, ("dense",), ("sparse",), ("sparse-parallel",), ("sparse-gemm",)):
            fast, chosen, folded = rt.to_sparse(net, x[:1], forms)
            assert folded == ["0", "3", "6"]
            assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
            if "dense" not in chosen.values():  # a sparse conv applies its activation itself
                assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in fast.modules())
            # the depthwise conv has no gemm path: it runs dense there
            assert chosen["3"] == ("dense" if forms == ("sparse-gemm",) else chosen["3"])
            assert set(chosen.values()) <= set(forms) | {"dense"}
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)


def test_fold_plan_follows_forward_and_stops_where_it_would_change_the_network():
    """Known answers on a ResNet block: conv1 -> bn1 -> F.relu folds whole; conv2 -> bn2 folds
    without the ReLU that follows the shortcut's sum; a conv whose output also feeds the
    shortcut keeps its batch norm, and so does a conv called twice; a network torch.fx cannot
    trace, or whose trace computes something else (a branch on an argument's default), folds
    nothing."""
    from prune import MaskedConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = MaskedConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = MaskedConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv3, self.bn3 = MaskedConv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)) + x)
            y = self.conv3(out)
            return self.bn3(y) + y

    class Twice(Block):
        def forward(self, x):
            return self.conv3(F.relu(self.bn3(self.conv3(x))))

    class Branchy(Block):
        def forward(self, x):
            return self.bn1(self.conv1(x)) if x.sum() > 0 else x

    class Optional(Block):
        def forward(self, x, scale=None):
            y = F.relu(self.bn1(self.conv1(x)))
            return y if scale is None else y * scale

    def made(cls):
        net = cls().eval()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
        return net

    net, x = made(Block), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = net(x)
        traced, folds = rt.fold_plan(copy.deepcopy(net), x[:1])
        assert {type(k) for k in folds} == {MaskedConv2d} and len(folds) == 2
        (bn1, act1), (bn2, act2) = folds.values()
        assert isinstance(bn1, nn.BatchNorm2d) and isinstance(act1, nn.ReLU) and act2 is None
        fast, chosen, folded = rt.to_sparse(net, x[:1])
        assert folded == ["conv1", "conv2"]
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        for cls in (Twice, Branchy, Optional):
            other = made(cls)
            assert rt.fold_plan(other, x[:1]) == (other, {}), cls.__name__
            fast, _, folded = rt.to_sparse(other, x[:1])
            assert folded == [] and type(fast) is cls
            torch.testing.assert_close(fast(x), other(x), rtol=1e-5, atol=1e-5)


def quantized_net(name, kwargs, density=0.1, seed=0):
    state, args, quantized = quantized_state(name, kwargs, density=density, seed=seed)
    net = build_quantized_model(args, quantized)
    net.load_state_dict(state)
    return net.eval()


def test_sparse_layers_equal_plain_layers():
    torch.manual_seed(0)
    net = quantized_net("lenet5_caffe", {"in_shape": [1, 28, 28], "num_classes": 10}, density=0.2)
    for name, layer in masked_layers(net):
        plain = rt.plain_layer(layer)
        linear = isinstance(layer, nn.Linear)
        shape = (plain.in_features,) if linear else (layer.in_channels, 12, 12)
        for sparse in ([rt.SparseLinear(layer), rt.SparseLinear(layer, torch.randn(1, *shape))] if linear
                       else [rt.SparseConv2d(layer)]):
            for n in (1, 5):
                x = torch.randn(n, *shape)
                want = plain(x)
                torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            # 3 bytes a non-zero (split) or 4 (packed), int32 row pointers, the float32 codebook
            nnz, rows, k = int(layer.mask.sum()), len(layer.mask), len(layer.codebook)
            assert sparse.resident_bytes() == (3 if sparse.layout == "split" else 4) * nnz + 4 * (rows + 1 + k)
            assert sparse.layout in ("split", "packed", "gather")
            assert sparse.resident_bytes() < 4 * layer.mask.numel()  # 20% dense


def test_plain_export_of_resnet18_loads_strictly_into_torchvision():
    kwargs = {"in_shape": [3, 32, 32], "num_classes": 10, "pretrained": False, "cifar_stem": True}
    net = quantized_net("resnet18", kwargs, density=0.05)
    plain = rt.to_plain(net).state_dict()
    assert not any(k.endswith((".mask", ".codebook", ".index")) for k in plain)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # the same two stem changes
    reference.maxpool = nn.Identity()
    reference.load_state_dict(plain, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), net(x), rtol=1e-5, atol=1e-5)


def test_plain_export_of_a_lenet_loads_into_its_mask_free_model():
    net = quantized_net("lenet_300_100", SMALL)
    target = rt.to_plain(build_model("lenet_300_100", **SMALL))
    assert not any(k.endswith(".mask") for k in target.state_dict())
    target.load_state_dict(rt.to_plain(net).state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), net(x))


def write_file(tmp_path, name, kwargs, density=0.1):
    state, args, quantized = quantized_state(name, kwargs, density=density)
    blob, _ = dcfile.encode_model(state, args, quantized,
                              info=dict(data=dict(dataset="mnist", subset=40, test_batch_size=20)))
    path = tmp_path / f"{name}.dc"
    path.write_bytes(blob)
    return str(path)


@pytest.mark.parametrize("name,kwargs", [("lenet_300_100", {"in_shape": [1, 28, 28], "num_classes": 10}),
                                         ("lenet5_caffe", {"in_shape": [1, 28, 28], "num_classes": 10})])
def test_three_runtimes_give_the_same_outputs(tmp_path, name, kwargs):
    path = write_file(tmp_path, name, kwargs)
    quantized, _ = dcfile.load_compressed(path)
    dense, _ = rt.load(path, runtime="dense")
    sparse, header = rt.load(path, runtime="sparse")
    assert set(header["runtime"]) == {n for n, _ in masked_layers(quantized)}
    assert set(header["runtime"].values()) <= set(rt.FORMS)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = quantized(x)
        torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="unknown runtime"):
        rt.load(path, runtime="csr")


def test_export_and_runtime_from_the_command_line(tmp_path, fake_mnist, capsys):
    path = write_file(tmp_path, "lenet_300_100", {"in_shape": [1, 28, 28], "num_classes": 10})
    out = tmp_path / "plain.pt"
    args = [f"--decode={path}", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}", "--device=cpu"]
    accuracies = []
    for runtime in rt.RUNTIMES:
        util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, args + [f"--runtime={runtime}", f"--export={out}"])
        text = capsys.readouterr().out
        accuracies.append(text.split("Accuracy: ")[1].split()[0])
    assert len(set(accuracies)) == 1  # the same test accuracy in all three runtimes
    plain = torch.load(out, weights_only=True, map_location="cpu")
    assert set(plain) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    net = rt.to_plain(build_model("lenet_300_100"))
    net.load_state_dict(plain, strict=True)

    bad = tmp_path / "bad.dc"
    bad.write_bytes(open(path, "rb").read()[:-5])
    fresh = tmp_path / "fresh.pt"
    with pytest.raises(SystemExit) as e:
        util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, [f"--decode={bad}", f"--export={fresh}", f"--out_dir={tmp_path}"])
    assert e.value.code == 2 and "truncated" in capsys.readouterr().err
    assert not os.path.exists(fresh)
    with pytest.raises(SystemExit) as e:
        util.run_stage(huffman_encode.main, huffman_encode.SETTINGS, [f"--export={fresh}"])
    assert e.value.code == 2 and "give --decode" in capsys.readouterr().err
