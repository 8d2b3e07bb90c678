"""Shared plumbing for the stage scripts: settings overrides, data, train/test loops, the
per-layer table, checkpoints and JSON summaries. Nothing here prints except the loops' bars,
the per-epoch summary lines and the test line."""
import ast
import copy
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm


class UserError(ValueError):
    """Bad input from the user (setting, file, data): reported as one line, exit code 2. A
    ValueError, as the library modules raise for bad arguments: run_stage reports both."""


def require(condition, message):
    if not condition:
        raise UserError(message)


# --- settings -------------------------------------------------------------------------------

SETTING_TYPES = (bool, int, float, str, list, dict, type(None))


def settings_from(namespace):
    """The settings of a stage script: its lowercase module-level names holding literal values
    (imported UPPERCASE tables and modules are not settings). Call right after the settings
    block, before any function is defined."""
    return {k: v for k, v in namespace.items()
            if k[0] != "_" and k == k.lower() and type(v) in SETTING_TYPES}


def _typed(key, value, default):
    """Check `value` against the type of `default` (an int is a valid float). Returns the value."""
    want = type(default)
    if default is None or type(value) is want:
        return value
    if want is float and type(value) is int:
        return float(value)
    raise UserError(f"setting {key} expects {want.__name__}, got {value!r} ({type(value).__name__})")


def per_layer(net, setting, key, which="all"):
    """{layer name: value} of a per-layer setting for every masked layer of `net` (which:
    'all' | 'conv' | 'fc'); a layer the setting misses is a UserError naming the setting."""
    from prune import layer_kind, layer_value, masked_layers
    try:
        return {name: layer_value(setting, name, layer_kind(m)) for name, m in masked_layers(net, which)}
    except KeyError as e:
        raise UserError(f"{key}: {e.args[0]}") from None


def _apply(defaults, items, where):
    """A copy of `defaults` updated with `items` ({key: value}), each checked against its
    default's type. A per-layer setting (a dict default) takes a dict or one value for every
    layer ({'*': v}). where: what the items came from, for the error message."""
    cfg = dict(defaults)
    for key, value in items.items():
        if key not in defaults:
            raise UserError(f"unknown setting {key!r}{where}; valid settings: {', '.join(defaults)}")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                value = {"*": value}
            proto = default.get("*", next(iter(default.values()), None))
            value = {str(k): _typed(f"{key}[{k!r}]", v, proto) for k, v in value.items()}
        cfg[key] = _typed(key, value, default)
    return cfg


def parse_settings(defaults, argv):
    """Apply `--key=value` overrides to a copy of `defaults`.

    Values are Python literals (`--lr=0.01`, `--pretrained=True`, `--bits={'*': 4, 'fc3': 6}`);
    a bare word is a string (`--model=lenet5`). Each value must have its default's type."""
    items = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"bad argument {arg!r}: give settings as --key=value (a recipe file goes first)")
        key, text = arg[2:].split("=", 1)
        try:
            items[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            items[key] = text
    return _apply(defaults, items, "")


# --- recipes: config/<name>.py, read by the stage scripts and bench/pipeline.py -------------

STAGES = ("pruning", "quantization", "huffman_encode")
RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def read_recipe(path):
    """A recipe file: `model = '<name>'` and one dict of settings per stage script (`pruning`,
    `quantization`, `huffman_encode`), literal values only; nothing in it is executed.
    Returns {stage: {setting: value}}, the model in each. Each stage checks its own keys."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
    except SyntaxError as e:
        raise UserError(f"{path} line {e.lineno}: not a recipe ({e.msg})") from None
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring that says where the recipe comes from
        require(isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name),
                f"{path} line {node.lineno}: a recipe holds only `name = literal` lines")
        name = node.targets[0].id
        try:
            names[name] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path} line {node.lineno}: {name} must be a literal (numbers, strings, lists, "
                            "dicts)") from None
    unknown = sorted(set(names) - {"model", *STAGES})
    require(not unknown, f"{path}: unknown name(s) {', '.join(unknown)}; a recipe sets model and the dicts "
                         f"{', '.join(STAGES)}")
    require(isinstance(names.get("model"), str), f"{path}: name the model, e.g. model = 'lenet_300_100'")
    for stage in STAGES:
        require(isinstance(names.get(stage, {}), dict), f"{path}: {stage} must be a dict of settings")
    return {stage: {"model": names["model"], **names.get(stage, {})} for stage in STAGES}


def stage_settings(defaults, argv, stage):
    """A stage script's settings: its defaults, then a recipe, then the `--key=value` overrides.

    The recipe is the file given as the first argument (`python pruning.py config/x.py`), else
    config/<model>.py when the model has one: `--model=lenet5_caffe` alone runs that model's
    recipe. Returns (settings, the recipe's path or None)."""
    argv = list(argv)
    path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    cfg = parse_settings(defaults, argv)  # checks the overrides, and names the model
    if path is None:
        path = os.path.join(RECIPE_DIR, cfg["model"] + ".py")
        if not os.path.isfile(path):
            return cfg, None
    base = _apply(defaults, read_recipe(path)[stage], f" in {path} ({stage})")
    return parse_settings(base, argv), path


def run_stage(main, defaults, argv=None, stage=None):
    """Entry point of a script: settings (for a stage, from its recipe too: stage_settings),
    run main(cfg), report bad input (UserError, or a ValueError from a library module) as one
    line on stderr with exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if stage:
            cfg, path = stage_settings(defaults, argv, stage)
            print(f"recipe: {os.path.relpath(path) if path else 'none (the settings at the top of the script)'}")
        else:
            cfg = parse_settings(defaults, argv)
        main(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def start_stage(cfg, check_settings, work="training"):
    """The first lines of every stage: reject bad settings (before any data loads), pick the
    device, seed torch, resolve the precision of `work` when the stage has one, and print the
    device line. Under torchrun, join the other ranks first (join_ranks).
    -> (device, precision or None)."""
    check_settings(cfg)
    dev = join_ranks(pick_device(cfg["device"]))
    torch.manual_seed(cfg.get("seed", 0))  # the same on every rank: the same initial network
    precision = resolve_precision(cfg["precision"], dev) if "precision" in cfg else None
    print(f"device: {describe_device(dev)}" + (f", {work} precision {precision}" if precision else ""))
    return dev, precision


def pick_device(setting):
    """'auto' -> CUDA when available, else CPU; otherwise the named device, checked."""
    # cuDNN picks the fastest convolution algorithm for each shape once (every batch has one shape).
    torch.backends.cudnn.benchmark = True
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"bad device {setting!r}: use 'auto', 'cpu' or 'cuda[:N]'") from None
    require(device.type != "cuda" or torch.cuda.is_available(),
            f"device {setting!r} asked for but CUDA is not available: use --device=cpu or auto")
    return device


def describe_device(dev):
    """'cuda:0 (NVIDIA H100 ...)' or 'cpu (2 threads)': the line each stage prints first."""
    return f"{dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})"


# --- several processes (torchrun) -----------------------------------------------------------

def rank_and_world():
    """(this process's rank, the number of ranks): torchrun sets RANK and WORLD_SIZE; (0, 1)
    for a plain `python stage.py`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """Whether this process prints and writes: rank 0, or the only process."""
    return rank_and_world()[0] == 0


def join_ranks(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on the CPU and nccl on
    CUDA with one GPU per rank (LOCAL_RANK), and silence the other ranks' stdout (rank 0
    prints the tables; errors still reach stderr). -> the device this rank uses. Alone:
    `device` unchanged."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        require(local < torch.cuda.device_count(), f"rank {rank} would take GPU {local}, but this machine has "
                f"{torch.cuda.device_count()}: give torchrun --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank:
        sys.stdout = open(os.devnull, "w")
    return device


def all_sum(values, device):
    """Sum a list of numbers over the ranks (alone: unchanged) -> list of floats."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def same_on_every_rank(tensors, what):
    """Check that `tensors` are bit-identical on every rank (masks after surgery, k-means
    codebooks); raises RuntimeError naming `what` if any rank differs. Alone: nothing to do."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    local = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    if not all(torch.equal(g, local) for g in gathered):
        raise RuntimeError(f"{what} differ between ranks")


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16():
    """Whether this CPU has bf16 matrix units (Intel AMX) or bf16 dot products (AVX512-BF16,
    AMD Zen 4 and later Intel), read from /proc/cpuinfo's flags; False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def cpu_model():
    """The CPU's model name ('AMD EPYC 9R14', 'Intel(R) Xeon(R) ...'), for benchmarks' JSON."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(setting, device):
    """The training precision: 'fp32' or 'bf16' (autocast). 'auto' is bf16 where the device
    runs it fast (CUDA with bf16 support, CPUs with AMX or AVX512-BF16), else fp32."""
    require(setting in PRECISIONS, f"unknown precision {setting!r}; choose one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return "bf16" if fast else "fp32"


def memory_format(model):
    """channels_last for networks with convolutions (oneDNN's and cuDNN's fast layout for
    them), else the default: the format fit() and evaluate() put the model and inputs in."""
    return torch.channels_last if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) \
        else torch.contiguous_format


def best_time(fn, reps):
    """For benchmarks: (best wall time in seconds over `reps` calls of fn(), the last result)."""
    best, result = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


# --- data -----------------------------------------------------------------------------------

DATASETS = {  # in_shape, classes, normalisation mean / std per channel
    "mnist": ((1, 28, 28), 10, (0.1307,), (0.3081,)),
    "cifar10": ((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGE_SIZE = 224  # ImageNet's crop; image_size changes it (small synthetic folders in tests)
SPLIT_SEED = 0  # the validation split and subsets are fixed, whatever the training seed


AUGMENTS = ("none", "shift", "crop_flip")


class Batches:
    """Minibatches from in-memory tensors, with no per-sample Python work.

    x: (N, C, H, W) uint8 images, y: (N,) int64 labels, both on the target device.
    Yields (float (B, C, H, W) normalised images, (B,) labels). augment, batched and done on
    the pixels before normalising (so padding is black, as torchvision's RandomCrop pads):
    'none'; 'shift' (random crop with 2-pixel padding: a digit moved by up to 2 pixels);
    'crop_flip' (4-pixel padding and a horizontal flip, the usual CIFAR augmentation)."""

    def __init__(self, x, y, batch_size, mean, std, shuffle=False, augment="none", seed=0):
        require(augment in AUGMENTS, f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment = shuffle, augment
        # Under torchrun a shuffled (training) set is split: every rank draws the same order
        # (same seed) and takes every world-th image of it, batch_size of them a step.
        self.rank, self.world = rank_and_world() if shuffle else (0, 1)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=x.device).view(shape) * 255
        self.std = torch.tensor(std, device=x.device).view(shape) * 255
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.y) // self.world / self.batch_size)

    def _augment(self, xb):
        n, _, h, w = xb.shape
        pad = 2 if self.augment == "shift" else 4
        padded = F.pad(xb, (pad,) * 4)
        dy, dx = (torch.randint(0, 2 * pad + 1, (2, n, 1), generator=self.gen)).to(xb.device)
        rows = (torch.arange(h, device=xb.device) + dy)[:, None, :, None]
        cols = (torch.arange(w, device=xb.device) + dx)[:, None, None, :]
        xb = padded[torch.arange(n, device=xb.device)[:, None, None, None],
                    torch.arange(xb.shape[1], device=xb.device)[None, :, None, None], rows, cols]
        if self.augment == "shift":
            return xb
        flip = (torch.rand(n, generator=self.gen) < 0.5).to(xb.device).view(-1, 1, 1, 1)
        return torch.where(flip, xb.flip(3), xb)

    def __iter__(self):
        n = len(self.y)
        # every rank takes as many images: the ranks step together (their last images wait for the next epoch)
        order = torch.randperm(n, generator=self.gen)[:n - n % self.world][self.rank::self.world].to(self.x.device) \
            if self.shuffle else None
        n = len(order) if order is not None else n
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size] if order is not None else slice(i, i + self.batch_size)
            xb = self.x[idx].float()
            if self.augment != "none":
                xb = self._augment(xb)
            yield (xb - self.mean) / self.std, self.y[idx]


def _read_image_folder(root):
    """Decode an ImageFolder tree (root/<class>/*.jpg) -> (N, C, H, W) uint8, (N,) int64."""
    import numpy as np
    import torchvision
    from PIL import Image

    folder = torchvision.datasets.ImageFolder(root)
    images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in
              tqdm(folder.samples, desc=f"read {root}", leave=False, mininterval=1)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(folder.targets)


def _load_split(dataset, root, train):
    """The raw train or test split: (N, C, H, W) uint8, (N,) int64. Reads a local copy when
    there is one, else asks torchvision to download (as a user's machine would)."""
    import torchvision

    split = "train" if train else "test"
    try:
        if dataset == "mnist":
            ds = torchvision.datasets.MNIST(root, train=train, download=True)
            return ds.data.unsqueeze(1), ds.targets
        local = os.path.join(root, "CIFAR10", split)
        if os.path.isdir(local):
            return _read_image_folder(local)
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    except (OSError, RuntimeError, ValueError) as e:
        where = "MNIST/raw/ (the four IDX files)" if dataset == "mnist" else \
            "CIFAR10/train/<class>/*.jpg and CIFAR10/test/ (or cifar-10-batches-py/)"
        raise UserError(f"{dataset} {split} set not found under {os.path.abspath(root)} and the "
                        f"download failed ({type(e).__name__}): put {where} there, or point "
                        f"--data_root at a folder that has it") from None


class FolderBatches:
    """Minibatches read from an image folder by DataLoader workers, for data sets that do not
    fit in memory (ImageNet). dataset: a torchvision ImageFolder; indices: the images used.
    Training (shuffle): torchvision's RandomResizedCrop(image_size) and a horizontal flip, and
    a DistributedSampler that gives each torchrun rank its share of every epoch (the same
    order on every rank, a new one each epoch); evaluation: resize to image_size x 256/224,
    centre crop. Yields (float (B, 3, S, S) normalised images, (B,) labels) on `device`."""

    def __init__(self, dataset, indices, batch_size, mean, std, device, shuffle=False, seed=0, image_size=IMAGE_SIZE,
                 workers=4):
        import torchvision.transforms as T

        resize = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if shuffle else \
            [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
        folder = copy.copy(dataset)  # its own transform
        folder.transform = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
        part = torch.utils.data.Subset(folder, indices.tolist())
        self.y = torch.tensor(dataset.targets)[indices]
        self.device, self.epoch = device, 0
        rank, world = rank_and_world() if shuffle else (0, 1)
        self.sampler = torch.utils.data.distributed.DistributedSampler(
            part, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        self.loader = torch.utils.data.DataLoader(part, batch_size, sampler=self.sampler, num_workers=workers,
                                                  pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for xb, yb in self.loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def imagenet_folders(data_root):
    """(train, val) folders of ImageNet under data_root, checked to exist (there is no download:
    ImageNet's licence asks for a sign-up) -> two paths."""
    folders = [os.path.join(data_root, "imagenet", split) for split in ("train", "val")]
    for folder in folders:
        require(os.path.isdir(folder), f"no ImageNet folder {os.path.abspath(folder)}: put the training and "
                                       f"validation images under {os.path.abspath(os.path.join(data_root, 'imagenet'))}"
                                       "/{train,val}/<class>/*.JPEG, or point --data_root at the folder holding them")
    return folders


def _imagenet(data_root, batch_size, test_batch_size, val_split, subset, device, seed, image_size, workers):
    """load_data for ImageNet: data_root/imagenet/train and .../val, one folder per class."""
    import torchvision

    train_set, test_set = (torchvision.datasets.ImageFolder(f) for f in imagenet_folders(data_root))
    split_gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(train_set), generator=split_gen)
    test_idx = torch.arange(len(test_set))
    if subset:
        order, test_idx = order[:subset], torch.randperm(len(test_set), generator=split_gen)[:subset].sort().values
    n_val = int(len(order) * val_split)
    _, _, mean, std = DATASETS["imagenet"]
    kw = dict(mean=mean, std=std, device=device, image_size=image_size, workers=workers)
    return (FolderBatches(train_set, order[n_val:], batch_size, shuffle=True, seed=seed, **kw),
            FolderBatches(train_set, order[:n_val], test_batch_size, **kw),
            FolderBatches(test_set, test_idx, test_batch_size, **kw))


def load_data(dataset, data_root, batch_size, test_batch_size, val_split, subset, device, seed, augment="auto",
              image_size=IMAGE_SIZE, workers=4):
    """Train, validation and test Batches on `device` (FolderBatches for ImageNet, read by
    `workers` DataLoader processes at `image_size`).

    val_split: fraction of the training set held out (fixed split). subset: use only this many
    training and test images (0 = all), for quick runs. augment: of the training batches, see
    Batches; 'auto' = 'crop_flip' for CIFAR-10, 'none' for MNIST (ImageNet's is FolderBatches')."""
    require(dataset in DATASETS, f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    require(0 <= val_split < 1, f"val_split must be in [0, 1), not {val_split}")
    require(subset >= 0, f"subset must be >= 0 (0 = all), not {subset}")
    if dataset == "imagenet":
        return _imagenet(data_root, batch_size, test_batch_size, val_split, subset, device, seed, image_size, workers)
    _, _, mean, std = DATASETS[dataset]
    split_gen = torch.Generator().manual_seed(SPLIT_SEED)
    x, y = _load_split(dataset, data_root, train=True)
    xt, yt = _load_split(dataset, data_root, train=False)
    order = torch.randperm(len(y), generator=split_gen)
    if subset:
        order = order[:subset]
        keep = torch.randperm(len(yt), generator=split_gen)[:subset].sort().values
        xt, yt = xt[keep], yt[keep]
    n_val = int(len(order) * val_split)
    tr, va = order[n_val:], order[:n_val]
    batches = lambda xs, ys, bs, **kw: Batches(xs.to(device), ys.to(device), bs, mean, std, **kw)
    if augment == "auto":
        augment = "crop_flip" if dataset == "cifar10" else "none"
    train = batches(x[tr], y[tr], batch_size, shuffle=True, augment=augment, seed=seed)
    return train, batches(x[va], y[va], test_batch_size), batches(xt, yt, test_batch_size)


# --- train / test ---------------------------------------------------------------------------

def percent(correct, total):
    """Accuracy in percent; 0 for no examples."""
    return 100 * correct / max(total, 1)


def evaluate(model, batches):
    """-> (mean loss, correct, total) over all batches; empty batches give (0, 0, 0). Always
    float32, whatever the training precision, so every reported accuracy is of the float32
    model that the checkpoint and the compressed file hold. Under torchrun only rank 0
    evaluates (every rank holds the same network); the others get no examples, (0, 0, 0)."""
    if not is_main():
        return 0.0, 0, 0
    fmt = memory_format(model)
    model.to(memory_format=fmt).eval()
    # Sums stay on the device until the end: a .item() per batch would wait for the GPU each time.
    loss, correct, total = 0.0, 0, 0  # become tensors on the batches' device
    with torch.no_grad():
        for xb, yb in batches:
            out = model(xb.contiguous(memory_format=fmt) if xb.dim() == 4 else xb)
            loss += F.cross_entropy(out, yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
            total += len(yb)
    return float(loss) / max(total, 1), int(correct), total


def test_line(loss, correct, total):
    """The line of the original run: 'Test set: Average loss: 0.0486, Accuracy: 9852/10000 (98.52%)'."""
    return f"Test set: Average loss: {loss:.4f}, Accuracy: {correct}/{total} ({percent(correct, total):.2f}%)"


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


def make_optimizer(name, params, lr, weight_decay):
    """'adam' or 'sgd' (momentum 0.9, Nesterov)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def fit(model, params, train, val, epochs, lr, weight_decay, optimizer="adam", schedule="cosine",
        label="train", after_step=None, precision="fp32", teacher=None, distill=0.0, temperature=4.0,
        penalty=None):
    """Train `params` of `model` for `epochs`, printing one summary line per epoch.

    schedule: 'cosine' (to 0 over the run) or 'constant'. after_step: called with no
    arguments after every optimizer step (dynamic network surgery updates its masks there).
    precision: 'fp32', or 'bf16' to run the forward pass under autocast (the matrix products
    in bfloat16; the parameters, their gradients, the optimizer state and the masks stay
    float32, so a pruned weight still gets exactly zero gradient). Conv networks train in
    channels_last memory format.
    teacher: a frozen network whose softened outputs the model also learns (knowledge
    distillation, Hinton et al. 2015): loss = (1 - distill) x cross-entropy + distill x T^2 x
    KL(softmax(teacher / T) || softmax(model / T)), T = temperature; the T^2 keeps the soft
    term's gradients on the scale of the hard one's (section 2).
    penalty: a function of no arguments whose value (a scalar tensor, in float32) is added to
    every step's loss (a group-lasso term, prune.group_lasso_penalty).
    Returns the history
    [{epoch, train_loss, train_acc, val_loss, val_acc, seconds}]."""
    require(schedule in SCHEDULES, f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    steps = max(epochs * len(train), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if schedule == "cosine" else (lambda s: 1.0))
    require(precision in ("fp32", "bf16"), f"precision must be fp32 or bf16 here, not {precision!r}")
    require(0 <= distill <= 1 and temperature > 0, f"distill must be in [0, 1] and temperature > 0, "
            f"got {distill} and {temperature}")
    require(teacher is not None or distill == 0, "distill > 0 needs a teacher network")
    fmt = memory_format(model)
    if teacher is not None:
        teacher = teacher.to(memory_format=fmt).eval().requires_grad_(False)
    model = model.to(memory_format=fmt)
    device = next(model.parameters()).device
    net = model
    if torch.distributed.is_initialized():  # under torchrun: gradients averaged over the ranks every step
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), 0
        bar = tqdm(train, desc=f"{label} {epoch}/{epochs}", leave=False, mininterval=0.5, disable=not is_main())
        for xb, yb in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                xb = xb.contiguous(memory_format=fmt) if xb.dim() == 4 else xb
                out = net(xb)
                if distill:
                    with torch.no_grad():
                        soft = teacher(xb).float()
            loss = F.cross_entropy(out.float(), yb)
            if distill:
                loss = (1 - distill) * loss + distill * temperature ** 2 * F.kl_div(
                    F.log_softmax(out.float() / temperature, 1), F.log_softmax(soft / temperature, 1),
                    reduction="batchmean", log_target=True)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            loss_sum += loss.detach() * len(yb)  # on the device: no wait for the GPU at every step
            correct += (out.argmax(1) == yb).sum()
            seen += len(yb)
        loss_sum, correct, seen = all_sum([loss_sum, correct, seen], device)  # every rank's images
        val_loss, val_correct, val_total = evaluate(model, val)
        row = dict(epoch=epoch, train_loss=loss_sum / max(seen, 1), train_acc=percent(correct, seen),
                   val_loss=val_loss, val_acc=percent(val_correct, val_total), seconds=time.time() - t0)
        history.append(row)
        print(f"{label} epoch {epoch:3d}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}% "
              f"| val loss {val_loss:.4f} acc {row['val_acc']:6.2f}% | {row['seconds']:.1f} s", flush=True)
    return history


# --- the per-layer table of the original run ------------------------------------------------

def layer_stats(model):
    """[{name, shape, total, nonzero}] for every parameter, in state-dict order. A masked
    layer's weight counts as weight * mask (during dynamic network surgery the pruned
    weights are kept but do not compute)."""
    masks = {f"{n}.weight": m.mask for n, m in model.named_modules() if isinstance(getattr(m, "mask", None), torch.Tensor)}
    return [dict(name=n, shape=list(p.shape), total=p.numel(),
                 nonzero=int((p * masks[n] != 0).sum() if n in masks else (p != 0).sum()))
            for n, p in model.named_parameters()]


def layer_table(stats):
    """The original run's per-layer table and its summary line, as one string."""
    width = max([18] + [len(s["name"]) + 1 for s in stats])
    lines = [f"{s['name']:<{width}}| nonzeros = {s['nonzero']:5} / {s['total']:5} "
             f"({100 * s['nonzero'] / s['total']:5.2f}%) | total_pruned = {s['total'] - s['nonzero']:4} "
             f"| shape = {tuple(s['shape'])}" for s in stats]
    total = sum(s["total"] for s in stats)
    alive = sum(s["nonzero"] for s in stats)
    lines.append(f"alive: {alive}, pruned : {total - alive}, total: {total}, Compression rate : "
                 f"{total / max(alive, 1):7.2f}x ( {100 * (total - alive) / total:.2f}% pruned)")
    return "\n".join(lines)


# --- files: checkpoints and JSON, always written to a temporary file and renamed ------------

def _atomic_write(path, write):
    """Call write(tmp_path), then rename into `path`, so a crash never leaves half a file.
    Under torchrun only rank 0 writes (every rank holds the same network)."""
    if not is_main():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shipped file keeps the user's umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_bytes(path, blob):
    _atomic_write(path, lambda tmp: open(tmp, "wb").write(blob))


def write_json(path, obj):
    _atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(obj, indent=2) + "\n"))


def save_tensors(path, tensors):
    """torch.save a plain {name: tensor} dict through a temporary file."""
    _atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def save_checkpoint(path, stage, model, model_args, settings, metrics, **extra):
    """One checkpoint format for every stage: {'stage', 'model': {'name', 'kwargs'},
    'state_dict', 'settings', 'metrics', **extra}. model_args = {'name', 'kwargs'} for
    models.build_model."""
    # Contiguous float32 tensors whatever the training layout (channels_last) or precision.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    ckpt = dict(stage=stage, model=model_args, state_dict=state, settings=settings, metrics=metrics, **extra)
    _atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, stage, device, hint):
    """Load a checkpoint of `stage` on `device` (no pickle: weights_only=True).

    hint: how to make the missing file (e.g. 'run pruning.py first')."""
    require(os.path.isfile(path), f"no checkpoint at {path}: {hint}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): {hint}") from None
    require(isinstance(ckpt, dict) and {"stage", "model", "state_dict"} <= set(ckpt),
            f"{path} is not a deep-compression checkpoint: {hint}")
    require(ckpt["stage"] == stage,
            f"{path} is a '{ckpt['stage']}' checkpoint but this stage needs a '{stage}' one: {hint}")
    return ckpt
