"""training.py: the training loop keeps pruned weights at zero, the test line, the penalty term."""
import pytest
import torch

import datasets
import prune
import training
import util
from conftest import CPU
from datasets import DataSpec
from models import build_model
from prune import masked_layers


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_pruned_weights_stay_zero_through_retraining(fake_mnist, opt):
    torch.manual_seed(0)
    train, val, _ = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 200, 0.1), CPU)
    net = build_model("lenet5_caffe")
    prune.prune_by_percentile(net, 80, "all")
    masks = {n: m.mask.clone() for n, m in prune.masked_layers(net)}
    before = {n: m.weight.detach().clone() for n, m in prune.masked_layers(net)}
    training.fit(net, net.parameters(), train, val, 1, 1e-2, training.TrainOptions(optimizer=opt, weight_decay=1e-3))
    for name, m in prune.masked_layers(net):
        dead = masks[name] == 0
        assert torch.equal(m.mask, masks[name])
        assert (m.weight[dead] == 0).all(), name  # exactly zero, not small
        assert not torch.equal(m.weight[~dead], before[name][~dead])  # survivors did train


def test_test_line_format():
    assert training.test_line(0.0486, 9852, 10000) == "Test set: Average loss: 0.0486, Accuracy: 9852/10000 (98.52%)"


def test_group_lasso_training_empties_whole_units(fake_mnist):
    """Trained under a strong group lasso then pruned, LeNet-300-100 loses whole units: its
    hidden units lose all their inputs, and pixels all their weights (stage 2's dead-unit pass
    then drops the units); without it, none do."""
    torch.manual_seed(0)
    train, val, _ = datasets.load_data(DataSpec("mnist", fake_mnist, 64, 256, 0.1, seed=0, augment="none"), CPU)
    counts = {}
    for strength in (0.0, 3e-3):
        torch.manual_seed(0)
        net = build_model("lenet_300_100")
        penalty = prune.group_lasso_penalty(net, {n: strength for n, _ in masked_layers(net)}) if strength else None
        training.fit(net, net.parameters(), train, val, 5, 0.05, training.TrainOptions(optimizer="sgd", weight_decay=0.0), penalty=penalty)
        prune.prune_by_std(net, {"*": 1.0})
        counts[strength] = int((net.fc1.mask.sum(1) == 0).sum()), int((net.fc1.mask.sum(0) == 0).sum())
    assert counts[0.0] == (0, 0) and min(counts[3e-3]) > 50, counts  # hidden units and pixels


def test_report_records_validation_and_test_and_prints_the_original_lines(capsys):
    # A network that reads the class off the first two pixels: right on 3 of 4 images, 1 of 2.
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    images = torch.tensor([[9, 0, 0, 0], [0, 9, 0, 0], [9, 0, 0, 0], [0, 9, 0, 0]], dtype=torch.uint8).view(4, 1, 2, 2)
    batches = lambda x, y: datasets.Batches(x, torch.tensor(y), 3, (0.0,), (1 / 255,))  # noqa: E731
    report = training.Report(net, batches(images, [0, 1, 0, 0]), batches(images[:2], [0, 0]))
    report("After pruning", "pruned")
    assert report.validation == {"pruned": 75.0} and report.accuracy == {"pruned": 50.0}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Test set: Average loss: ") and lines[0].endswith("Accuracy: 1/2 (50.00%)")
    assert lines[1:] == ["--- After pruning ---"]


def test_shared_settings_checks_are_one_line_errors():
    good = dict(precision="fp32", optimizer="sgd", schedule="cosine", distill=0.0, distill_temperature=4.0,
                teacher="dense")
    training.check_settings(good)
    training.check_settings({k: v for k, v in good.items() if k not in ("optimizer", "schedule")})  # stage 2's
    for bad, message in ((dict(precision="fp16"), "unknown precision"), (dict(optimizer="rmsprop"), "unknown optimizer"),
                         (dict(distill=1.5), "distill must be in"), (dict(teacher="snapshots"), "teaches through")):
        with pytest.raises(util.UserError, match=message):
            training.check_settings({**good, **bad})
