"""Shared plumbing for the stage scripts: settings and recipes, the device and the ranks under
torchrun, the per-layer table, checkpoints and JSON summaries written atomically. Data sets
live in datasets.py, the training loop in training.py. Nothing here prints but run_stage's
one-line errors and start_stage's device line."""
import ast
import json
import os
import sys
import tempfile
import time

import torch


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
    # --granularity=16 reads as the number 16: a string that looks like a number needs its own quotes
    quote = f"; quote it as a string, '{value}'" if want is str and type(value) in (int, float) else ""
    raise UserError(f"setting {key} expects {want.__name__}, got {value!r} ({type(value).__name__}){quote}")


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
        if "/" in cfg["model"] or ":" in cfg["model"] or not os.path.isfile(path):  # a factory has no recipe here
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
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across its restarts (--max-restarts), where a new group
        # would read the last round's addresses (gloo: connectFullMesh refused): a prefix per round
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"round{round_}", store), rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)
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


def best_time(fn, reps):
    """For benchmarks: (best wall time in seconds over `reps` calls of fn(), the last result)."""
    best, result = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


# --- the per-layer table of the original run ------------------------------------------------

def layer_stats(model):
    """[{name, shape, total, nonzero}] for every parameter of the network (not variational
    dropout's log_sigma2, which the checkpoint does not keep), in state-dict order. A masked
    layer's weight counts as weight * mask (during dynamic network surgery the pruned
    weights are kept but do not compute)."""
    masks = {f"{n}.weight": m.mask for n, m in model.named_modules() if isinstance(getattr(m, "mask", None), torch.Tensor)}
    return [dict(name=n, shape=list(p.shape), total=p.numel(),
                 nonzero=int((p * masks[n] != 0).sum() if n in masks else (p != 0).sum()))
            for n, p in model.named_parameters() if not n.endswith(".log_sigma2")]


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
