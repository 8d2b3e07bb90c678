"""quantize.py: 1-D k-means, entropy-constrained clustering, quantized and ternary layers and
their gradients."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import datasets
import quantize
import training
import util
from conftest import CPU
from datasets import DataSpec
from models import build_model
from prune import MaskedConv2d, MaskedLinear, masked_layers, prune_by_percentile
from quantize import (KMEANS_INITS, QuantizedConv2d, QuantizedLinear, TernaryConv2d, build_quantized_model,
                      entropy_constrained, index_dtype, kmeans_1d, load_quantized, quantize_model, ternarize,
                      ternary_to_quantized, to_quantized, to_ternary)


def inertia(x, centroids, labels):
    """Within-cluster sum of squares (the objective of section 3.1, eq. 1), in float64."""
    return float(((x.double() - centroids.double()[labels]) ** 2).sum())


@pytest.mark.parametrize("init", KMEANS_INITS)
def test_kmeans_known_answer(init):
    x = torch.tensor([5.1, 0.9, 10.0, 1.0, 4.9, 1.1, 5.0, 10.2])
    c, labels = kmeans_1d(x, 3, init=init)
    assert c.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.allclose(c, torch.tensor([1.0, 5.0, 10.1]))
    assert labels.tolist() == [1, 0, 2, 0, 1, 0, 1, 2]


def test_kmeans_lloyd_from_linear_init_by_hand():
    # linear init on [0, 10] with k=2: centroids 0 and 10, midpoint 5 -> {0, 1, 2, 4} | {6, 10}
    # -> means 1.75 and 8, midpoint 4.875 -> same split: converged.
    x = torch.tensor([0.0, 1.0, 2.0, 4.0, 6.0, 10.0])
    c, labels = kmeans_1d(x, 2)
    assert c.tolist() == [1.75, 8.0] and labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_kmeans_reseeds_empty_clusters_in_the_pruned_gap():
    # Two tails as pruning leaves them: linear init puts 2 of the 4 centroids in the empty gap
    # (-1/3, 1/3). They are re-seeded, not wasted: 4 non-empty clusters.
    x = torch.tensor([-1.0, -0.95, -0.9, -0.8, 0.8, 0.85, 0.9, 1.0])
    c, labels = kmeans_1d(x, 4, init="linear")
    assert len(c) == 4 and torch.bincount(labels).min() > 0
    assert (c.abs() > 0.5).all()  # no centroid left in the gap
    two = kmeans_1d(x, 2)
    assert inertia(x, c, labels) < 0.5 * inertia(x, *two)
    # the same with many points: every one of 32 codes is used
    tails = torch.cat([torch.linspace(-0.3, -0.05, 500), torch.linspace(0.05, 0.3, 500)])
    c, labels = kmeans_1d(tails, 32, init="linear")
    assert len(c) == 32 and len(labels.unique()) == 32 and not ((c > -0.05) & (c < 0.05)).any()


def test_kmeans_drops_clusters_only_with_fewer_distinct_values():
    c, labels = kmeans_1d(torch.tensor([2.0, 1.0, 2.0, 1.0, 1.0]), 8)
    assert c.tolist() == [1.0, 2.0] and labels.tolist() == [1, 0, 1, 0, 0]
    c, labels = kmeans_1d(torch.tensor([3.0]), 4)
    assert c.tolist() == [3.0] and labels.tolist() == [0]
    c, labels = kmeans_1d(torch.zeros(0), 4)
    assert c.shape == (0,) and labels.shape == (0,)


def check_quantized(net, bits, pruned_zeros):
    """Every quantized layer: <= 2**bits distinct non-zero values, zeros exactly where the
    pruned model had them, and the checkpoint layout stage 3 relies on."""
    state = net.state_dict()
    for name, m in masked_layers(net):
        assert isinstance(m, (QuantizedLinear, QuantizedConv2d)), name
        w = m.weight.detach()
        assert len(w[w != 0].unique()) <= 2 ** bits[name], name
        assert torch.equal(w == 0, pruned_zeros[name]), name
        assert name + ".weight" not in state
        assert state[name + ".codebook"].dtype == torch.float32 and state[name + ".codebook"].dim() == 1
        assert state[name + ".index"].dtype == index_dtype(len(m.codebook))
        assert state[name + ".index"].shape == w.shape == state[name + ".mask"].shape
        assert (state[name + ".index"][m.mask == 0] == 0).all()
        assert torch.equal(w, m.codebook.detach()[m.index.long()] * m.mask)



def code_entropy(labels):
    """Bits per symbol of the label stream (what stage 3's entropy coders approach)."""
    p = torch.bincount(labels).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def test_entropy_constrained_known_answer():
    # One weight at -1 and twelve at 1, k-means' 2 centroids. var = 48/169; moving the -1 to
    # the other cluster costs (-1 - 1)^2 = 4 of distortion and shortens its code from
    # log2(13) to log2(13/12) bits, 3.585 bits: it moves when lambda = weight x var > 4 / 3.585,
    # i.e. weight > 3.93. Then one cluster is left, at the mean 11/13.
    x = torch.tensor([-1.0] + [1.0] * 12)
    c, labels = kmeans_1d(x, 2)
    kept_c, kept = entropy_constrained(x, c, 3.5)
    assert kept_c.tolist() == [-1.0, 1.0] and torch.equal(kept, labels)
    merged_c, merged = entropy_constrained(x, c, 4.5)
    assert torch.allclose(merged_c, torch.tensor([11 / 13])) and merged.tolist() == [0] * 13
    # weight 0 is k-means; an empty input stays empty
    assert torch.equal(entropy_constrained(x, c, 0.0)[1], labels)
    assert entropy_constrained(torch.zeros(0), torch.zeros(0), 1.0)[1].shape == (0,)

@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([0.01, 0.1, 0.5]))
def test_entropy_constrained_assignment_and_rate(seed, weight):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(3000, generator=g) * 0.1, torch.randn(50, generator=g) * 0.5])
    c0, l0 = kmeans_1d(x, 16)
    c, labels = entropy_constrained(x, c0, weight)
    # every cluster used, centroids ascending, each the mean of its cluster
    assert len(c) <= 16 and len(labels.unique()) == len(c) and (c[1:] > c[:-1]).all()
    means = torch.zeros(len(c), dtype=torch.float64).index_add_(0, labels, x.double()) / torch.bincount(labels)
    assert torch.allclose(c.double(), means, atol=1e-6)
    # each weight's cluster minimises (w - c)^2 + lambda x code length (the rule of the method)
    lam = weight * x.double().var(unbiased=False)
    length = -(torch.bincount(labels).double() / len(x)).log2()
    cost = (x.double()[:, None] - c.double()[None]) ** 2 + lam * length[None]
    assert (cost.gather(1, labels[:, None])[:, 0] <= cost.min(1).values + 1e-9).all()
    # distortion + lambda x rate is no worse than k-means', and the codes are no longer
    def objective(c, labels):
        return inertia(x, c, labels) / len(x) + float(lam) * code_entropy(labels)
    assert objective(c, labels) <= objective(c0, l0) + 1e-9
    assert code_entropy(labels) <= code_entropy(l0) + 1e-9


def test_kmeans_bad_arguments():
    with pytest.raises(ValueError, match="unknown init 'uniform'"):
        kmeans_1d(torch.ones(3), 2, init="uniform")
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans_1d(torch.ones(3), 0)

@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.floats(-1, 1, width=32), st.sampled_from([-0.5, 0.25, 0.5, 1e-30, -3e-31])),
                min_size=1, max_size=60),
       st.integers(1, 9), st.sampled_from(KMEANS_INITS), st.integers(0, 3))
def test_kmeans_is_a_lloyd_fixed_point(values, k, init, seed):
    x = torch.tensor(values, dtype=torch.float32)
    c, labels = kmeans_1d(x, k, init=init, seed=seed)
    assert len(c) == min(k, len(x.unique()))  # no empty cluster, none dropped needlessly
    assert (c[1:] > c[:-1]).all()
    assert torch.equal(labels.unique(), torch.arange(len(c)))
    dist = (x.double()[:, None] - c.double()[None, :]).abs()
    assert (dist.gather(1, labels[:, None]).squeeze(1) <= dist.min(1).values + 1e-6).all()  # nearest
    for j in range(len(c)):  # each centroid is its cluster's mean
        assert c[j].item() == pytest.approx(x[labels == j].double().mean().item(), abs=1e-6)


def test_kmeans_on_pruned_like_data_beats_or_matches_a_plain_lloyd():
    # Reference: textbook O(n k) Lloyd from the same linear init, empty clusters left empty.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20_000, generator=g) * 0.05
    w = w[w.abs() > 0.05]
    c_ref = torch.linspace(float(w.min()), float(w.max()), 16, dtype=torch.float64)
    x = w.double()
    lab = None
    for _ in range(300):
        previous, lab = lab, (x[:, None] - c_ref[None, :]).abs().argmin(1)
        if previous is not None and torch.equal(lab, previous):
            break
        counts = torch.bincount(lab, minlength=16)
        sums = torch.zeros(16, dtype=torch.float64).index_add_(0, lab, x)
        c_ref = torch.where(counts > 0, sums / counts.clamp(min=1), c_ref)
    c, labels = kmeans_1d(w, 16)
    assert inertia(w, c, labels) <= inertia(w, c_ref, lab) * (1 + 1e-9)
    assert len(lab.unique()) < 16 == len(c)  # the plain version wastes codes in the gap


def test_index_dtype():
    assert index_dtype(1) == index_dtype(256) == torch.uint8
    assert index_dtype(257) == index_dtype(32768) == torch.int16
    assert index_dtype(32769) == index_dtype(65536) == torch.int32


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    layer = MaskedLinear(3, 2, bias=False)
    layer.mask.copy_(torch.tensor([[1.0, 0, 1], [1, 1, 0]]))
    to_quantized(layer, torch.tensor([-1.0, 0.5]), torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.uint8))
    assert isinstance(layer, QuantizedLinear) and isinstance(layer, MaskedLinear)
    assert layer.weight.tolist() == [[-1.0, 0.0, 0.5], [0.5, -1.0, 0.0]]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    layer(x).sum().backward()
    # dL/dW[i, j] = x[j]. Centroid 0 holds W[0,0] and W[1,1] (W[0,1], W[1,2] are pruned):
    # 1 + 2 = 3. Centroid 1 holds W[0,2] and W[1,0]: 3 + 1 = 4 (eq. 3 of the paper).
    assert layer.codebook.grad.tolist() == [3.0, 4.0]
    assert [n for n, _ in layer.named_parameters()] == ["codebook"]


def test_centroid_gradient_matches_dense_weight_gradients_summed_per_cluster():
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 4, 3)
    conv.mask.copy_((torch.rand_like(conv.mask) > 0.5).float())
    dense = MaskedConv2d(3, 4, 3)
    index = torch.randint(0, 5, conv.weight.shape, dtype=torch.uint8) * conv.mask.to(torch.uint8)
    codebook = torch.randn(5)
    dense.load_state_dict(conv.state_dict())
    with torch.no_grad():
        dense.weight.copy_(codebook[index.long()] * conv.mask)
    to_quantized(conv, codebook, index)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(conv(x), dense(x), atol=1e-6)
    (conv(x) ** 2).sum().backward()
    (dense(x) ** 2).sum().backward()
    grad_w = dense.weight.grad * dense.mask
    expected = torch.zeros(5).index_add_(0, index.flatten().long(), grad_w.flatten())
    assert torch.allclose(conv.codebook.grad, expected, atol=1e-5)
    assert torch.allclose(conv.bias.grad, dense.bias.grad)


def test_quantize_model_lenet5_caffe_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_model("lenet5_caffe")
    prune_by_percentile(net, {"conv": 40.0, "fc": 90.0})
    zeros = {n: m.weight.detach() == 0 for n, m in masked_layers(net)}
    quantized = quantize_model(net, {"conv": 8, "*": 5})
    assert quantized == {"conv1": dict(bits=8, clusters=256), "conv2": dict(bits=8, clusters=256),
                         "fc1": dict(bits=5, clusters=32), "fc2": dict(bits=5, clusters=32)}
    check_quantized(net, {n: q["bits"] for n, q in quantized.items()}, zeros)
    assert sorted(net.state_dict()) == sorted(f"{n}.{k}" for n in quantized for k in ("bias", "codebook", "index", "mask"))

    model_args = dict(name="lenet5_caffe", kwargs=dict(in_shape=[1, 28, 28], num_classes=10))
    path = str(tmp_path / "q.pt")
    util.save_checkpoint(path, "quantized", net, model_args, {}, {}, quantized=quantized)
    again, ckpt = load_quantized(path, CPU)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(again(x), net(x))
    fresh = build_quantized_model(model_args, quantized)
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(fresh(x), net(x))


def test_fine_tuning_moves_centroids_only(fake_mnist):
    torch.manual_seed(0)
    train, val, _ = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 200, 0.1), CPU)
    net = build_model("lenet_300_100")
    prune_by_percentile(net, 90.0)
    zeros = {n: m.weight.detach() == 0 for n, m in masked_layers(net)}
    quantize_model(net, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    training.fit(net, net.parameters(), train, val, 1, 1e-2, training.TrainOptions(weight_decay=0.0))
    after = net.state_dict()
    for name, m in masked_layers(net):
        assert torch.equal(after[name + ".index"], before[name + ".index"])
        assert torch.equal(after[name + ".mask"], before[name + ".mask"])
        assert not torch.equal(after[name + ".codebook"], before[name + ".codebook"])
    check_quantized(net, {n: 3 for n in zeros}, zeros)


def test_ternary_gradients_by_hand():
    """TTQ section 3 on a 2x3 tensor: t = 0.5 of max|latent| = 1.0 gives delta 0.5."""
    latent = torch.tensor([[1.0, 0.6, -0.2], [-0.8, 0.4, -0.55]], requires_grad=True)
    wp, wn = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    w = ternarize(latent, wp, wn, 0.5)
    assert w.tolist() == [[2.0, 2.0, 0.0], [-3.0, 0.0, -3.0]]
    g = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    (w * g).sum().backward()
    # dL/dwp: the sum over the positive set, 0.1 + 0.2; dL/dwn: minus the sum over the negative
    # set (w = -wn there), -(0.4 + 0.6); the latent weights: wp x g, 1 x g, wn x g (eq. 8).
    assert wp.grad.item() == pytest.approx(0.3) and wn.grad.item() == pytest.approx(-1.0)
    assert torch.allclose(latent.grad, torch.tensor([[0.2, 0.4, 0.3], [1.2, 0.5, 1.8]]))


def test_ternary_gradients_match_finite_differences_of_the_scales():
    torch.manual_seed(0)
    layer = to_ternary(MaskedConv2d(3, 4, 3), 0.05)
    x = torch.randn(2, 3, 6, 6)
    layer(x).square().sum().backward()
    for p in (layer.wp, layer.wn):  # the loss is smooth in the scales: the code is fixed
        with torch.no_grad():
            p += 1e-3
            up = layer(x).square().sum()
            p -= 2e-3
            down = layer(x).square().sum()
            p += 1e-3
        assert p.grad.item() == pytest.approx(((up - down) / 2e-3).item(), rel=1e-2)


def test_ternary_layer_keeps_pruned_zeros_and_freezes_to_the_same_weight():
    torch.manual_seed(0)
    layer = MaskedConv2d(4, 8, 3)
    layer.mask.copy_((torch.rand_like(layer.mask) < 0.5).float())
    dense = (layer.weight * layer.mask).detach().clone()
    to_ternary(layer, 0.05)
    assert isinstance(layer, TernaryConv2d) and isinstance(layer, MaskedConv2d)
    assert {n for n, _ in layer.named_parameters()} == {"latent", "wp", "wn", "bias"}
    w = layer.weight.detach()
    assert len(w.unique()) <= 3 and (w[layer.mask == 0] == 0).all()
    # the scales start at the mean magnitude of the weights they stand for
    top = dense.abs().max()
    assert layer.wp.item() == pytest.approx(dense[dense > 0.05 * top].mean().item())
    assert layer.wn.item() == pytest.approx(-dense[dense < -0.05 * top].mean().item())
    pruned = layer.mask == 0
    ternary_to_quantized(layer)
    assert isinstance(layer, QuantizedConv2d) and torch.equal(layer.weight.detach(), w)
    assert layer.codebook.numel() == 2 and layer.mask.sum() == (w != 0).sum() and (layer.mask[pruned] == 0).all()


# --- quantization.py as a user runs it ------------------------------------------------------


def test_round_to_grid_known_answers():
    # the largest |value| 0.7 takes 3 bits: step 2**(floor(log2 0.7) - 2) = 1/8
    t = torch.tensor([0.3, -0.7, -0.01])
    assert quantize.round_to_grid(t, 3) == -3
    assert t.tolist() == [0.25, -0.75, 0.0] and not torch.signbit(t).tolist()[2]  # -0.01 -> +0.0, not -0.0
    # one step for several tensors, from their joint largest value (3 in 2 bits: step 1)
    a, b = torch.tensor([1.0, 0.4]), torch.tensor([-3.0])
    assert quantize.round_to_grid([a, b], 2) == 0 and a.tolist() == [1.0, 0.0] and b.tolist() == [-3.0]
    zeros = torch.zeros(3)
    assert quantize.round_to_grid(zeros, 8) is None and zeros.tolist() == [0.0] * 3
    top = torch.tensor([torch.finfo(torch.float32).max, 1.0])  # rounds down, not past float32 to inf
    quantize.round_to_grid(top, 8)
    assert torch.isfinite(top).all() and top[0] > 0.99 * torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match="finite"):
        quantize.round_to_grid(torch.tensor([1.0, float("nan")]), 8)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=64), st.integers(2, 16))
def test_round_to_grid_moves_each_value_half_a_step_at_most(values, bits):
    t = torch.tensor(values, dtype=torch.float32)
    before = t.clone()
    e = quantize.round_to_grid(t, bits)
    if e is None:
        assert not before.any()
        return
    assert (t.double() - before.double()).abs().max() <= 2.0 ** e / 2
    n = t.double() / 2.0 ** e
    assert torch.equal(n, n.round()) and n.abs().max() <= 2 ** bits  # integers of `bits` bits (and the sign)
