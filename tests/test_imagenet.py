"""The paper's ImageNet networks through the three stages, on a synthetic ImageNet folder of a few
dozen 64x64 JPEGs: mechanics (ImageFolder, DataLoader workers, the full-size AlexNet and
VGG-16), not accuracy."""
import json

import pytest

import training
from conftest import run_here, write_fake_imagenet


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    return write_fake_imagenet(str(tmp_path_factory.mktemp("imagenet")))


# VGG-16 on 32x32 crops (its adaptive pooling takes them; a quarter of the 64x64 arithmetic),
# AlexNet on 64x64 (its stride-4 stem and three poolings need at least 63)
@pytest.mark.parametrize("model,params,size", [("alexnet", 61_100_840, 64), ("vgg16", 138_357_544, 32)])
def test_imagenet_networks_through_the_three_stages(fake_imagenet, tmp_path, capsys, monkeypatch, model, params,
                                                    size):
    # no resume states: VGG-16's is 1.1 GB a network kept, and tests/test_resume.py covers them
    monkeypatch.setattr(training.Progress, "end_epoch", lambda *args: None)
    common = [f"--data_root={fake_imagenet}", f"--out_dir={tmp_path}"]
    # the recipe (the paper's per-layer pruning rates), on small crops, two steps of training
    code, out, err = run_here("pruning", f"config/{model}.py", *common, "--pretrained=False", "--epochs=1",
                              "--retrain_epochs=1", "--batch_size=16", "--test_batch_size=12", f"--image_size={size}",
                              "--workers=0", "--val_split=0.0", "--precision=fp32", capsys=capsys)
    assert code == 0, err
    assert "data: imagenet train 32, validation 0, test 12" in out
    pruned = json.loads((tmp_path / f"{model}_pruned.json").read_text())
    assert pruned["params"]["total"] == params
    fc6 = next(layer for layer in pruned["layers"] if layer["name"] == "classifier.1.weight" or
               layer["name"] == "classifier.0.weight")
    assert fc6["nonzero"] / fc6["total"] == pytest.approx(0.09 if model == "alexnet" else 0.04, abs=0.002)
    code, out, err = run_here("quantization", f"config/{model}.py", *common, "--finetune_epochs=1",
                              "--precision=fp32", capsys=capsys)
    assert code == 0, err
    code, out, err = run_here("huffman_encode", f"config/{model}.py", *common, capsys=capsys)
    assert code == 0, err
    assert "bit for bit" in out and f"dense float32: {4 * params} bytes" in out
    summary = json.loads((tmp_path / f"{model}_compressed.json").read_text())
    assert summary["accuracy"]["decoded"] == summary["accuracy"]["quantized"]


def test_a_missing_imagenet_folder_is_one_line(tmp_path, capsys):
    # checked before anything else: the recipe's pretrained weights would be downloaded first
    code, _, err = run_here("pruning", "--model=alexnet", f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'out'}",
                            capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "no ImageNet folder" in err and "imagenet/train" in err
