"""models.py: parameter counts, the masked twins of torchvision's networks, teachers."""
import pytest
import torch
import torch.nn as nn
import torchvision

import prune
from models import Ensemble, build_model, teacher_from
from prune import MaskedConv2d, MaskedLinear


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
