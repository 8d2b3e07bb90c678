"""A killed stage resumes to the same result (training.Progress through pruning.py and
quantization.py): SIGKILL in the middle of dynamic network surgery, or of the centroids'
fine-tuning, then --resume=True: the checkpoint and the JSON are the uninterrupted run's, bit
for bit; so in every other phase (dense training, the warm restart, a second prune-retrain
cycle, variational dropout and the retraining after it, TTQ), stopped in process; resuming with other settings, or from a damaged state, is a
one-line error."""
import json
import os
import shutil
import sys

import pytest
import torch

import training
from conftest import ROOT, kill_when, run_here

STAGE1 = ["--subset=300", "--epochs=1", "--retrain_epochs=3", "--batch_size=2", "--lr=0.01", "--retrain_lr=0.01",
          "--prune_method=dns", "--dns_threshold=density", "--dns_ramp=0.5", "--sensitivity=1.0", "--device=cpu"]


def same_outputs(a, b, stem, stage):
    """Two run folders hold the same checkpoint (every tensor bit for bit) and the same JSON
    summary (the seconds each step took aside)."""
    x = torch.load(os.path.join(a, f"{stem}_{stage}.pt"), weights_only=True)
    y = torch.load(os.path.join(b, f"{stem}_{stage}.pt"), weights_only=True)
    assert set(x["state_dict"]) == set(y["state_dict"])
    assert all(torch.equal(v, y["state_dict"][k]) for k, v in x["state_dict"].items())
    untimed = lambda o: {k: untimed(v) for k, v in o.items() if k != "seconds"} if isinstance(o, dict) else \
        [untimed(v) for v in o] if isinstance(o, list) else o  # noqa: E731
    load = lambda folder: untimed(json.load(open(os.path.join(folder, f"{stem}_{stage}.json"))))  # noqa: E731
    assert load(a) == load(b)


def test_stages_killed_mid_phase_resume_to_the_uninterrupted_result(fake_mnist, tmp_path, monkeypatch, capsys):
    """SIGKILL: stage 1 in surgery, stage 2 in fine-tuning; the uninterrupted and the resumed runs in process."""
    # bit for bit needs the same threads in the killed processes and in this one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kill_and_resume(fake_mnist, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def kill_and_resume(fake_mnist, tmp_path, capsys):
    run, whole = tmp_path / "run", tmp_path / "whole"
    stage1 = [os.path.join(ROOT, "pruning.py"), f"--data_root={fake_mnist}",
              f"--out_dir={run}", *STAGE1]
    code, _, err = run_here("pruning", *stage1[1:], capsys=capsys)
    assert code == 0, err
    assert not os.path.exists(run / "lenet_300_100_pruning.resume.pt")  # a finished stage leaves no state
    shutil.copytree(run, whole)
    shutil.rmtree(run)

    # stage 1, killed in surgery's second epoch (after its density ramp has begun), then resumed
    state = run / "lenet_300_100_pruning.resume.pt"
    assert kill_when([sys.executable, *stage1], state, "retrain1", 1)[0] != 0
    assert torch.load(state, weights_only=True)["current"]["label"] == "retrain1"
    code, out, err = run_here("pruning", *stage1[1:], "--resume=True", capsys=capsys)
    assert code == 0, err
    assert "resuming from" in out and "retrain1 epoch" in out
    same_outputs(run, whole, "lenet_300_100", "pruned")

    # stage 2, killed while it fine-tunes the centroids
    stage2 = [os.path.join(ROOT, "quantization.py"), f"--data_root={fake_mnist}",
              f"--out_dir={run}", "--finetune_epochs=3", "--device=cpu"]
    assert run_here("quantization", *stage2[1:], capsys=capsys)[0] == 0
    for name in ("lenet_300_100_quantized.pt", "lenet_300_100_quantized.json"):
        shutil.move(run / name, whole / name)
    state = run / "lenet_300_100_quantization.resume.pt"
    assert kill_when([sys.executable, *stage2], state, "finetune", 1)[0] != 0
    code, _, err = run_here("quantization", *stage2[1:], "--lr=1e-3", "--resume=True", capsys=capsys)
    assert code == 2 and "was written with lr=0.0003, not 0.001" in err and len(err.splitlines()) == 1  # refused
    code, _, err = run_here("quantization", *stage2[1:], "--resume=True", capsys=capsys)
    assert code == 0, err
    same_outputs(run, whole, "lenet_300_100", "quantized")
    assert not state.exists()  # the finished stage removed its state

    # a damaged state is a one-line error, never a silent fresh start
    state.write_bytes(b"not a state")
    code, _, err = run_here("quantization", *stage2[1:], "--resume=True", capsys=capsys)
    assert code == 2 and "is not a readable resume state" in err and len(err.splitlines()) == 1


class Killed(Exception):
    """Raised right after a state is written: the process ends there, as under SIGKILL."""


@pytest.mark.parametrize("stage,label,args", [
    ("pruning", "train", ["--epochs=3", "--prune_method=std"]),
    ("pruning", "restart", ["--epochs=1", "--restart_epochs=3", "--prune_method=std"]),
    ("pruning", "retrain2", ["--epochs=1", "--prune_method=std", "--prune_iterations=2"]),
    ("pruning", "vd", ["--epochs=1", "--prune_method=vd", "--vd_epochs=3", "--retrain_epochs=1"]),  # log_sigma2 too
    ("pruning", "retrain1", ["--epochs=1", "--prune_method=vd", "--vd_epochs=1"]),  # after vd's phase
    ("quantization", "ttq", ["--method=ttq", "--source=initial", "--finetune_epochs=3"]),
])
def test_every_phase_resumes_in_process(fake_mnist, tmp_path, capsys, monkeypatch, stage, label, args):
    common = [f"--data_root={fake_mnist}", f"--out_dir={tmp_path}"]
    first = ["--subset=300", "--epochs=1", "--retrain_epochs=3", "--sensitivity=1.0"]
    if stage == "quantization":
        assert run_here("pruning", *common, *first, capsys=capsys)[0] == 0
    out = "quantized" if stage == "quantization" else "pruned"
    run = lambda *more: run_here(stage, *common, *([] if stage == "quantization" else first), *args, *more,  # noqa: E731
                                 capsys=capsys)
    assert run()[0] == 0
    whole = tmp_path / "whole"
    whole.mkdir()
    for suffix in (".pt", ".json"):
        shutil.move(tmp_path / f"lenet_300_100_{out}{suffix}", whole / f"lenet_300_100_{out}{suffix}")

    real = training.Progress.end_epoch

    def end_epoch(self, phase, epoch, *rest):
        real(self, phase, epoch, *rest)
        if (phase, epoch) == (label, 2):
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(training.Progress, "end_epoch", end_epoch)
        with pytest.raises(Killed):
            run()
    code, text, err = run("--resume=True")
    assert code == 0, err
    assert f"resuming from {tmp_path}/lenet_300_100_{stage}.resume.pt: {label} epoch 2" in text
    same_outputs(tmp_path, whole, "lenet_300_100", out)
