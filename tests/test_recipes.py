"""Recipe files (config/<name>.py): the stage scripts' defaults are the default model's recipe,
a model's recipe runs when the model is named, and a bad recipe is a one-line error."""
import os

import pytest

import huffman_encode
import pruning
import quantization
import util
from conftest import ROOT, run_here

STAGE_MODULES = dict(pruning=pruning, quantization=quantization, huffman_encode=huffman_encode)


@pytest.mark.parametrize("stage", util.STAGES)
def test_defaults_are_the_default_models_recipe(stage):
    module = STAGE_MODULES[stage]
    recipe = util.read_recipe(os.path.join(ROOT, "config", module.SETTINGS["model"] + ".py"))[stage]
    assert {k: module.SETTINGS[k] for k in recipe} == recipe  # every value the recipe sets is the default
    cfg, path = util.stage_settings(module.SETTINGS, [], stage)
    assert cfg == module.SETTINGS and path.endswith(os.path.join("config", "lenet_300_100.py"))


@pytest.mark.parametrize("name", sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py")))
def test_every_recipe_file_is_valid_for_every_stage(name):
    path = os.path.join(ROOT, "config", name + ".py")
    for stage, module in STAGE_MODULES.items():
        cfg, used = util.stage_settings(module.SETTINGS, [path], stage)
        assert used == path and cfg["model"] == util.read_recipe(path)["pruning"]["model"]


def test_naming_a_model_runs_its_recipe_and_overrides_win():
    cfg, path = util.stage_settings(pruning.SETTINGS, ["--model=lenet5_caffe", "--retrain_epochs=3"], "pruning")
    assert path.endswith("lenet5_caffe.py")
    assert cfg["sensitivity"] == util.read_recipe(path)["pruning"]["sensitivity"] and cfg["retrain_epochs"] == 3
    cfg, path = util.stage_settings(quantization.SETTINGS, ["--model=resnet56"], "quantization")  # no recipe
    assert path is None and cfg == {**quantization.SETTINGS, "model": "resnet56"}


@pytest.mark.parametrize("stage, text, message", [
    ("pruning", "model = 'lenet_300_100'\npruning = {'sensitivty': 2.0}\n", "unknown setting 'sensitivty' in"),
    ("pruning", "model = 'lenet_300_100'\npruning = {'epochs': 'ten'}\n", "setting epochs expects int, got 'ten'"),
    ("quantization", "model = 'lenet_300_100'\nquantization = {'bits': {'*': 2.5}}\n", "setting bits['*'] expects int"),
    ("pruning", "model = 'lenet_300_100'\nimport os\n", "line 2: a recipe holds only `name = literal` lines"),
    ("pruning", "model = 'lenet_300_100'\npruning = dict(lr=1)\n", "line 2: pruning must be a literal"),
    ("pruning", "model = 'lenet_300_100'\nprunning = {}\n", "unknown name(s) prunning"),
    ("pruning", "pruning = {}\n", "name the model"),
])
def test_a_bad_recipe_is_a_one_line_error(tmp_path, capsys, stage, text, message):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        util.run_stage(lambda cfg: pytest.fail("ran with a bad recipe"), STAGE_MODULES[stage].SETTINGS, [str(path)],
                       stage=stage)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_a_bad_recipe_stops_the_stage_script(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text("model = 'lenet_300_100'\npruning = {'retrain_epochs': -1.5}\n")
    code, _, err = run_here("pruning", str(path), f"--out_dir={tmp_path}", capsys=capsys)
    assert code == 2 and "retrain_epochs expects int" in err
    assert os.listdir(tmp_path) == ["bad.py"]  # nothing written
