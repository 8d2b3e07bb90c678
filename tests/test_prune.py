"""prune.py: the threshold rules, dynamic network surgery, the Erdos-Renyi-kernel densities,
the group lasso, dead units and sparse variational dropout, on hand-made tensors with known answers."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prune
from models import build_model
from prune import MaskedConv2d, MaskedLinear, drop_dead_units, masked_layers


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
    step = prune.GradualSurgery(model, {"0": 0.0}, 0.0, {"0": 0.2}, 4)
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


def test_prune_layers_fc_leaves_convs_dense():
    net = build_model("lenet5")
    prune.prune_by_std(net, 1.0, "fc")
    assert net.conv1.mask.all() and net.conv3.mask.all()
    assert not net.fc1.mask.all() and not net.fc2.mask.all()


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


def test_kernel_magnitudes_known_answer():
    w = torch.tensor([[[[3.0, -4.0], [0.0, 0.0]], [[1.0, 1.0], [-1.0, 1.0]]]])  # (1 filter, 2 channels, 2 x 2)
    # each weight scores its kernel's root mean square: sqrt((9 + 16) / 4) = 2.5 and 1
    assert prune.magnitudes(w, "kernel").tolist() == [[[[2.5, 2.5], [2.5, 2.5]], [[1.0, 1.0], [1.0, 1.0]]]]
    assert torch.equal(prune.magnitudes(w, "weight"), w.abs())
    fc = torch.tensor([[-2.0, 0.5]])
    assert torch.equal(prune.magnitudes(fc, "kernel"), fc.abs())  # an fc weight is its own kernel
    one = torch.tensor([[[[-3.0]], [[0.5]]]])
    assert torch.equal(prune.magnitudes(one, "kernel"), one.abs())  # and a 1 x 1 conv's
    runs = torch.tensor([[1.0, -2.0, 2.0, 4.0], [0.0, 0.0, 3.0, 0.0]])  # an fc read in runs of 2 inputs
    expected = [[(5 / 2) ** 0.5] * 2 + [10 ** 0.5] * 2, [0.0, 0.0] + [(9 / 2) ** 0.5] * 2]
    assert torch.allclose(prune.magnitudes(runs, "2"), torch.tensor(expected))


S = 0.75 ** 0.5


def kernel_layer():
    """A 2 x 2-kernel conv of 2 filters x 2 input channels whose kernels' root mean squares are
    s, 2s, 3s and 4s (filter-major, s = sqrt(3) / 2), each holding a weight above the next kernel's others."""
    layer = MaskedConv2d(2, 2, 2, bias=False)
    with torch.no_grad():
        for i, r in enumerate((1.0, 2.0, 3.0, 4.0)):  # the weights (0.5r, 0.5r, 0.5r, 1.5r): RMS = sqrt(0.75) r
            layer.weight[i // 2, i % 2] = torch.tensor([[0.5, -0.5], [0.5, -1.5]]) * r
    return layer


def test_kernel_granular_pruning_and_surgery_keep_whole_kernels():
    layer = kernel_layer()
    net = nn.Sequential(layer)
    t = prune.prune_by_percentile(net, {"0": 50.0}, surgery=True, granularity="kernel")
    # by single magnitudes the 50% kept would mix kernels (kernel 1's 1.5 x 2 = 3 beats kernel 3's 0.5 x 4);
    # by kernel the two strongest kernels are kept whole, and surgery keeps the rest to splice back
    assert t["0"] == pytest.approx(3 * S) and layer.mask[:, :, 0, 0].tolist() == [[0, 0], [1, 1]]
    assert (layer.mask == layer.mask[:, :, :1, :1]).all() and layer.weight.abs().min() > 0
    thresholds = {"0": 0.0}
    prune.surgery_step(net, thresholds, band=0.0, densities={"0": 0.25}, granularity="kernel")
    assert float(thresholds["0"]) == pytest.approx(3.5 * S)  # halfway between RMS 3s dropped and 4s kept
    assert layer.mask[:, :, 0, 0].tolist() == [[0, 0], [0, 1]] and (layer.mask == layer.mask[:, :, :1, :1]).all()
    with torch.no_grad():  # kernel 0 grows past the others: it is spliced back whole, kernel 3 pruned whole
        layer.weight[0, 0] *= 10
    prune.surgery_step(net, thresholds, band=0.0, densities={"0": 0.25}, granularity="kernel")
    assert layer.mask[:, :, 0, 0].tolist() == [[1, 0], [0, 0]] and (layer.mask == layer.mask[:, :, :1, :1]).all()
    # the band acts on a kernel's magnitude: at density 50% kernel 3 (RMS 4s) would be spliced back, but it lies
    # inside t = 3.5s +- 50% and keeps its state
    prune.surgery_step(net, thresholds, band=0.5, densities={"0": 0.5}, granularity="kernel")
    assert layer.mask[:, :, 0, 0].tolist() == [[1, 0], [0, 0]]
    step = prune.GradualSurgery(net, {"0": 0.0}, 0.0, {"0": 0.5}, 0, "kernel")
    step()
    assert layer.mask[:, :, 0, 0].tolist() == [[1, 0], [0, 1]] and (layer.mask == layer.mask[:, :, :1, :1]).all()
    # the std rule on kernels: a kernel is kept when its root mean square reaches sensitivity x the weights' std
    layer = kernel_layer()
    std = float(layer.weight.detach().std())
    t = prune.prune_by_std(nn.Sequential(layer), 1.2, granularity="kernel")["0"]
    assert t == pytest.approx(1.2 * std)  # 2.84: kernels of RMS 3s = 2.6 and below go, 4s = 3.46 stays
    assert layer.mask[:, :, 0, 0].tolist() == [[0, 0], [0, 1]] and (layer.mask == layer.mask[:, :, :1, :1]).all()
    assert (layer.weight[0] == 0).all() and (layer.weight[1, 0] == 0).all()  # not surgery: pruned weights zeroed
    # scaled thresholds (sensitivity x the std of all the weights, surgery keeps them) on kernels: scale-free
    layer = kernel_layer()
    net = nn.Sequential(layer)
    prune.surgery_step(net, {"0": 0.0}, band=0.0, sensitivities={"0": 1.2}, granularity="kernel")
    assert layer.mask[:, :, 0, 0].tolist() == [[0, 0], [0, 1]] and (layer.mask == layer.mask[:, :, :1, :1]).all()
    with torch.no_grad():
        layer.weight.mul_(10)
    prune.surgery_step(net, {"0": 0.0}, band=0.0, sensitivities={"0": 1.2}, granularity="kernel")
    assert layer.mask[:, :, 0, 0].tolist() == [[0, 0], [0, 1]]
    # a held count that is not a whole number of kernels (30% of 16 = 5 weights): the threshold lands on the
    # straddling kernel's magnitude (3s), and that kernel keeps its state whole, alive or pruned
    for before, alive in ((1.0, 8), (0.0, 4)):
        layer = kernel_layer()
        layer.mask[1, 0] = before
        prune.surgery_step(nn.Sequential(layer), {"0": 0.0}, band=0.0, densities={"0": 0.3}, granularity="kernel")
        assert int(layer.mask.sum()) == alive and (layer.mask == layer.mask[:, :, :1, :1]).all()


def test_fc_runs_prune_whole():
    fc = MaskedLinear(4, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[3.0, 0.1, 0.2, 0.2], [1.0, -1.0, 0.0, 2.5]]))  # runs' RMS: 2.1, 0.2, 1, 1.8
    prune.prune_by_percentile(nn.Sequential(fc), 50.0, granularity="2")
    # by single magnitudes 3, 2.5, 1, 1 would stay; by runs of 2 inputs the two strongest runs stay whole
    assert fc.mask.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]] and float(fc.weight[0, 1].detach()) == pytest.approx(0.1)
    assert fc.weight[1].detach().tolist() == [0.0, 0.0, 0.0, 2.5] and fc.weight[0, 2:].abs().sum() == 0


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
    grouped = nn.Sequential(MaskedConv2d(4, 8, 3), MaskedConv2d(8, 8, 3, groups=4))
    grouped.chain = [("0", "relu"), ("1", None)]
    with pytest.raises(ValueError, match="1, a grouped conv"):
        drop_dead_units(grouped)


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


def test_log_alpha_and_the_kl_term_known_answers():
    layer = MaskedLinear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1, 0.0]]))
    layer.log_sigma2 = nn.Parameter(torch.zeros(1, 3))
    la = prune.log_alpha(layer)
    assert la.tolist()[0] == pytest.approx([-math.log(1 + 1e-8), -math.log(0.01 + 1e-8), 10.0], abs=1e-6)  # clipped
    k1, k2, k3 = prune.VD_KL
    for a in (-10.0, -1.0, 0.0, 3.0, 10.0):  # eq. 14 written out
        expected = k1 - k1 / (1 + math.exp(-(k2 + k3 * a))) + 0.5 * math.log1p(math.exp(-a))
        assert prune.variational_kl(torch.tensor(a, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    kl = prune.variational_kl(torch.linspace(-10, 10, 101))
    assert (kl[1:] < kl[:-1]).all() and kl[-1] < 1e-4  # noisier costs less; a dropped weight nothing


def test_variational_output_mean_and_variance():
    torch.manual_seed(0)
    layer = MaskedLinear(2, 1, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.fill_(0.5)
    layer.log_sigma2 = nn.Parameter(torch.log(torch.tensor([[0.25, 4.0]])))
    layer.variational = True
    layer.mask[0, 1] = 0  # training ignores the mask: a weight past the threshold is still noise to learn
    x = torch.tensor([[1.0, 3.0]]).repeat(400_000, 1)
    out = layer.train()(x)  # mean 2 - 3 + 0.5 = -0.5, variance 1 x 0.25 + 9 x 4 = 36.25
    assert out.mean().item() == pytest.approx(-0.5, abs=0.05)
    assert out.var().item() == pytest.approx(36.25, rel=0.01)
    assert torch.equal(layer.eval()(x[:2]), torch.full((2, 1), 2.5))  # evaluation: the masked mean, no noise


def test_variational_output_of_a_grouped_conv():
    torch.manual_seed(0)
    conv = MaskedConv2d(4, 4, 3, padding=1, groups=2)
    conv.log_sigma2 = nn.Parameter(torch.log(torch.rand_like(conv.weight) + 0.1))
    conv.variational = True
    x = torch.randn(1, 4, 5, 5).expand(20_000, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = conv.train()(x)
        mean = F.conv2d(x[:1], conv.weight, conv.bias, padding=1, groups=2)
        var = F.conv2d(x[:1] ** 2, conv.log_sigma2.exp(), None, padding=1, groups=2)
    assert torch.allclose(out.mean(0), mean[0], atol=0.05 * var.max().sqrt().item())
    assert torch.allclose(out.var(0), var[0], rtol=0.06)  # each output's variance: its own group's inputs only
    # the noise, drawn flat, lies in the output's channels_last strides: independent per output
    assert out.is_contiguous(memory_format=torch.channels_last)
    z = ((out - mean) / var.sqrt()).reshape(len(out), -1)
    pick = [c * 25 + p for c in range(4) for p in (0, 12)]  # two positions in each of the 4 channels
    assert torch.corrcoef(z[:, pick].T).sub(torch.eye(8)).abs().max() < 0.05


def test_variational_dropout_masks_ramp_and_finish():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear(4, 3), nn.ReLU(), MaskedConv2d(3, 2, 1))
    fc, conv = model[0], model[2]
    vd = prune.VariationalDropout([("0", fc), ("2", conv)], threshold=3.0, beta=0.5, n=100, ramp_steps=4)
    assert fc.variational and conv.variational and fc.mask.all()  # log sigma^2 = -10: every weight precise
    ramp = []
    for _ in range(6):
        vd()
        ramp.append(vd.kl_weight())
    assert ramp == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]  # beta x step / ramp_steps, then beta
    with torch.no_grad():  # noise past the threshold on two weights of fc
        fc.log_sigma2[0, 0] = torch.log(fc.weight[0, 0] ** 2) + 3.5
        fc.log_sigma2[1, 2] = torch.log(fc.weight[1, 2] ** 2) + 2.5
    expected = 0.5 / 100 * sum(prune.variational_kl(prune.log_alpha(m)).sum() for m in (fc, conv))
    assert vd.penalty().item() == pytest.approx(expected.item())
    vd()
    assert fc.mask.sum() == 11 and fc.mask[0, 0] == 0 and fc.mask[1, 2] == 1
    assert vd.state_dict() == {"step": 7}
    vd.finish()
    assert not fc.variational and not hasattr(fc, "log_sigma2") and fc.weight[0, 0] == 0
    assert all(not k.endswith("log_sigma2") for k in model.state_dict())  # the checkpoint holds none
    assert torch.equal((fc.weight != 0).float(), fc.mask)  # pruned weights are exact zeros
