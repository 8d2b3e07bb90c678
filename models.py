"""The networks of the paper, built from masked layers so that every weight can be pruned,
and any other: torchvision's classifiers by name, or a user's factory function.

`build_model(name, **kwargs)` is the one entry point; checkpoints store `name` and `kwargs`
so that later stages rebuild exactly the same network. A user's factory runs only after
`name_factory` (called with what the user named): a checkpoint or file that names one
imports nothing.
"""
import difflib
import importlib
import importlib.util
import inspect
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from prune import MASKED, MaskedConv2d, MaskedLinear, to_masked


class LeNet300100(nn.Module):
    """LeNet-300-100 (Deep Compression Table 2): fc 784-300-100-10, ReLU. 266,610 parameters
    for 1x28x28 inputs. x: (N, C, H, W) -> logits (N, num_classes)."""
    # The masked layers in forward order, each with the elementwise function on its output
    # before the next one (pooling and flattening keep a constant constant): prune.drop_dead_units.
    chain = (("fc1", "relu"), ("fc2", "relu"), ("fc3", None))

    def __init__(self, in_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        c, h, w = in_shape
        self.fc1 = MaskedLinear(c * h * w, 300)
        self.fc2 = MaskedLinear(300, 100)
        self.fc3 = MaskedLinear(100, num_classes)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _flat_size(in_shape, convs):
    """Size after a chain of (kernel, pool) valid convolutions: (C, H, W) -> C*H*W."""
    _, h, w = in_shape
    for k, pool in convs:
        h, w = h - k + 1, w - k + 1
        if pool:
            h, w = h // 2, w // 2
    return h * w


class LeNet5(nn.Module):
    """The LeNet-5 variant of the original PyTorch run (167,566 parameters on 1x28x28):
    conv 1->6 5x5, pool, conv 6->16 5x5, pool, conv 16->120 4x4, fc 120->1024, fc 1024->10."""
    chain = (("conv1", "relu"), ("conv2", "relu"), ("conv3", "relu"), ("fc1", "relu"), ("fc2", None))

    def __init__(self, in_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.conv1 = MaskedConv2d(in_shape[0], 6, 5)
        self.conv2 = MaskedConv2d(6, 16, 5)
        self.conv3 = MaskedConv2d(16, 120, 4)
        self.fc1 = MaskedLinear(120 * _flat_size(in_shape, [(5, True), (5, True), (4, False)]), 1024)
        self.fc2 = MaskedLinear(1024, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class LeNet5Caffe(nn.Module):
    """The paper's LeNet-5 (Caffe's, Deep Compression Table 3; 431,080 parameters on 1x28x28):
    conv 1->20 5x5, pool, conv 20->50 5x5, pool, fc 800->500, ReLU, fc 500->10."""
    chain = (("conv1", None), ("conv2", None), ("fc1", "relu"), ("fc2", None))

    def __init__(self, in_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.conv1 = MaskedConv2d(in_shape[0], 20, 5)
        self.conv2 = MaskedConv2d(20, 50, 5)
        self.fc1 = MaskedLinear(50 * _flat_size(in_shape, [(5, True), (5, True)]), 500)
        self.fc2 = MaskedLinear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)  # Caffe's LeNet has no ReLU after the convs
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class _BasicBlockA(nn.Module):
    """He et al. 2016 section 4.2 basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the identity,
    then ReLU. Where the block halves the map and doubles the channels, the shortcut is option
    A: take every other pixel and zero-pad the new channels, so it has no parameters.
    x: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = MaskedConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = MaskedConv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))  # (W, H, C) pads

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 section 4.2, the CIFAR-10 ResNets of the compression literature (TTQ,
    Distiller, lottery tickets): a 3x3 conv of 16 channels, three stages of n basic blocks at
    16, 32 and 64 channels (the second and third start with stride 2), global average pool,
    fc. 6n + 2 layers: n = 3 is ResNet-20 (269,722 parameters), n = 9 ResNet-56 (853,018).
    Convs and fc masked; batch-norm dense. x: (N, 3, 32, 32) -> logits (N, num_classes)."""

    def __init__(self, n, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        self.conv1 = MaskedConv2d(in_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlockA(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = MaskedLinear(64, num_classes)
        for m in self.modules():  # He init for the convs, as the paper (section 3.4)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def resnet20(in_shape=(3, 32, 32), num_classes=10):
    """CIFAR ResNet-20 (He et al. 2016 section 4.2, n = 3): 269,722 parameters."""
    return CifarResNet(3, in_shape, num_classes)


def resnet56(in_shape=(3, 32, 32), num_classes=10):
    """CIFAR ResNet-56 (He et al. 2016 section 4.2, n = 9): 853,018 parameters."""
    return CifarResNet(9, in_shape, num_classes)


def resnet18(in_shape=(3, 224, 224), num_classes=10, pretrained=False, cifar_stem=False):
    """torchvision's ResNet-18 with every Conv2d / Linear masked (batch-norm stays dense).

    pretrained: load torchvision's ImageNet weights (downloaded once into $TORCH_HOME).
    cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32x32 inputs. The last layer is
    always refitted to num_classes."""
    net = _torchvision("resnet18", pretrained)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_shape[0], 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_shape[0] != 3:
        net.conv1 = nn.Conv2d(in_shape[0], 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return to_masked(net)


def _torchvision(name, pretrained):
    """torchvision's model `name`, with its ImageNet weights (IMAGENET1K_V1, downloaded once
    into $TORCH_HOME) when `pretrained`, else freshly initialised."""
    import torchvision

    weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"] if pretrained else None
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # no network and no cached file
        raise RuntimeError(f"could not load ImageNet weights for {name} ({type(e).__name__}): connect to the "
                           "internet once, put the file under $TORCH_HOME/hub/checkpoints, or set "
                           "--pretrained=False") from None


def _imagenet_model(name, num_classes, pretrained):
    """torchvision's `name` (a network whose head is `classifier`) with every Conv2d / Linear
    masked; a head for other than 1,000 classes is refitted (new last Linear)."""
    net = _torchvision(name, pretrained)
    if num_classes != net.classifier[-1].out_features:
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return to_masked(net)


def alexnet(in_shape=(3, 224, 224), num_classes=1000, pretrained=False):
    """AlexNet (torchvision's single-tower variant, 61,100,840 parameters), the paper's first
    ImageNet network (Table 4: 35x); every conv and fc masked."""
    return _imagenet_model("alexnet", num_classes, pretrained)


def vgg16(in_shape=(3, 224, 224), num_classes=1000, pretrained=False):
    """VGG-16 (torchvision's, 138,357,544 parameters), the paper's Table 5 network (49x);
    every conv and fc masked."""
    return _imagenet_model("vgg16", num_classes, pretrained)


MODELS = {"lenet_300_100": LeNet300100, "lenet5": LeNet5, "lenet5_caffe": LeNet5Caffe,
          "resnet18": resnet18, "resnet20": resnet20, "resnet56": resnet56, "alexnet": alexnet, "vgg16": vgg16}
PRETRAINED = ("resnet18", "alexnet", "vgg16")  # the models with torchvision's ImageNet weights


class Ensemble(nn.Module):
    """Networks whose logits are averaged, (N, ...) -> (N, classes): a snapshot ensemble
    (Huang et al. 2017), the networks one training run passed through at the ends of its
    learning-rate cycles, as a distillation teacher."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


def teacher_from(initial, which):
    """Stage 1's dense network, as a distillation teacher, from its {model}_initial.pt
    checkpoint `initial`: which='dense' that network; 'snapshots' that network and the
    snapshots kept at the end of each cosine cycle before a warm restart (`initial['snapshots']`,
    a list of state dicts), logits averaged. Returns the model on the CPU, in eval mode."""
    if which not in ("dense", "snapshots"):
        raise ValueError(f"unknown teacher {which!r}; choose dense or snapshots")
    states = [initial["state_dict"]] + (list(initial.get("snapshots", [])) if which == "snapshots" else [])
    members = []
    for state in states:
        net = build_model(initial["model"]["name"], **initial["model"]["kwargs"])
        net.load_state_dict(state)
        members.append(net)
    return (members[0] if len(members) == 1 else Ensemble(members)).eval()


# --- networks the project does not register: torchvision's, and a user's factory -------------------

TORCHVISION = "torchvision."  # --model=torchvision.<builder>
# Builders whose defaults do not fit a classifier trained here: the auxiliary heads return a
# tuple in training mode, which the loss does not take.
TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}
_FACTORIES = {}  # (module, factory) -> the callable, for the factories a user has named (name_factory)


def model_kind(name):
    """'registered' (models.MODELS), 'torchvision' ('torchvision.<builder>') or 'factory'
    ('path/to/file.py:factory' or 'package.module:factory'); ValueError for anything else."""
    if name in MODELS:
        return "registered"
    if name.startswith(TORCHVISION) and ":" not in name:
        return "torchvision"
    module, sep, factory = name.rpartition(":")
    if sep and factory.isidentifier() and (module.endswith(".py")
                                           or all(p.isidentifier() for p in module.split("."))):
        return "factory"
    raise ValueError(f"unknown model {name!r}; give one of {', '.join(MODELS)}, torchvision.<builder>, "
                     "path/to/file.py:factory or package.module:factory")


def factory_key(name):
    """('module', 'factory') naming a factory wherever its file lies: 'nets/small.py:build' and
    '/home/me/nets/small.py:build' are both ('small', 'build')."""
    module, _, factory = name.rpartition(":")
    if module.endswith(".py"):
        module = os.path.splitext(os.path.basename(module))[0]
    return module, factory


def recorded_name(name):
    """The --model string as checkpoints and .dc headers record it: a factory file without its
    folders ('/home/me/nets/small.py:build' -> 'small.py:build'), so a file holds no local path;
    a factory is found by factory_key, which the folders do not change."""
    module, sep, factory = name.rpartition(":")
    return os.path.basename(module) + sep + factory if model_kind(name) == "factory" and module.endswith(".py") \
        else name


def file_stem(name):
    """The stem of a network's output files: the name itself, or 'module.factory' for a factory
    (a path holds slashes)."""
    return ".".join(factory_key(name)) if model_kind(name) == "factory" else name


def torchvision_builders():
    """The names of torchvision's classification builders."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_model(name):
    """Check a --model string before any work; a factory the user names is imported here (their
    naming it is the consent to run its code, which no file can give). ValueError on a bad name,
    a missing file, module or factory."""
    kind = model_kind(name)
    builders = torchvision_builders() if kind == "torchvision" else []
    if kind == "torchvision" and name[len(TORCHVISION):] not in builders:
        close = difflib.get_close_matches(name[len(TORCHVISION):], builders, 3)
        raise ValueError(f"torchvision has no classification builder {name[len(TORCHVISION):]!r}"
                         + (f"; did you mean {', '.join(TORCHVISION + c for c in close)}?" if close else
                            "; see torchvision.models.list_models(module=torchvision.models)"))
    if kind == "factory":
        name_factory(name)
    return kind


def name_factory(name):
    """Import the factory `name` ('path/to/file.py:factory' or 'package.module:factory') and
    remember it, so that build_model can build networks that name the same (module, factory).
    The only place where code of the user's is imported: call it with what the user named."""
    module_name, _, factory = name.rpartition(":")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"no file {module_name} (from --model={name})")
            folder = os.path.dirname(os.path.abspath(module_name))
            if folder not in sys.path:  # the file may import its neighbours, as `python file.py` lets it
                sys.path.insert(0, folder)
            spec = importlib.util.spec_from_file_location(f"user_model_{factory_key(name)[0]}", module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a package in the folder the user runs from
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot import {module_name} for --model={name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {factory!r} (from --model={name})")
    _FACTORIES[factory_key(name)] = fn


def _replace_module(net, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _fit_torchvision(net, in_shape, num_classes, pretrained):
    """Fit a torchvision network to the data: its first conv to in_shape[0] channels (pretrained:
    the RGB filters summed and shared among them, so that an image whose channels are all one
    grey sees what the RGB network saw of it in colour-less grey) and, when pretrained, its head
    (the last Linear or Conv2d) refitted to num_classes."""
    layers = [(n, m) for n, m in net.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    name, first = next(((n, m) for n, m in layers if isinstance(m, nn.Conv2d)), (None, None))
    if first is not None and first.in_channels != in_shape[0]:
        conv = nn.Conv2d(in_shape[0], first.out_channels, first.kernel_size, first.stride, first.padding,
                         first.dilation, first.groups, first.bias is not None, first.padding_mode)
        if pretrained:
            with torch.no_grad():
                conv.weight.copy_(first.weight.sum(1, keepdim=True).expand_as(conv.weight) / in_shape[0])
                if first.bias is not None:
                    conv.bias.copy_(first.bias)
        _replace_module(net, name, conv)
    name, head = layers[-1]
    out = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if pretrained and out != num_classes:
        new = (nn.Linear(head.in_features, num_classes, head.bias is not None) if isinstance(head, nn.Linear)
               else nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride, head.padding))
        _replace_module(net, name, new)
    return net


def _build_torchvision(builder, in_shape=(3, 224, 224), num_classes=1000, pretrained=False, model_args=None):
    """torchvision's `builder` (any classification builder) with model_args as keywords, its
    first conv fitted to in_shape's channels and its head to num_classes; pretrained: its DEFAULT
    weights (downloaded once into $TORCH_HOME)."""
    import torchvision

    args = {**TORCHVISION_DEFAULTS.get(builder, {}), **(model_args or {})}
    if pretrained:
        # Weights come with their auxiliary heads, which torchvision insists on building
        # (aux_logits=True, init_weights=False): they are dropped after loading instead.
        no_aux = {k: v for k, v in args.items() if k not in TORCHVISION_DEFAULTS.get(builder, {})}
        try:
            net = torchvision.models.get_model(builder, weights="DEFAULT", **no_aux)
        except Exception as e:  # no network and no cached file
            raise RuntimeError(f"could not load the pretrained weights of {builder} ({type(e).__name__}: {e}); "
                               "connect to the internet once, or set --pretrained=False") from None
        if builder in TORCHVISION_DEFAULTS:
            net.aux_logits = False
            for head in ("aux1", "aux2", "AuxLogits"):
                if hasattr(net, head):
                    setattr(net, head, None)
    else:
        net = torchvision.models.get_model(builder, weights=None, num_classes=num_classes, **args)
    return _fit_torchvision(net, in_shape, num_classes, pretrained)


def _build_factory(name, in_shape, num_classes, model_args=None):
    """The user's factory `name`, named before by name_factory, called with model_args as
    keywords, plus num_classes and in_shape where it takes them."""
    fn = _FACTORIES.get(factory_key(name))
    if fn is None:
        module, factory = factory_key(name)
        raise ValueError(f"this network comes from the factory {factory!r} of module {module!r}, whose code "
                         f"runs only when you name it: add --model=<path to {module}.py>:{factory}")
    args = dict(model_args or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes = lambda key: key in params or any(p.kind == p.VAR_KEYWORD for p in params.values())  # noqa: E731
    if takes("num_classes"):
        args.setdefault("num_classes", num_classes)
    if "in_shape" in params:
        args.setdefault("in_shape", tuple(in_shape))
    net = fn(**args)
    if not isinstance(net, nn.Module):
        raise ValueError(f"{name} returned a {type(net).__name__}, not an nn.Module")
    return net


def unmaskable(model):
    """[(name, class name)] of the layers with weights of their own that the stages leave dense
    and that are not normalisation layers: every nn.Linear and nn.Conv2d is masked, the rest
    (Conv1d, ConvTranspose2d, Embedding, attention's projections, ...) is stored as it is."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return [(n, type(m).__name__) for n, m in model.named_modules()
            if not isinstance(m, MASKED + norms) and any(True for _ in m.parameters(recurse=False))]


def build_model(name, **kwargs):
    """Build a model by name; kwargs (JSON-able: in_shape, num_classes, ...) go to its constructor.
    name: a key of MODELS, 'torchvision.<builder>' (kwargs in_shape, num_classes, pretrained,
    model_args) or a factory named before with name_factory (kwargs in_shape, num_classes,
    model_args). Every nn.Linear / nn.Conv2d of the last two becomes its masked twin."""
    kind = model_kind(name)
    kwargs = dict(kwargs)
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
    if kind == "torchvision":
        return to_masked(_build_torchvision(name[len(TORCHVISION):], **kwargs))
    if kind == "factory":
        return to_masked(_build_factory(name, **kwargs))
    return MODELS[name](**kwargs)
