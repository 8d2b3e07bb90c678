"""Data sets and minibatches: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 and SVHN in memory (a local
copy, or torchvision's download), a user's image folder (in memory where it fits, else through
DataLoader workers), ImageNet folders through DataLoader workers, and the fixed validation split
that settings are chosen on. A stage describes its data with one DataSpec and calls load_data."""
import copy
import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import UserError, rank_and_world, require

DATASETS = {  # in_shape, classes, normalisation mean / std per channel
    "mnist": ((1, 28, 28), 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ((1, 28, 28), 10, (0.2860,), (0.3530,)),
    "cifar10": ((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": ((3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # data_root/{train,test}/<class>/*: (3, image_size, image_size), its classes, the training
    # set's own statistics (data_shape, load_data)
    "folder": (None, None, None, None),
}
# Where torchvision keeps each set under data_root (and downloads it to), and what the
# augmentation 'auto' picks: flips for photos, shifts for digits and house numbers.
TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10",
                    "cifar100": "CIFAR100", "svhn": "SVHN"}
AUTO_AUGMENT = {"cifar10": "crop_flip", "cifar100": "crop_flip", "folder": "crop_flip", "svhn": "shift"}
IN_MEMORY = 4 << 30  # bytes of decoded images a folder data set keeps in memory; a larger one streams
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

    def state_dict(self):
        """Where the order and augmentation of the next epoch come from, to resume at it."""
        return dict(gen=self.gen.get_state())

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])

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
    if dataset == "svhn":
        try:
            import scipy.io  # noqa: F401  torchvision reads SVHN's .mat files with it
        except ImportError:
            raise UserError("dataset=svhn reads SVHN's .mat files with scipy: pip install scipy") from None
    try:
        if dataset in ("mnist", "fashion_mnist"):
            ds = getattr(torchvision.datasets, TORCHVISION_SETS[dataset])(root, train=train, download=True)
            return ds.data.unsqueeze(1), ds.targets
        if dataset == "svhn":
            ds = torchvision.datasets.SVHN(os.path.join(root, "SVHN"), split=split, download=True)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        local = os.path.join(root, TORCHVISION_SETS[dataset], split)
        if os.path.isdir(local):
            return _read_image_folder(local)
        ds = getattr(torchvision.datasets, TORCHVISION_SETS[dataset])(root, train=train, download=True)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        where = {"mnist": "MNIST/raw/ (the four IDX files)", "fashion_mnist": "FashionMNIST/raw/ (the four IDX files)",
                 "svhn": "SVHN/{train,test}_32x32.mat (scipy reads them)",
                 "cifar10": "CIFAR10/train/<class>/*.jpg and CIFAR10/test/ (or cifar-10-batches-py/)",
                 "cifar100": "CIFAR100/train/<class>/*.jpg and CIFAR100/test/ (or cifar-100-python/)"}[dataset]
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

    def state_dict(self):
        """The next epoch's number, which draws its order (DistributedSampler.set_epoch)."""
        return dict(epoch=self.epoch)

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])

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


def _split(n_train, n_test, spec):
    """The fixed split (seed SPLIT_SEED, whatever the training seed) of a data set with n_train
    training and n_test test images: -> (training, validation, test) index tensors, val_split of
    the (subset of the) training images held out, the test images all or a sorted subset."""
    split_gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(n_train, generator=split_gen)
    test_idx = torch.arange(n_test)
    if spec.subset:
        order = order[:spec.subset]
        test_idx = torch.randperm(n_test, generator=split_gen)[:spec.subset].sort().values
    n_val = int(len(order) * spec.val_split)
    return order[n_val:], order[:n_val], test_idx


def _streamed(train_set, test_set, split, spec, device, mean, std):
    """FolderBatches of ImageFolders by DataLoader workers: (training, validation, test)."""
    tr, va, te = split
    kw = dict(mean=mean, std=std, device=device, image_size=spec.image_size, workers=spec.workers)
    return (FolderBatches(train_set, tr, spec.batch_size, shuffle=True, seed=spec.seed, **kw),
            FolderBatches(train_set, va, spec.test_batch_size, **kw),
            FolderBatches(test_set, te, spec.test_batch_size, **kw))


def _imagenet(spec, device):
    """load_data for ImageNet: data_root/imagenet/train and .../val, one folder per class."""
    import torchvision

    train_set, test_set = (torchvision.datasets.ImageFolder(f) for f in imagenet_folders(spec.data_root))
    _, _, mean, std = DATASETS["imagenet"]
    return _streamed(train_set, test_set, _split(len(train_set), len(test_set), spec), spec, device, mean, std)


def folder_classes(data_root):
    """The classes of a folder data set, checked before any work: data_root/train and
    data_root/test each hold a folder of images per class, the test set's classes among the
    training set's. -> sorted class names (a class's label is its place here)."""
    import torchvision

    found = {}
    for split in ("train", "test"):
        folder = os.path.join(data_root, split)
        require(os.path.isdir(folder), f"no folder {os.path.abspath(folder)}: dataset=folder reads "
                                       f"{os.path.abspath(data_root)}/{{train,test}}/<class>/<images>")
        found[split] = {c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)) and any(
            torchvision.datasets.folder.has_file_allowed_extension(f, torchvision.datasets.folder.IMG_EXTENSIONS)
            for f in os.listdir(os.path.join(folder, c)))}
        require(found[split], f"{os.path.abspath(folder)} holds no class folder with images: put each class's "
                              "images (.jpg, .png, ...) in a folder named after it")
    extra = sorted(found["test"] - found["train"])
    require(not extra, f"classes of {os.path.abspath(os.path.join(data_root, 'test'))} with no training images: "
                       f"{', '.join(extra[:5])}")
    return sorted(found["train"])


class _ClassFolder:
    """A torchvision ImageFolder over root/<class>/* whose labels are places in `classes`
    (the training set's), so that a test folder missing a class keeps the same labels."""

    def __new__(cls, root, classes, transform=None):
        import torchvision

        class Folder(torchvision.datasets.ImageFolder):
            def find_classes(self, directory):
                here = [c for c in classes if os.path.isdir(os.path.join(directory, c))]
                return here, {c: classes.index(c) for c in here}

        return Folder(root, transform=transform)


def _decode_image(path, image_size):
    """One image file as RGB, resized (shorter side) and centre-cropped to image_size ->
    (3, S, S) uint8."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    with Image.open(path) as im:
        im = TF.center_crop(TF.resize(im.convert("RGB"), image_size), image_size)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _decode_folder(folder, image_size):
    """Every image of an ImageFolder (_decode_image) -> (N, 3, S, S) uint8, (N,) int64."""
    images = [_decode_image(path, image_size)
              for path, _ in tqdm(folder.samples, desc=f"read {folder.root}", leave=False, mininterval=1)]
    return torch.stack(images).contiguous(), torch.tensor(folder.targets)


def _statistics(x):
    """Per-channel mean and std in 0..1 of (N, C, H, W) uint8 images, in chunks."""
    total, square, count = 0.0, 0.0, 0
    for chunk in x.split(1024):
        c = chunk.double().transpose(0, 1).reshape(chunk.shape[1], -1) / 255
        total, square, count = total + c.sum(1), square + (c * c).sum(1), count + c.shape[1]
    mean = total / count
    return tuple(mean.tolist()), tuple((square / count - mean * mean).clamp_min(1e-12).sqrt().tolist())


def _folder(spec, device):
    """load_data for dataset=folder: data_root/{train,test}/<class>/*, images resized to
    image_size, normalised with the training set's own statistics (the validation images
    left out), decoded into memory where they take at most IN_MEMORY bytes, else streamed by
    DataLoader workers (FolderBatches, statistics from up to 2,000 training images)."""
    classes = folder_classes(spec.data_root)
    train_set, test_set = (_ClassFolder(os.path.join(spec.data_root, s), classes) for s in ("train", "test"))
    tr, va, te = _split(len(train_set), len(test_set), spec)
    if (len(tr) + len(va) + len(te)) * 3 * spec.image_size ** 2 > IN_MEMORY:
        sample = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(SPLIT_SEED))[:2000]]
        mean, std = _statistics(torch.stack([_decode_image(train_set.samples[i][0], spec.image_size)
                                             for i in sample.tolist()]))
        return _streamed(train_set, test_set, (tr, va, te), spec, device, mean, std)
    order = torch.cat([va, tr]).tolist()  # decoded in this order: the validation images first
    train_set.samples, train_set.targets = [train_set.samples[i] for i in order], [train_set.targets[i] for i in order]
    test_set.samples = [test_set.samples[i] for i in te.tolist()]
    test_set.targets = [test_set.targets[i] for i in te.tolist()]
    x, y = _decode_folder(train_set, spec.image_size)
    xt, yt = _decode_folder(test_set, spec.image_size)
    n_val = len(va)
    mean, std = _statistics(x[n_val:])
    return _in_memory(spec, device, (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val]), (xt, yt), mean, std)


def data_shape(spec):
    """(in_shape, classes) of the data `spec` names; a folder data set's are read from its
    folders (checked: folder_classes) and its image_size."""
    if spec.dataset == "folder":
        return (3, spec.image_size, spec.image_size), len(folder_classes(spec.data_root))
    return DATASETS[spec.dataset][:2]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a stage trains and tests on. The fields are the stages' settings of the same names;
    from_settings fills those an older checkpoint or file did not record."""
    dataset: str = "mnist"          # a key of DATASETS
    data_root: str = "data"         # the folder holding MNIST/raw, CIFAR10/, imagenet/ ... or {train,test}/
    batch_size: int = 128           # training minibatch
    test_batch_size: int = 1000     # validation and test minibatch
    val_split: float = 0.1          # fraction of the training set held out (a fixed split)
    subset: int = 0                 # only this many training and test images (0 = all)
    seed: int = 0                   # the training batches' order and augmentation
    augment: str = "auto"           # see Batches; auto = AUTO_AUGMENT's, else none
    image_size: int = IMAGE_SIZE    # imagenet, folder: the size the networks see
    workers: int = 4                # imagenet, a streamed folder: DataLoader processes

    @classmethod
    def from_settings(cls, settings, **override):
        """The spec that `settings` (a stage's, or those recorded in a checkpoint or a file's
        header) describe, with `override` on top; keys that are not fields are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**settings, **override}.items() if k in fields})


def load_data(spec, device):
    """Train, validation and test minibatches of `spec` (a DataSpec) on `device`: Batches, or
    FolderBatches for ImageNet. Raises UserError for a bad spec or missing data."""
    require(spec.dataset in DATASETS, f"unknown dataset {spec.dataset!r}; choose one of {', '.join(DATASETS)}")
    require(0 <= spec.val_split < 1, f"val_split must be in [0, 1), not {spec.val_split}")
    require(spec.subset >= 0, f"subset must be >= 0 (0 = all), not {spec.subset}")
    if spec.dataset == "imagenet":
        return _imagenet(spec, device)
    if spec.dataset == "folder":
        return _folder(spec, device)
    _, _, mean, std = DATASETS[spec.dataset]
    x, y = _load_split(spec.dataset, spec.data_root, train=True)
    xt, yt = _load_split(spec.dataset, spec.data_root, train=False)
    tr, va, te = _split(len(y), len(yt), spec)
    if spec.subset:
        xt, yt = xt[te], yt[te]
    return _in_memory(spec, device, (x[tr], y[tr]), (x[va], y[va]), (xt, yt), mean, std)


def _in_memory(spec, device, train, val, test, mean, std):
    """Batches of in-memory (uint8 images, labels) pairs: training, validation, test."""
    batches = lambda xy, bs, **kw: Batches(xy[0].to(device), xy[1].to(device), bs, mean, std, **kw)  # noqa: E731
    augment = AUTO_AUGMENT.get(spec.dataset, "none") if spec.augment == "auto" else spec.augment
    return (batches(train, spec.batch_size, shuffle=True, augment=augment, seed=spec.seed),
            batches(val, spec.test_batch_size), batches(test, spec.test_batch_size))
