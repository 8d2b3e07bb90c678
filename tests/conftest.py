"""Shared fixtures and helpers: small synthetic data sets in the on-disk layouts the project
reads (so the suite runs with no network and no ../shared), and quantized state dicts made by
hand with the compressed file's round trip."""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dcfile  # noqa: E402
from models import build_model  # noqa: E402
from prune import masked_layers  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
CPU = torch.device("cpu")


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


# --- quantized state dicts made by hand, and the file's round trip ---------------------------

MNIST = {"in_shape": [1, 28, 28], "num_classes": 10}
SMALL = {"in_shape": [1, 8, 8], "num_classes": 10}  # lenet_300_100 with a 64-input fc1: a small file


def quantized_state(name, kwargs, density=0.1, clusters=32, seed=0, layers=None):
    """A state dict in stage 2's contract, made by hand: for each masked layer L (or those in
    `layers`), L.codebook (k,) float32 holding one 0.0 centroid, L.index (uint8; int16 above
    256 clusters, int32 above 2^15; 0 where pruned), L.mask; no L.weight. -> (state dict, model args, quantized)."""
    g = torch.Generator().manual_seed(seed)
    net = build_model(name, **kwargs)
    state, quantized = net.state_dict(), {}
    for layer, _ in masked_layers(net):
        if layers is not None and layer not in layers:
            continue
        k = clusters if isinstance(clusters, int) else clusters.get(layer, 32)
        shape = state.pop(f"{layer}.weight").shape
        mask = (torch.rand(shape, generator=g) < density).float()
        dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 2 ** 15 else torch.int32
        state[f"{layer}.codebook"] = torch.cat([torch.zeros(1), torch.randn(k - 1, generator=g)])
        state[f"{layer}.index"] = torch.randint(0, k, shape, generator=g, dtype=dtype) * mask.to(dtype)
        state[f"{layer}.mask"] = mask
        quantized[layer] = dict(bits=max(1, (k - 1).bit_length()), clusters=k)
    return state, dict(name=name, kwargs=kwargs), quantized


def assert_bit_equal(a, b):
    assert list(a) and set(a) == set(b)
    for key in a:
        assert dcfile.bit_equal(a[key], b[key]), key


def round_trip(state, model_args, quantized, index_bits=0, share_tables=True):
    blob, report = dcfile.encode_model(state, model_args, quantized, index_bits, share_tables=share_tables)
    decoded, header = dcfile.decode_bytes(blob)
    assert_bit_equal(state, decoded)
    assert header["model"] == model_args and header["quantized"] == quantized
    assert sum(r["bytes"] for r in report["layers"]) + report["header_bytes"] == len(blob)
    return blob, report


def sections(blob):
    """[(offset, kind, payload)] of a file's sections."""
    out, pos = [], len(dcfile.MAGIC) + 2
    while pos < len(blob):
        length, kind = struct.unpack_from("<IB", blob, pos)
        out.append((pos, chr(kind), bytes(blob[pos + 5:pos + 5 + length])))
        pos += dcfile.FRAME + length
    return out


def rebuild(blob, replace):
    """The file with section i's payload replaced by replace[i] and every CRC made valid, as
    a hostile writer would do."""
    parts = [dcfile._section(kind, replace.get(i, payload)) for i, (_, kind, payload) in enumerate(sections(blob))]
    return dcfile.MAGIC + struct.pack("<H", dcfile.VERSION) + b"".join(parts)


def float_block_size(payload, at, n):
    """Bytes of the float block of n values at payload[at:] (dcfile._float_block)."""
    form = payload[at]
    return 1 + 4 * n if form == 0 else 1 + 2 * n if form == 1 else 4 + (n * payload[at + 3] + 7) // 8


def codebook_end(payload):
    """Offset just after a 'Q' or 'A' payload's dtypes, k and codebook (a float block)."""
    k = struct.unpack_from("<I", payload, 2)[0]
    return 6 + float_block_size(payload, 6, k)


def header_json(payload):
    """The header dict of an 'H' payload of the current version."""
    inflate = zlib.decompressobj(zdict=dcfile.HEADER_DICTIONARY)
    return json.loads(inflate.decompress(payload) + inflate.flush())


def as_version7(blob, version=7):
    """The same file as version 7 wrote it (and labelled `version`, for the tests of what an
    older reader refuses): the header plain zlib, codebooks and float32 tables raw float32
    (a 'G' group's values as float16 where each is one exactly) and without version 9's idle-bias
    flags. 'A' payloads are left as they are."""
    secs = sections(blob)
    header = header_json(secs[0][2])
    layout, _, roles = dcfile.architecture(header["model"], header["quantized"])
    replace = {0: zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)}
    i, later = 1, set()
    for at, (_, name, _, _) in enumerate(layout):
        if at in later:
            continue
        _, kind, payload = secs[i]
        r = dcfile._Reader(payload)
        if kind == "Q":
            r.take(6)
            block = dcfile._read_float_block(r, struct.unpack_from("<I", payload, 2)[0])
            replace[i] = payload[:6] + block.astype("<f4").tobytes() + payload[r.pos:]
        elif kind == "T" and payload[0] == 0:  # a float32 table
            r.take(5)
            block = dcfile._read_float_block(r, struct.unpack_from("<I", payload, 1)[0])
            replace[i] = payload[:5] + block.astype("<f4").tobytes() + payload[r.pos:]
        elif kind == "G":
            m = struct.unpack_from("<H", payload, 2)[0]
            members = (list(struct.unpack_from(f"<{m}H", payload, 4)) if m else
                       [p for p, e in enumerate(layout) if e[0] == "R" and roles[e[1]] == roles[name]])
            later |= set(members[1:])
            k_at = 4 + 2 * m
            flagged = sum(dcfile._idle_units(layout, p) is not None for p in members)  # version 9's idle flags
            if flagged:
                flags = payload[k_at:k_at + (flagged + 7) // 8]
                assert not any(flags), "a group that leaves idle biases out has no version-7 form"
                payload = payload[:k_at] + payload[k_at + len(flags):]
                r, replace[i] = dcfile._Reader(payload), payload
            k = struct.unpack_from("<I", payload, k_at)[0]
            if payload[0] == 0:  # float32 values
                r.take(k_at + 4)
                block = dcfile._read_float_block(r, k or sum(int(np.prod(layout[p][2])) for p in members))
                half = np.array_equal(block.astype("<f2").astype(np.float32).view(np.uint32), block.view(np.uint32))
                stored = block.astype("<f2" if half else "<f4").tobytes()
                replace[i] = (payload[:1] + bytes([dcfile.DTYPES.index(torch.float16 if half else torch.float32)])
                              + payload[2:k_at + 4] + stored + payload[r.pos:])
        i += 1
    out = rebuild(blob, replace)
    return out[:8] + struct.pack("<H", version) + out[10:]


def fails(blob, match):
    with pytest.raises(dcfile.FormatError, match=match) as e:
        dcfile.decode_bytes(blob)
    assert "\n" not in str(e.value)
    return str(e.value)


def patch(payload, offset, fmt, *values):
    return payload[:offset] + struct.pack(fmt, *values) + payload[offset + struct.calcsize(fmt):]


def kill_when(argv, state_path, label, epoch=1, victim=None, timeout=240):
    """Start `argv` and SIGKILL it (or the process victim(its pid) names) once its resume
    state (training.Progress) shows phase `label` at `epoch` or later, as a machine that goes
    away would. -> (the exit code of the process started, its stderr)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    log = tempfile.TemporaryFile()  # not a pipe: a full one would stop the process
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            state = None  # not written yet
        current = state and state["current"]
        reached = current and current["label"] == label and current["epoch"] >= epoch
        if state and (label in state["finished"] or reached):
            os.kill(victim(proc.pid) if victim else proc.pid, signal.SIGKILL)
            code = proc.wait(timeout)  # torchrun's agent gives a stopped rank 30 s, then restarts
            log.seek(0)
            return code, log.read().decode(errors="replace")
        time.sleep(0.02)
    proc.kill()
    log.seek(0)
    raise AssertionError(f"{argv[1]} ended before phase {label} reached epoch {epoch}: {log.read()[-500:]}")


def children(pid):
    """The pids of the processes whose parent is `pid` (read from /proc, Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def write_image_folder(root, classes=("cat", "dog", "owl"), train=12, test=4, size=40):
    """Write root/{train,test}/<class>/NNNN.png, images of `size` x size-6 pixels (not square,
    so the folder data set's resize and crop are exercised), class c's band lit as _patterns
    does. -> root."""
    from PIL import Image

    for split, n, seed in (("train", train, 7), ("test", test, 8)):
        images, labels = _patterns(len(classes) * n, (size, size - 6, 3), seed)
        for i, img in enumerate(images):
            folder = os.path.join(root, split, classes[i % len(classes)])
            os.makedirs(folder, exist_ok=True)
            img[:, :, :] = img // 4
            img[2 + 4 * (i % len(classes)): 6 + 4 * (i % len(classes))] = 255
            Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
    return root
