"""The training loop and evaluation of both training stages: fit() (SGD or Adam, cosine
schedule, optional bf16 autocast, distillation and a penalty term), evaluate() in float32,
Report, the accuracy of a network at the named points of a stage, and Progress, the state a
killed stage resumes from."""
import dataclasses
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import PRECISIONS, UserError, all_sum, is_main, layer_stats, layer_table, require, save_tensors


def memory_format(model):
    """channels_last for networks with convolutions (oneDNN's and cuDNN's fast layout for
    them), else the default: the format fit() and evaluate() put the model and inputs in."""
    return torch.channels_last if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) \
        else torch.contiguous_format


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


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How fit() trains, beside its epochs and learning rate (the stages' settings of the same
    names)."""
    optimizer: str = "adam"      # adam | sgd (momentum 0.9, Nesterov)
    schedule: str = "cosine"     # cosine (to 0 over the run) | constant
    weight_decay: float = 0.0    # L2 penalty
    precision: str = "fp32"      # fp32 | bf16 (the forward pass under autocast)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Knowledge distillation (Hinton et al. 2015): a frozen teacher whose softened outputs the
    model learns beside the labels."""
    teacher: torch.nn.Module
    weight: float                # the soft term's share of the loss, in [0, 1]
    temperature: float = 4.0     # softmax temperature T


def fit(model, params, train, val, epochs, lr, options=TrainOptions(), label="train", after_step=None,
        distill=None, penalty=None, progress=None):
    """Train `params` of `model` for `epochs` at learning rate `lr`, printing one summary line
    per epoch.

    options: a TrainOptions. Under precision bf16 the matrix products run in bfloat16; the
    parameters, their gradients, the optimizer state and the masks stay float32, so a pruned
    weight still gets exactly zero gradient. Conv networks train in channels_last memory format.
    after_step: called with no arguments after every optimizer step (dynamic network surgery
    updates its masks there).
    distill: a Distillation, or None: loss = (1 - weight) x cross-entropy + weight x T^2 x
    KL(softmax(teacher / T) || softmax(model / T)); the T^2 keeps the soft term's gradients on
    the scale of the hard one's (Hinton et al. section 2).
    penalty: a function of no arguments whose value (a scalar tensor, in float32) is added to
    every step's loss (a group-lasso term, prune.group_lasso_penalty).
    progress: a Progress, or None: the phase (`label`) resumes from its state, and writes it
    at the end of every epoch.
    Returns the history [{epoch, train_loss, train_acc, val_loss, val_acc, seconds}]."""
    schedule, precision = options.schedule, options.precision
    teacher, weight, temperature = (distill.teacher, distill.weight, distill.temperature) if distill \
        else (None, 0.0, 1.0)
    require(schedule in SCHEDULES, f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    opt = make_optimizer(options.optimizer, params, lr, options.weight_decay)
    steps = max(epochs * len(train), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) if schedule == "cosine" else (lambda s: 1.0))
    require(precision in ("fp32", "bf16"), f"precision must be fp32 or bf16 here, not {precision!r}")
    require(0 <= weight <= 1 and temperature > 0, f"distill must be in [0, 1] and temperature > 0, "
            f"got {weight} and {temperature}")
    fmt = memory_format(model)
    if teacher is not None:
        teacher = teacher.to(memory_format=fmt).eval().requires_grad_(False)
    model = model.to(memory_format=fmt)
    device = next(model.parameters()).device
    net = model
    if torch.distributed.is_initialized():  # under torchrun: gradients averaged over the ranks every step
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    done, history = progress.begin(label, model, opt, sched, train, after_step) if progress else (0, [])
    for epoch in range(done + 1, epochs + 1):
        t0 = time.time()
        model.train()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), 0
        bar = tqdm(train, desc=f"{label} {epoch}/{epochs}", leave=False, mininterval=0.5, disable=not is_main())
        for xb, yb in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                xb = xb.contiguous(memory_format=fmt) if xb.dim() == 4 else xb
                out = net(xb)
                if weight:
                    with torch.no_grad():
                        soft = teacher(xb).float()
            loss = F.cross_entropy(out.float(), yb)
            if weight:
                loss = (1 - weight) * loss + weight * temperature ** 2 * F.kl_div(
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
        if progress:
            progress.end_epoch(label, epoch, epochs, model, opt, sched, train, after_step, history)
    return history


class Report:
    """The accuracy of `net` at the named points of a stage, on validation (what settings are
    chosen by) and on test (reported, never chosen by): {key: percent} in .validation and
    .accuracy. Each call prints the test line, then the header (the original run's order),
    then the per-layer table when `table` is set."""

    def __init__(self, net, val, test, table=False):
        self.net, self.val, self.test, self.table = net, val, test, table
        self.accuracy, self.validation = {}, {}

    def __call__(self, header, key):
        _, val_correct, val_total = evaluate(self.net, self.val)
        self.validation[key] = percent(val_correct, val_total)
        loss, correct, total = evaluate(self.net, self.test)
        self.accuracy[key] = percent(correct, total)
        print(test_line(loss, correct, total))
        print(f"--- {header} ---")
        if self.table:
            print(layer_table(layer_stats(self.net)))


def check_settings(cfg):
    """The checks both training stages share, each a one-line error that names the fix:
    precision, optimizer and schedule (where the stage has them), distillation and its teacher."""
    require(cfg["precision"] in PRECISIONS,
            f"unknown precision {cfg['precision']!r}; choose one of {', '.join(PRECISIONS)}")
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        require(cfg.get(key, choices[0]) in choices,
                f"unknown {key} {cfg.get(key)!r}; choose one of {', '.join(choices)}")
    require(0 <= cfg["distill"] <= 1, f"distill must be in [0, 1], got {cfg['distill']}")
    require(cfg["distill_temperature"] > 0, f"distill_temperature must be > 0, got {cfg['distill_temperature']}")
    require(cfg["teacher"] in ("dense", "snapshots"), f"unknown teacher {cfg['teacher']!r}; choose dense or snapshots")
    require(cfg["teacher"] == "dense" or cfg["distill"] > 0,
            "teacher=snapshots teaches through distillation: set --distill (0.9 in the ResNet-20 recipe)")


# --- resuming a killed stage -------------------------------------------------------------------

class Progress:
    """A training stage's resumable state, in one file written atomically at the end of every
    epoch: the stage's settings; for each training phase finished (fit's label) the network,
    the random states (torch, CUDA, numpy, Python, the training data's order) and the history
    at its end; for the phase under way the same at its last epoch, plus the optimizer, the
    learning-rate schedule and the after-step hook's state.

    A stage resumes by running again from its start: the steps between phases (pruning,
    k-means, evaluations) recompute the same results from the same network, each phase the
    file records as finished is replaced by its end state, and the phase under way continues
    from its last epoch, so the stage's outputs are those of a run never stopped (bit for bit
    on the same device and threads). `path`: the state file; settings: the stage's; resume:
    whether to read an existing file (else it is replaced as the stage goes; a stage that
    torchrun restarted reads it too). Raises UserError where the file cannot be read or was
    written with other settings."""

    IGNORED = ("resume", "device")  # settings a resumed stage may change

    def __init__(self, path, settings, resume):
        self.path, self.settings = path, {k: v for k, v in settings.items() if k not in self.IGNORED}
        self.state = dict(settings=self.settings, finished={}, current=None)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun --max-restarts
        self.resumed = bool((resume or restarted) and os.path.exists(path))
        if not self.resumed:
            return
        hint = f"delete {path} to start the stage again, or run without --resume"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable resume state ({type(e).__name__}): {hint}") from None
        require(isinstance(state, dict) and {"settings", "finished", "current"} <= set(state),
                f"{path} is not a resume state: {hint}")
        differ = next((k for k in sorted(set(self.settings) | set(state["settings"]))
                       if self.settings.get(k) != state["settings"].get(k)), None)
        require(differ is None, f"{path} was written with {differ}={state['settings'].get(differ)!r}, not "
                                f"{self.settings.get(differ)!r}: resume with the same settings, or {hint}")
        self.state = state

    def where(self):
        """'phase epoch N' of the latest state, for the stage's first lines."""
        current, finished = self.state["current"], list(self.state["finished"])
        if current:
            return f"{current['label']} epoch {current['epoch']}"
        return f"the end of {finished[-1]}" if finished else "the start"

    def begin(self, label, model, opt, sched, train, after_step):
        """Before phase `label` trains: restore what the file holds of it. -> (epochs done,
        history so far); a finished phase comes back whole (its epochs all done)."""
        if label in self.state["finished"]:
            done = self.state["finished"][label]
            _restore(done, model, train)
            return len(done["history"]), list(done["history"])
        current = self.state["current"]
        if current is None or current["label"] != label:
            return 0, []
        _restore(current, model, train)
        opt.load_state_dict(current["optimizer"])
        sched.load_state_dict(current["scheduler"])
        if after_step is not None and hasattr(after_step, "load_state_dict"):
            after_step.load_state_dict(current["after_step"])
        return current["epoch"], list(current["history"])

    def end_epoch(self, label, epoch, epochs, model, opt, sched, train, after_step, history):
        """After each epoch of phase `label`: write the state (atomically; rank 0 only)."""
        snapshot = _snapshot(model, train, history)
        if epoch == epochs:
            self.state["finished"][label] = snapshot
            self.state["current"] = None
        else:
            self.state["current"] = dict(snapshot, label=label, epoch=epoch, optimizer=opt.state_dict(),
                                         scheduler=sched.state_dict(),
                                         after_step=after_step.state_dict() if hasattr(after_step, "state_dict")
                                         else {})
        save_tensors(self.path, self.state)

    def close(self):
        """The stage wrote its outputs: its state is no longer needed."""
        if is_main() and os.path.exists(self.path):
            os.remove(self.path)


def _snapshot(model, train, history):
    """What a phase needs to continue from here: the network, the random states and the
    history (copies, so that later steps do not change them)."""
    return dict(model={k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                rng=dict(torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                         numpy=_numpy_state(), python=_python_state()),
                data=train.state_dict(), history=[dict(h) for h in history])


def _restore(snapshot, model, train):
    model.load_state_dict(snapshot["model"])
    torch.set_rng_state(snapshot["rng"]["torch"])
    if snapshot["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot["rng"]["cuda"])
    np.random.set_state(("MT19937", snapshot["rng"]["numpy"]["key"].numpy().astype(np.uint32),
                        *snapshot["rng"]["numpy"]["rest"]))
    random.setstate((snapshot["rng"]["python"][0], tuple(snapshot["rng"]["python"][1]), snapshot["rng"]["python"][2]))
    train.load_state_dict(snapshot["data"])


def _numpy_state():
    """numpy's global random state as tensors and plain numbers (weights_only loads them)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(key=torch.from_numpy(key.astype(np.int64)), rest=[int(pos), int(has_gauss), float(gauss)])


def _python_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def recorded(settings):
    """A stage's settings as its checkpoint and JSON record them: without resume, so that a
    resumed run writes what an uninterrupted one does."""
    return {k: v for k, v in settings.items() if k != "resume"}
