"""Image folders (ViT and pixel DiT) and the latent DiT (encode with a tiny local
VAE, train on the latents, sample through the VAE)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lgframe.cli import main
from lgframe.data.datamodule import ImageDataModule
from lgframe.data.datasets import DataError, load_image_folder
from lgframe.errors import LgframeError
from lgframe.formats.latents import load_latents
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit

QUIET = ["trainer.progress=false", "ema.enabled=false", "constraint=scratch"]


def make_folder(root, n=10, size=(20, 24)):
    """Three classes of colour-dominated noise images, plus a text file and a corrupt PNG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["blue", "green", "red"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            a = (rng.random((*size, 3)) * 60).astype(np.uint8)
            a[..., 2 - c] += 150
            Image.fromarray(a).save(d / f"{i}.png")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "green" / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def test_load_image_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="skipped 2 file"):
        x, y, names = load_image_folder(root, 16, 3)
    assert names == ["blue", "green", "red"] and x.shape == (30, 3, 16, 16) and y.tolist() == sorted(y.tolist())
    assert x.min() >= -1 and x.max() <= 1 and torch.bincount(y).tolist() == [10, 10, 10]
    # Class "red" (label 2) is red-dominated: its mean red channel beats its mean blue.
    assert x[y == 2, 0].mean() > x[y == 2, 2].mean() + 0.5
    with pytest.warns(UserWarning):
        g, _, _ = load_image_folder(root, 8, 1, crop="resize")
    assert g.shape == (30, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty", 16)
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "a.txt").write_text("x")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path / "empty", 16)
    with pytest.raises(DataError, match="valid: center, resize"):
        load_image_folder(tmp_path / "empty", 16, crop="zoom")
    with pytest.raises(DataError, match="needs data.path"):
        ImageDataModule("imagefolder")
    assert main(["pretrain", "vit_imagefolder", f"out_dir={tmp_path}"]) == 1  # no data.path: a clear error


@pytest.mark.filterwarnings("ignore:image folder")
@pytest.mark.parametrize("recipe,model", [("vit_imagefolder", "ViT-Pico/4"), ("dit_digits_pretrain", "DiT-Pico/4")])
def test_models_train_on_an_image_folder(tmp_path, recipe, model):
    root = make_folder(tmp_path / "imgs")
    res = fit(load_recipe(recipe, [
        f"out_dir={tmp_path}", "name=run", f"model.name={model}", "data.name=imagefolder", f"data.path={root}",
        "data.image_size=16", "data.batch_size=8", "data.val_fraction=0.3", "trainer.max_steps=40",
        "trainer.val_every=40", "optim.lr=3e-3", "optim.warmup_steps=0", "sample.n=3", *QUIET]), extract_learngene=False)
    m = res.task.model.config
    assert (m.image_size, m.in_channels, m.num_classes) == (16, 3, 3)
    assert res.curve[-1][1] < 0.8 * res.curve[0][1]


def tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=16).save_pretrained(path)
    return path


@pytest.mark.filterwarnings("ignore:image folder")
def test_encode_train_and_sample_a_latent_dit(tmp_path):
    from diffusers import AutoencoderKL

    root = make_folder(tmp_path / "imgs")
    vae = tiny_vae(tmp_path / "vae")
    lat = tmp_path / "lat"
    assert main(["encode", "--vae", str(vae), "--images", str(root), "--out", str(lat), "--image-size", "16",
                 "--batch-size", "7"]) == 0
    z, y, info = load_latents(lat)
    assert z.shape == (30, 4, 8, 8) and y.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert info["class_names"] == ["blue", "green", "red"] and info["scaling_factor"] == pytest.approx(0.18215)
    # The stored latents are the posterior means times the scaling factor.
    v = AutoencoderKL.from_pretrained(str(vae)).eval()
    x, _, _ = load_image_folder(root, 16, 3)
    with torch.no_grad():
        expect = v.encode(x[:4]).latent_dist.mode() * 0.18215
    assert torch.allclose(z[:4], expect, atol=1e-5)

    res = fit(load_recipe("dit_latent_imagefolder", [
        f"out_dir={tmp_path}", "name=latent", "model.name=DiT-Pico/2", f"data.path={lat}", "data.batch_size=8",
        "trainer.max_steps=30", "trainer.val_every=30", "optim.lr=1e-3", "optim.warmup_steps=0", "sample.n=3",
        "sample.steps=5", *QUIET]), extract_learngene=False)
    c = res.task.model.config
    assert (c.image_size, c.in_channels, c.num_classes) == (8, 4, 3)
    assert res.curve[-1][1] < res.curve[0][1]
    # 16x16 decoded samples enlarged 2x by nearest neighbour to 32px, 2px padding
    assert Image.open(res.samples).size == (3 * 34 + 2, 34 + 2)
    out = tmp_path / "s.png"
    assert main(["sample", str(res.checkpoint), "--n", "6", "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 34 + 2, 2 * 34 + 2)


def test_latents_errors(tmp_path):
    assert main(["encode", "--vae", str(tmp_path / "novae"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(LgframeError, match="no latents.json"):
        load_latents(tmp_path)
    (tmp_path / "latents.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LgframeError, match="expected 'lgframe-latents'"):
        load_latents(tmp_path)
