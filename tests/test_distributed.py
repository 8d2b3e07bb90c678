"""The stages under torchrun: two CPU ranks (gloo, one thread each) train like one process
with the same global batch, keep their masks and codebooks identical, and only rank 0 prints
and writes."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import util
from conftest import ROOT, children, kill_when, run_script


def torchrun_argv(script, *args, ranks=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            os.path.join(ROOT, script), *args]


def torchrun(script, *args, ranks=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run(torchrun_argv(script, *args, ranks=ranks), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_two_ranks_prune_and_quantize_as_one_process(fake_mnist, tmp_path):
    common = [f"--data_root={fake_mnist}", "--subset=400", "--epochs=4", "--retrain_epochs=1", "--lr=0.02",
              "--sensitivity=1.0", "--prune_method=dns", "--device=cpu"]
    two, one = tmp_path / "two", tmp_path / "one"
    r = torchrun("pruning.py", *common, "--batch_size=32", f"--out_dir={two}")  # 2 x 32 a step
    assert r.returncode == 0, r.stderr
    # rank 0 alone prints, evaluates and writes; pruning.py checks that the ranks' masks are identical
    assert r.stdout.count("--- Before pruning ---") == 1 and r.stdout.count("train epoch   4/4") == 1
    assert sorted(os.listdir(two)) == ["lenet_300_100_initial.pt", "lenet_300_100_pruned.json",
                                       "lenet_300_100_pruned.pt"]
    r = torchrun("quantization.py", f"--data_root={fake_mnist}", f"--out_dir={two}", "--finetune_epochs=1",
                 "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- After clustering") == 1 and os.path.isfile(two / "lenet_300_100_quantized.json")
    r = run_script("pruning.py", *common, "--batch_size=64", f"--out_dir={one}")  # one process, 64 a step
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "lenet_300_100_pruned.json").read_text()) for d in (two, one))
    assert a["params"]["total"] == b["params"]["total"]
    # the same steps over the same images, in another order: close, not equal
    assert abs(a["accuracy"]["dense"] - b["accuracy"]["dense"]) < 10 and min(a["accuracy"]["dense"],
                                                                            b["accuracy"]["dense"]) > 30  # chance: 10%


def test_a_killed_rank_restarts_the_group_from_its_state(fake_mnist, tmp_path, monkeypatch):
    """torchrun --max-restarts: one rank killed in surgery, the group restarts and resumes from
    the state rank 0 wrote, to the network an uninterrupted group trains."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--max-restarts=1", f"--data_root={fake_mnist}", "--subset=300", "--epochs=1", "--retrain_epochs=3",
            "--batch_size=2", "--lr=0.01", "--prune_method=dns", "--sensitivity=1.0", "--device=cpu",
            f"--out_dir={tmp_path}"]
    r = torchrun("pruning.py", *args[1:])
    assert r.returncode == 0, r.stderr
    whole = torch.load(tmp_path / "lenet_300_100_pruned.pt", weights_only=True)["state_dict"]
    os.remove(tmp_path / "lenet_300_100_pruned.pt")
    argv = torchrun_argv("pruning.py", *args[1:])
    argv.insert(argv.index("--standalone"), args[0])
    last_rank = lambda agent: children(agent)[-1]  # noqa: E731  (the agent starts rank 0, then rank 1)
    code, log = kill_when(argv, tmp_path / "lenet_300_100_pruning.resume.pt", "retrain1", 1, victim=last_rank)
    assert code == 0, log[-3000:]  # the agent restarted both ranks, and they finished
    resumed = torch.load(tmp_path / "lenet_300_100_pruned.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, resumed[k]) for k, v in whole.items())


def test_a_failing_rank_ends_every_rank(tmp_path):
    r = torchrun("pruning.py", f"--out_dir={tmp_path}", "--data_root=/nonexistent/file", "--subset=10")
    assert r.returncode != 0 and "error: mnist train set not found" in r.stderr  # and no hang: the timeout
    assert os.listdir(tmp_path) == []


def _rank(rank, world, port, differ, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        util.same_on_every_rank([torch.arange(5.0) + (rank if differ else 0)], "the masks")
        result[rank] = "same"
    except RuntimeError as e:
        result[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_same_on_every_rank(differ):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, differ, result), nprocs=2)
    assert set(result.values()) == ({"the masks differ between ranks"} if differ else {"same"})


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    # rank 1 of 2 on a machine with one GPU: refused before any process group or device is touched
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(util.UserError, match=r"rank 1 would take GPU 1, but this machine has 1: give torchrun "
                                             r"--nproc_per_node <= 1"):
        util.join_ranks(torch.device("cuda"))
    assert not dist.is_initialized()
