"""Stage 1 end to end (pruning.py): the script, its outputs and its one-line errors."""
import json
import os

import pytest
import torch

import prune
import util
from conftest import SHARED_DATA, run_here, run_script
from models import build_model


def test_pruning_script_end_to_end(fake_mnist, tmp_path):
    out = tmp_path / "out"
    r = run_script("pruning.py", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={out}",
                   "--epochs=2", "--retrain_epochs=1", "--prune_iterations=2", "--lr=0.01", "--retrain_lr=0.001",
                   "--sensitivity=1.0", "--optimizer=adam", "--prune_method=std", "--augment=none")
    assert "recipe: config/lenet5.py" in r.stdout  # the model's recipe, under these overrides
    assert r.returncode == 0, r.stderr
    for header in ("--- Before pruning ---", "--- After pruning (iteration 2) ---", "--- After Retraining ---"):
        assert header in r.stdout
    assert "Pruning with threshold : " in r.stdout and "Test set: Average loss: " in r.stdout
    summary = json.loads((out / "lenet5_pruned.json").read_text())
    assert set(summary["accuracy"]) == {"dense", "pruned", "retrained"}
    assert summary["accuracy"]["dense"] > 50  # the synthetic classes are learnable
    assert summary["params"]["total"] == 167_566
    assert summary["params"]["nonzero"] == sum(l["nonzero"] for l in summary["layers"])
    assert summary["params"]["nonzero"] < 0.5 * 167_566  # two iterations at sensitivity 1
    assert {"model", "dataset", "settings", "seconds", "layers"} <= set(summary)
    ckpt = util.load_checkpoint(str(out / "lenet5_pruned.pt"), "pruned", torch.device("cpu"), "")
    assert ckpt["metrics"]["accuracy"] == summary["accuracy"]
    assert os.path.isfile(out / "lenet5_initial.pt")


def test_a_layer_without_a_sensitivity_is_one_line(fake_mnist, tmp_path, capsys):
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={tmp_path}", "--subset=100",
                            "--sensitivity={'fc1': 1.0}", capsys=capsys)
    assert code == 2 and err.strip() == "error: sensitivity: no value for layer 'fc2' (add a '*' default)"
    assert os.listdir(tmp_path) == []


def test_dns_from_a_dense_checkpoint(fake_mnist, tmp_path, capsys):
    dense = tmp_path / "dense"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={dense}", "--subset=400",
                            "--epochs=2", "--retrain_epochs=1", "--lr=0.01", capsys=capsys)
    assert code == 0, err
    out = tmp_path / "dns"  # (with a group lasso on fc1 while it retrains)
    code, stdout, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                 f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                                 "--sensitivity=1.0", "--retrain_epochs=2", "--retrain_lr=0.01", "--optimizer=sgd",
                                 "--group_lasso={'fc1': 1e-4, '*': 0.0}", capsys=capsys)
    assert code == 0, err
    assert "dense network from" in stdout
    # the run's folder holds its dense network too (stage 2's source=initial reads it there)
    load = lambda folder: util.load_checkpoint(str(folder / "lenet_300_100_initial.pt"), "initial",  # noqa: E731
                                               torch.device("cpu"), "")["state_dict"]
    assert all(torch.equal(v, load(dense)[k]) for k, v in load(out).items())
    first = json.loads((dense / "lenet_300_100_pruned.json").read_text())
    summary = json.loads((out / "lenet_300_100_pruned.json").read_text())
    assert summary["accuracy"]["dense"] == first["accuracy"]["dense"]  # the same dense network
    assert "train" not in summary["history"]
    ckpt = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"), "")
    state = ckpt["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w, m = state[f"{layer}.weight"], state[f"{layer}.mask"]
        assert torch.equal(w != 0, m == 1) and 0 < m.mean() < 0.6  # surgery ended: zeros exactly where pruned
    # density-held surgery (under distillation, which moves a std rule's density): each layer ends with exactly
    # as many weights as the std rule left when surgery started (no band: no weight keeps its state)
    held = tmp_path / "held"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--dns_band=0.0", "--distill=0.9", "--sensitivity=1.0",
                            "--retrain_epochs=2", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    start, end = load(dense), util.load_checkpoint(str(held / "lenet_300_100_pruned.pt"), "pruned",
                                                    torch.device("cpu"), "")["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w0 = start[f"{layer}.weight"]
        assert int(end[f"{layer}.mask"].sum()) == int((w0.abs() >= w0.std()).sum()), layer
        assert not torch.equal(end[f"{layer}.mask"], (w0.abs() >= w0.std()).float()), layer  # others chosen
    # densities by the layers' shapes (erk_alive): each layer ends with the Erdos-Renyi-kernel count
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}_erk", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--erk_alive=0.1", "--dns_band=0.0",
                            "--retrain_epochs=1", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    end = util.load_checkpoint(f"{held}_erk/lenet_300_100_pruned.pt", "pruned", torch.device("cpu"),
                               "")["state_dict"]
    erk = prune.erk_densities(build_model("lenet_300_100"), 0.1)  # fc1 8.0%, fc2 23%, fc3 100%
    for layer in ("fc1", "fc2", "fc3"):
        assert abs(int(end[f"{layer}.mask"].sum()) - erk[layer] * end[f"{layer}.mask"].numel()) <= 1, layer
    # ramped (gradual pruning over the first half of surgery): the same counts at the end
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={held}_ramp", "--subset=400",
                            f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=dns",
                            "--dns_threshold=density", "--dns_ramp=0.5", "--dns_band=0.0", "--sensitivity=1.0",
                            "--retrain_epochs=2", "--retrain_lr=0.05", "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    end = util.load_checkpoint(f"{held}_ramp/lenet_300_100_pruned.pt", "pruned", torch.device("cpu"),
                               "")["state_dict"]
    for layer in ("fc1", "fc2", "fc3"):
        w0 = start[f"{layer}.weight"]
        assert int(end[f"{layer}.mask"].sum()) == int((w0.abs() >= w0.std()).sum()), layer
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--model=lenet5",
                            f"--init_from={dense}/lenet_300_100_initial.pt", capsys=capsys)
    assert code == 2 and "not the" in err and "lenet5" in err


def test_kernel_granular_surgery_keeps_whole_kernels_at_the_erk_counts(fake_mnist, tmp_path, capsys):
    out = tmp_path / "kernel"
    code, _, err = run_here("pruning", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={out}",
                            "--subset=300", "--epochs=1", "--prune_method=dns", "--dns_threshold=density",
                            "--erk_alive=0.2", "--granularity={'conv3': 'weight', 'fc1': '4', '*': 'kernel'}",
                            "--dns_band=0.0", "--retrain_epochs=1", "--lr=0.05", "--retrain_lr=0.05",
                            "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    state = util.load_checkpoint(str(out / "lenet5_pruned.pt"), "pruned", torch.device("cpu"), "")["state_dict"]
    erk = prune.erk_densities(build_model("lenet5"), 0.2)
    for layer in erk:
        w, m = state[f"{layer}.weight"], state[f"{layer}.mask"]
        assert torch.equal(w != 0, m == 1), layer  # surgery ended: zeros exactly where pruned
        size = m[0, 0].numel() if m.dim() == 4 else 4 if layer == "fc1" else 1  # a conv's kernel, fc1's run
        assert abs(int(m.sum()) - erk[layer] * m.numel()) <= size, layer  # the held count, to a kernel (no band)
        if m.dim() == 4:  # every kernel alive or pruned whole, but in conv3 (by weights)
            kernels = m.flatten(2)
            whole = ((kernels == 1).all(2) | (kernels == 0).all(2)).all()
            assert whole if layer != "conv3" else not whole, layer
            assert 0 < kernels[:, :, 0].mean() < 1 or erk[layer] == 1, layer
    runs = state["fc1.mask"].reshape(state["fc1.mask"].shape[0], -1, 4)  # fc1's inputs in runs of 4, each whole
    assert ((runs == 1).all(2) | (runs == 0).all(2)).all() and 0 < runs.mean() < 1
    # surgery's fixed std thresholds (sensitivity x the weights' std) compared with each kernel's root mean square
    code, _, err = run_here("pruning", "--model=lenet5", f"--data_root={fake_mnist}", f"--out_dir={out}_std",
                            "--subset=300", f"--init_from={out}/lenet5_initial.pt", "--prune_method=dns",
                            "--sensitivity=1.0", "--granularity=kernel", "--retrain_epochs=1", "--retrain_lr=0.05",
                            "--optimizer=sgd", capsys=capsys)
    assert code == 0, err
    mask = util.load_checkpoint(f"{out}_std/lenet5_pruned.pt", "pruned", torch.device("cpu"), "")["state_dict"]
    for layer in ("conv2", "conv3"):
        kernels = mask[f"{layer}.mask"].flatten(2)
        assert ((kernels == 1).all(2) | (kernels == 0).all(2)).all() and 0 < kernels.mean() < 1, layer


@pytest.fixture
def dense(fake_mnist, tmp_path, capsys):
    """A folder holding a LeNet-300-100 trained one epoch on 360 fake digits (lenet_300_100_initial.pt)."""
    out = tmp_path / "dense"
    code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                            "--epochs=1", "--retrain_epochs=0", capsys=capsys)
    assert code == 0, err
    return out


def test_variational_dropout_prunes_by_log_alpha(fake_mnist, dense, tmp_path, capsys):
    out = tmp_path / "vd"  # a KL weight far past the ELBO's, so that two short epochs prune
    code, stdout, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                 f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=vd",
                                 "--vd_lr=0.05", "--vd_epochs=2", "--batch_size=16", "--vd_beta=200.0", "--vd_ramp=0.0",
                                 "--retrain_epochs=1", "--retrain_lr=0.01", capsys=capsys)
    assert code == 0, err
    assert "Variational dropout on 3 layers for 2 epochs" in stdout and "log_sigma2" not in stdout
    state = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"), "")["state_dict"]
    initial = util.load_checkpoint(str(dense / "lenet_300_100_initial.pt"), "initial", torch.device("cpu"),
                                   "")["state_dict"]
    assert set(state) == set(initial)  # no log_sigma2: stage 2 rebuilds the same network
    for layer in ("fc1", "fc2", "fc3"):
        w, m = state[f"{layer}.weight"], state[f"{layer}.mask"]
        assert torch.equal(w != 0, m == 1), layer  # pruned weights are exact zeros
    assert state["fc1.mask"].mean() < 0.5  # the KL emptied most of fc1
    summary = json.loads((out / "lenet_300_100_pruned.json").read_text())
    assert [len(summary["history"][k]) for k in ("vd", "retrain1")] == [2, 1]  # then retrained, masks fixed
    assert summary["params"]["total"] == sum(v.numel() for k, v in initial.items() if not k.endswith("mask"))


def test_vd_sigma_lr_moves_the_log_variances_alone(fake_mnist, dense, tmp_path, capsys):
    initial = util.load_checkpoint(str(dense / "lenet_300_100_initial.pt"), "initial", torch.device("cpu"),
                                   "")["state_dict"]
    alive = {}
    for sigma_lr in (0.0, 0.5):  # 0: the log variances at vd_lr, far too slow to move in 23 steps
        out = tmp_path / f"sigma{sigma_lr}"
        code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=vd",
                                "--vd_lr=1e-7", f"--vd_sigma_lr={sigma_lr}", "--vd_epochs=1", "--batch_size=16",
                                "--vd_beta=200.0", "--vd_ramp=0.0", "--retrain_epochs=0", capsys=capsys)
        assert code == 0, err
        state = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"),
                                     "")["state_dict"]
        for layer in ("fc1", "fc2", "fc3"):  # the weights kept their rate: 23 Adam steps of about 1e-7 each
            w, m = state[f"{layer}.weight"], state[f"{layer}.mask"]
            assert (w - initial[f"{layer}.weight"] * m).abs().max() < 1e-5, layer
        alive[sigma_lr] = state["fc1.mask"].mean().item()
    w0 = initial["fc1.weight"]  # at vd_lr the masks are still those of the initial variances: log alpha < 3
    start = (prune.VD_INIT_LOG_SIGMA2 - torch.log(w0 * w0 + 1e-8) < 3.0).float().mean().item()
    assert alive[0.0] == pytest.approx(start, abs=1e-3) and alive[0.5] < start - 0.4


def test_retrain_weight_decay_acts_on_retraining_only(fake_mnist, dense, tmp_path, capsys):
    norms = {}
    for wd in (0.0, 20.0):  # fixed masks (std rule), the same batches: only the penalty differs
        out = tmp_path / f"wd{wd}"
        code, _, err = run_here("pruning", f"--data_root={fake_mnist}", f"--out_dir={out}", "--subset=400",
                                f"--init_from={dense}/lenet_300_100_initial.pt", "--prune_method=std",
                                "--sensitivity=1.0", "--retrain_epochs=1", "--retrain_lr=0.01", "--optimizer=sgd",
                                f"--retrain_weight_decay={wd}", "--weight_decay=0.0", capsys=capsys)
        assert code == 0, err
        state = util.load_checkpoint(str(out / "lenet_300_100_pruned.pt"), "pruned", torch.device("cpu"),
                                     "")["state_dict"]
        norms[wd] = sum(float(state[f"{n}.weight"].norm()) for n in ("fc1", "fc2", "fc3"))
        summary = json.loads((out / "lenet_300_100_pruned.json").read_text())
        assert summary["settings"]["retrain_weight_decay"] == wd
    # 3 steps at lr 0.01 x 20 with momentum shrink the survivors by about half; the loss's gradients cannot
    assert norms[20.0] < 0.8 * norms[0.0], norms


def test_a_warm_restart_keeps_a_snapshot_that_teaches(fake_mnist, tmp_path, capsys):
    """The network at the end of the first cosine cycle is kept in the restarted {model}_initial.pt,
    carried on by init_from, and teaches beside the last one in stages 1 and 2."""
    common = [f"--data_root={fake_mnist}", "--subset=300", "--prune_method=std", "--sensitivity=1.0"]
    first = tmp_path / "first"
    code, _, err = run_here("pruning", *common, f"--out_dir={first}", "--epochs=1", "--retrain_epochs=0",
                            capsys=capsys)
    assert code == 0, err
    load = lambda folder: util.load_checkpoint(str(folder / "lenet_300_100_initial.pt"), "initial",  # noqa: E731
                                               torch.device("cpu"), "")
    assert "snapshots" not in load(first)  # no restart, nothing kept
    restarted = tmp_path / "restarted"
    code, stdout, err = run_here("pruning", *common, f"--out_dir={restarted}", "--restart_epochs=1",
                                 f"--init_from={first}/lenet_300_100_initial.pt", "--retrain_epochs=1",
                                 "--distill=0.5", "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    ckpt = load(restarted)
    (snapshot,) = ckpt["snapshots"]
    assert all(torch.equal(v, snapshot[k]) for k, v in load(first)["state_dict"].items())
    assert not torch.equal(snapshot["fc1.weight"], ckpt["state_dict"]["fc1.weight"])  # the restart trained on
    carried = tmp_path / "carried"  # init_from without a restart keeps the snapshots it read
    code, stdout, err = run_here("pruning", *common, f"--out_dir={carried}", "--retrain_epochs=1",
                                 f"--init_from={restarted}/lenet_300_100_initial.pt", "--distill=0.5",
                                 "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    assert "and 1 snapshot(s)" in stdout
    assert torch.equal(load(carried)["snapshots"][0]["fc2.weight"], snapshot["fc2.weight"])
    code, _, err = run_here("quantization", f"--data_root={fake_mnist}", f"--out_dir={restarted}",
                            "--finetune_epochs=1", "--distill=0.5", "--teacher=snapshots", capsys=capsys)
    assert code == 0, err
    summary = json.loads((restarted / "lenet_300_100_quantized.json").read_text())
    assert summary["settings"]["teacher"] == "snapshots" and len(summary["history"]["finetune"]) == 1
    # without a snapshot to teach with: one line, before any training, nothing written
    for stage, args in (("pruning", [f"--init_from={first}/lenet_300_100_initial.pt", "--retrain_epochs=1"]),
                        ("quantization", ["--finetune_epochs=1"])):
        out = tmp_path / f"none_{stage}"
        if stage == "quantization":
            out.mkdir()
            for name in ("lenet_300_100_pruned.pt", "lenet_300_100_initial.pt"):
                (out / name).write_bytes((first / name).read_bytes())
        before = sorted(os.listdir(out)) if out.exists() else []
        subset = ["--subset=300"] if stage == "pruning" else []
        code, _, err = run_here(stage, f"--data_root={fake_mnist}", f"--out_dir={out}", *subset,
                                "--distill=0.5", "--teacher=snapshots", *args, capsys=capsys)
        assert code == 2 and "holds no snapshot" in err and len(err.strip().splitlines()) == 1, err
        assert (sorted(os.listdir(out)) if out.exists() else []) == before


@pytest.mark.parametrize("args,message", [
    (["--model=vgg"], "unknown model 'vgg'"),
    (["--teacher=best", "--distill=0.5"], "unknown teacher 'best'; choose dense or snapshots"),
    (["--teacher=snapshots"], "teacher=snapshots teaches through distillation: set --distill"),
    (["--teacher=snapshots", "--distill=0.5"], "teacher=snapshots needs a warm restart to keep a snapshot"),
    (["--dataset=kmnist"], "unknown dataset 'kmnist'"),
    (["--sensitivty=1"], "unknown setting 'sensitivty'; valid settings: model, model_args, dataset"),
    (["--epochs=ten"], "setting epochs expects int"),
    (["--sensitivity=-0.5"], "sensitivity must be >= 0"),
    (["--prune_method=dns", "--dns_band=1.5"], "dns_band must be in [0, 1)"),
    (["--dns_threshold=quantile"], "unknown dns_threshold 'quantile'; choose fixed, scaled or density"),
    (["--dns_ramp=0.5"], "dns_ramp ramps the held density: set --dns_threshold=density"),
    (["--dns_ramp=1.5", "--dns_threshold=density"], "dns_ramp must be in [0, 1], got 1.5"),
    (["--erk_alive=0.2"], "erk_alive sets the densities that surgery holds: set --prune_method=dns"),
    (["--erk_alive=1.5", "--dns_threshold=density"], "erk_alive must be in [0, 1] (0 = off), got 1.5"),
    (["--group_lasso={'*': -1e-4}"], "group_lasso must be >= 0"),
    (["--granularity=row"], "unknown granularity in {'*': 'row'}; choose weight, kernel or a number"),
    (["--granularity='3'", "--erk_alive=0.2", "--prune_method=dns", "--dns_threshold=density",
      f"--data_root={__file__}"], "granularity '3' of layer fc1 (300, 784): a number groups an fc layer's inputs"),
    (["--granularity={'conv2': '5', '*': 'weight'}", "--model=lenet5", f"--data_root={__file__}"],
     "granularity '5' of layer conv2 (16, 6, 5, 5): a number groups an fc layer's inputs"),
    (["--granularity=kernel", "--prune_method=vd"], "granularity other than weight applies to prune_method std"),
    (["--granularity={'conv2': 'kernel'}", "--erk_alive=0.2", "--prune_method=dns", "--dns_threshold=density",
      f"--data_root={__file__}"], "granularity: no value for layer"),
    (["--granularity=kernel", "--prune_method=global"], "granularity other than weight applies to prune_method std"),
    (["--prune_method=vd", "--prune_iterations=2"], "prune_method=vd chooses each layer's density itself"),
    (["--prune_method=vd", "--vd_beta=0.0"], "vd_beta must be > 0, got 0.0"),
    (["--prune_method=vd", "--vd_epochs=0"], "vd_epochs must be at least 1, got 0"),
    (["--prune_method=vd", "--vd_sigma_lr=-0.01"], "vd_sigma_lr must be >= 0 (0 = vd_lr), got -0.01"),
    (["--prune_method=vd", "--vd_threshold=12.0"], "vd_threshold must be inside log alpha's range (-10, 10)"),
    (["--retrain_weight_decay=-1e-4"], "weight decay must be >= 0"),
    (["--init_from=/nonexistent/x.pt"], "no checkpoint at /nonexistent/x.pt"),
    # a file, not a folder: torchvision's download stops at making its folder, before any network
    ([f"--data_root={__file__}"], f"mnist train set not found under {__file__}"),
    # settings are checked before the data loads (here it would fail)
    (["--optimizer=rmsprop", f"--data_root={__file__}"], "unknown optimizer 'rmsprop'; choose one of adam, sgd"),
    (["--sensitivity={'fc1': 1.0}", f"--data_root={__file__}"], "sensitivity: no value for layer 'fc2'"),
])
def test_pruning_script_bad_input(tmp_path, args, message, capsys):
    code, _, err = run_here("pruning", f"--out_dir={tmp_path}", *args, capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {err.strip()[7:]}"]  # one line
    assert message in err
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "MNIST")), reason="no ../shared/data")
def test_pruning_script_on_real_mnist_subset(tmp_path, capsys):
    code, _, err = run_here("pruning", "--model=lenet_300_100", f"--data_root={SHARED_DATA}", f"--out_dir={tmp_path}",
                            "--subset=6000", "--epochs=3", "--retrain_epochs=2", "--sensitivity=1.0", capsys=capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "lenet_300_100_pruned.json").read_text())
    assert summary["accuracy"]["dense"] > 88  # 5,400 real digits, 3 epochs
    assert summary["accuracy"]["retrained"] > summary["accuracy"]["pruned"] - 1
    assert summary["params"]["nonzero"] < 0.45 * summary["params"]["total"]


# --- dead units ------------------------------------------------------------------------------------
