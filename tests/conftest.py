"""Shared fixtures: small synthetic data sets in the on-disk layouts the project reads, so the
suite runs with no network and no ../shared."""
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def _patterns(n, shape, seed):
    """n images of `shape` (H, W) or (H, W, C): class c lights up a band at a class-specific
    place, plus noise, so that a small network learns them. -> uint8 images, int labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    for c in range(10):
        images[labels == c, 2 + 2 * c: 4 + 2 * c] = 255
    return images, labels


def write_fake_mnist(root, n_train=600, n_test=200):
    """Write MNIST's four IDX files under root/MNIST/raw (torchvision reads them as is)."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = _patterns(n, (28, 28), seed)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return root


def write_fake_cifar(root, n_train=100, n_test=50):
    """Write CIFAR10/{train,test}/<class>/NNNN.jpg as ../shared/data holds it."""
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        images, labels = _patterns(n, (32, 32, 3), seed)
        for i, (img, c) in enumerate(zip(images, labels)):
            folder = os.path.join(root, "CIFAR10", split, classes[c])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
    return root


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    """A data_root holding a 600/200-image synthetic MNIST."""
    return write_fake_mnist(str(tmp_path_factory.mktemp("mnist")))


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A data_root holding a 100/50-image synthetic CIFAR-10 (JPEG ImageFolder layout)."""
    return write_fake_cifar(str(tmp_path_factory.mktemp("cifar")))


def run_script(script, *args, cwd=ROOT, timeout=300):
    """Run a stage script in a subprocess with the test's interpreter, CPU only."""
    import subprocess

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(stage, *args, capsys):
    """Run a stage script's main in this process as its command line would (defaults, recipe,
    overrides, one-line errors), on the CPU -> (exit code, stdout, stderr). For tests where a
    new interpreter adds nothing but start-up time; each stage keeps one subprocess test."""
    import importlib

    import util

    module = importlib.import_module(stage)
    code = 0
    try:
        util.run_stage(module.main, module.SETTINGS, [*args, "--device=cpu"], stage=stage)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_fake_imagenet(root, classes=4, train=8, val=3, size=64):
    """Write imagenet/{train,val}/<class>/*.JPEG: a few dozen small images in ImageNet's folder layout."""
    from PIL import Image

    for split, n, seed in (("train", train, 5), ("val", val, 6)):
        images, labels = _patterns(classes * n, (size, size, 3), seed)
        for i, img in enumerate(images):
            folder = os.path.join(root, "imagenet", split, f"n{i % classes:08d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.JPEG"), quality=90)
    return root
