"""The CLI end to end on tiny sizes, and its answers to bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgframe.cli import main

TINY = ["trainer.max_steps=12", "trainer.val_every=6", "trainer.progress=false", "data.batch_size=64", "sample.n=20", "sample.steps=5"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    rc = main(["pretrain", "dit_digits_pretrain", f"out_dir={out}", "name=anc", "model.name=DiT-Pico/2", *TINY])
    assert rc == 0
    return out / "anc"


def test_pretrain_writes_a_run_directory(pretrained):
    for f in ("config.yaml", "metrics.csv", "learngene.safetensors", "learngene.json", "samples.png", "loss.png",
              "checkpoints/last.ckpt"):
        assert (pretrained / f).is_file(), f
    manifest = json.loads((pretrained / "learngene.json").read_text())
    assert manifest["constraint"]["name"] == "svd" and manifest["roles"]["mlp.fc1.weight"] == [4, 256, 64]
    assert Image.open(pretrained / "samples.png").size[0] > 10 * 8


def test_learngene_descend_train_sample_evaluate(pretrained, tmp_path, capsys):
    lg = tmp_path / "lg.safetensors"
    assert main(["learngene", str(pretrained / "checkpoints/last.ckpt"), "--out", str(lg)]) == 0
    assert lg.is_file() and lg.with_suffix(".json").is_file()
    child = tmp_path / "child.safetensors"
    assert main(["descend", str(lg), "--model", "depth=6", "width=96", "heads=3", "--out", str(child)]) == 0
    assert "depth 6, width 96, heads 3" in capsys.readouterr().out
    named = tmp_path / "named.safetensors"
    assert main(["descend", str(lg), "--model", "DiT-Micro/2", "--out", str(named), "--option", "sigma_init=copy"]) == 0
    # train from the model file and straight from the learngene
    for src in (child, lg):
        rc = main(["train", "dit_digits_descend", f"out_dir={tmp_path}", "name=child", f"init.source={src}",
                   "model.depth=6", "model.width=96", "model.heads=3", "init.unfreeze_at=6", *TINY])
        assert rc == 0
    ckpt = tmp_path / "child/checkpoints/last.ckpt"
    png = tmp_path / "s.png"
    assert main(["sample", str(ckpt), "--n", "10", "--steps", "4", "--out", str(png)]) == 0
    # 10 classes per row; 8x8 samples enlarged 4x by nearest neighbour to 32px, 4px padding
    img = Image.open(png)
    assert img.size == (10 * 36 + 4, 36 + 4)
    first = np.asarray(img.convert("L"))[4:36, 4:36]
    assert (first == np.repeat(np.repeat(first[::4, ::4], 4, 0), 4, 1)).all()  # a pixel stays a pixel
    assert main(["sample", str(named), "--n", "10", "--steps", "4", "--guidance", "1", "--out", str(png), "--overwrite"]) == 0
    res = tmp_path / "eval.json"
    assert main(["evaluate", str(ckpt), "--n", "60", "--steps", "5", "--out", str(res)]) == 0
    numbers = json.loads(res.read_text())
    assert 0 < numbers["val_loss"] < 2 and numbers["val_images"] > 300
    assert numbers["fid_digits"] > 0 and 0 <= numbers["class_accuracy"] <= 1 and numbers["uncond_from"] == "own"
    assert main(["evaluate", str(ckpt), "--n", "60", "--steps", "5", "--guidance", "3", "--uncond-from", str(named),
                 "--scheduler", "dpm", "--out", str(res), "--overwrite"]) == 0
    swapped = json.loads(res.read_text())
    assert swapped["uncond_from"] == "swapped" and swapped["guidance"] == 3.0
    assert swapped["fid_digits"] != numbers["fid_digits"]
    assert main(["sample", str(ckpt), "--n", "10", "--steps", "4", "--uncond-from", str(named), "--out", str(png),
                 "--overwrite"]) == 0


def test_vit_pretrain_and_evaluate(tmp_path):
    rc = main(["pretrain", "vit_digits_pretrain", f"out_dir={tmp_path}", "name=v", "model.name=ViT-Pico/2", *TINY[:4]])
    assert rc == 0
    res = tmp_path / "e.json"
    assert main(["evaluate", str(tmp_path / "v/checkpoints/last.ckpt"), "--out", str(res)]) == 0
    assert 0.0 <= json.loads(res.read_text())["val_acc"] <= 1.0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lgframe.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "dit_digits_pretrain", "constraint=nope"], "unknown constraint 'nope'"),
        (["pretrain", "dit_digits_pretrain", "optim.lrr=3"], "Did you mean 'optim.lr'"),
        (["pretrain", "missing_recipe.yaml"], "recipe 'missing_recipe.yaml' does not exist"),
        (["pretrain", "dit_digits_pretrain", "model.width=100", "model.heads=3"], "not divisible by heads 3"),
        (["descend", "missing.safetensors", "--model", "DiT-Pico/2", "--out", "x.safetensors"], "does not exist"),
        (["sample", "missing.ckpt", "--out", "x.png"], "checkpoint 'missing.ckpt' does not exist"),
    ],
)
def test_bad_input_is_one_paragraph_without_traceback(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lgframe.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert message in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.stderr
    assert list(Path(tmp_path).iterdir()) == []  # nothing written


def test_wrong_family_and_constraint_learngene(pretrained, tmp_path):
    lg = pretrained / "learngene.safetensors"
    r = run_cli("train", "vit_digits_descend", f"init.source={lg}", f"out_dir={tmp_path}")
    assert r.returncode == 1 and "cannot initialize a 'vit' model" in r.stderr.replace("\n", " ")
    r = run_cli("train", "dit_digits_descend", f"init.source={lg}", "constraint=scratch", f"out_dir={tmp_path}")
    assert r.returncode == 1 and "set constraint=svd" in r.stderr.replace("\n", " ")
    r = run_cli("descend", str(lg), "--model", "depth=3", "width=64", "heads=5", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 1 and "not divisible by heads 5" in r.stderr.replace("\n", " ")
    assert not (tmp_path / "x.safetensors").exists()


def test_help_and_list():
    r = run_cli("--help")
    for cmd in ("list", "pretrain", "learngene", "descend", "train", "sample", "evaluate", "demo"):
        assert cmd in r.stdout
    r = run_cli("list")
    assert r.returncode == 0 and "svd" in r.stdout and "DiT-Nano" in r.stdout and "dit_digits_pretrain" in r.stdout


def test_learngene_from_a_dense_checkpoint_needs_a_constraint(tmp_path, capsys):
    import torch

    from lgframe.models.files import save_model
    from lgframe.models.registry import create_model

    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    save_model(create_model("DiT-Pico/2"), dense)
    assert main(["learngene", str(dense), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "name one to decompose it with, e.g. --constraint svd" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "x.safetensors").exists()
    for name in ("svd", "dct", "dwt", "select"):
        lossy = ["--allow-lossy"] if name == "svd" else []  # a random model's svd closed form is lossy (test_refit.py)
        assert main(["learngene", str(dense), "--constraint", name, "--out", str(tmp_path / f"{name}.safetensors"),
                     *lossy]) == 0
        manifest = json.loads((tmp_path / f"{name}.json").read_text())
        assert manifest["constraint"]["name"] == name and manifest["model"]["ancestor_config"]["depth"] == 4


def test_demo_takes_any_constraint(tmp_path):
    from lgframe.apps.demo import run_demo

    run_demo(tmp_path, steps=10, descendant_steps=10, constraint="kronecker",
             overrides=["sample.n=10", "sample.steps=4", "trainer.progress=false"])
    report = (tmp_path / "report.md").read_text()
    assert "under `kronecker`" in report and "| kronecker descendant |" in report
    # sample quality beside real held-apart digits: the classifier reads the real ones
    real = next(line for line in report.splitlines() if line.startswith("| real held-apart digits"))
    fid, acc = (float(c) for c in real.strip("|").split("|")[2:4])
    assert acc > 0.9 and 0 <= fid < 50, real
    assert report.count("| DiT-") >= 4 + 4  # 4 trained descendants in the table and in the quality rows
    assert main(["demo", "--out", str(tmp_path / "x"), "--constraint", "kronekcer"]) == 1  # fails before training
    assert not (tmp_path / "x" / "ancestor").exists()
