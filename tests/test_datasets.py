"""datasets.py: the fixed validation split, image folders, augmentation, missing data."""
import os

import pytest
import torch

import datasets
import util
from conftest import CPU, SHARED_DATA
from datasets import DataSpec


def test_load_data_split_is_fixed_and_disjoint(fake_mnist):
    a = datasets.load_data(DataSpec("mnist", fake_mnist, 32, 100, 0.25, seed=1), CPU)
    b = datasets.load_data(DataSpec("mnist", fake_mnist, 32, 100, 0.25, seed=2), CPU)
    assert len(a[0].y) == 450 and len(a[1].y) == 150 and len(a[2].y) == 200
    assert torch.equal(a[1].x, b[1].x)  # the validation split does not depend on the seed
    xb, yb = next(iter(a[0]))
    assert xb.shape == (32, 1, 28, 28) and xb.dtype == torch.float32 and yb.shape == (32,)
    assert sum(len(y) for _, y in a[0]) == 450


def test_cifar_image_folder_and_augmentation(fake_cifar):
    train, val, test = datasets.load_data(DataSpec("cifar10", fake_cifar, 16, 50, 0.0), CPU)
    assert train.x.shape == (100, 3, 32, 32) and len(test.y) == 50 and train.augment == "crop_flip"
    xb, _ = next(iter(train))
    assert xb.shape == (16, 3, 32, 32)
    # a crop of a padded image: every output pixel is a source pixel or padding (black)
    b = datasets.Batches(torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4), torch.zeros(1, dtype=torch.long),
                     1, (0.0,), (1 / 255,), augment="crop_flip")
    out = next(iter(b))[0]
    assert set(out.flatten().tolist()) <= set(range(17))


def test_mnist_shift_augmentation_moves_by_at_most_2_pixels(fake_mnist):
    train = datasets.load_data(DataSpec("mnist", fake_mnist, 600, 100, 0.0, seed=0, augment="shift"), CPU)[0]
    plain = datasets.load_data(DataSpec("mnist", fake_mnist, 600, 100, 0.0), CPU)[0]
    assert plain.augment == "none" and train.augment == "shift"
    torch.manual_seed(0)
    image = (torch.rand(50, 1, 28, 28) * 255).to(torch.uint8)
    b = datasets.Batches(image, torch.zeros(50, dtype=torch.long), 50, (0.0,), (1 / 255,), augment="shift", seed=3)
    out = next(iter(b))[0]
    for moved, source in zip(out, image.float()):
        # some shift (dy, dx) in -2..2 maps the source onto the output, with black coming in
        padded = torch.nn.functional.pad(source, (2, 2, 2, 2))
        assert any(torch.equal(moved, padded[:, 2 + dy:30 + dy, 2 + dx:30 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    with pytest.raises(util.UserError, match="unknown augment 'rotate'"):
        datasets.Batches(image, torch.zeros(50, dtype=torch.long), 50, (0.0,), (1.0,), augment="rotate")


def test_missing_data_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as dsu

    def no_network(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(dsu, "download_url", no_network)
    monkeypatch.setattr(dsu, "download_and_extract_archive", no_network)
    with pytest.raises(util.UserError, match="mnist train set not found under .* --data_root"):
        datasets.load_data(DataSpec("mnist", str(tmp_path), 32, 100, 0.1), CPU)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "MNIST")), reason="no ../shared/data")
def test_real_mnist_loads():
    train, val, test = datasets.load_data(DataSpec("mnist", SHARED_DATA, 128, 1000, 0.1), CPU)
    assert (len(train.y), len(val.y), len(test.y)) == (54000, 6000, 10000)
    assert train.x.dtype == torch.uint8 and set(test.y.unique().tolist()) == set(range(10))


# --- checkpoints ----------------------------------------------------------------------------

def test_data_spec_from_settings_fills_what_older_settings_lack():
    # a stage-1 checkpoint written before image_size, workers and augment were settings
    older = dict(dataset="mnist", data_root="here", batch_size=64, test_batch_size=500, val_split=0.2, subset=0,
                 seed=3, lr=0.1)
    spec = DataSpec.from_settings(older, data_root="there", seed=7)
    assert spec == DataSpec("mnist", "there", 64, 500, 0.2, 0, 7, "auto", datasets.IMAGE_SIZE, 4)
