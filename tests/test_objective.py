"""`objective: self_supervised`: label-free pre-training (the SWEET setting) for any constraint."""

import pytest
import torch

from lgframe.errors import LgframeError
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe, to_plain
from lgframe.training.stages import fit
from lgframe.training.tasks import make_task

QUIET = ["trainer.progress=false", "trainer.log_every=1", "ema.enabled=false", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)


def test_bad_objective_names_the_valid_ones():
    with pytest.raises(LgframeError, match="valid: supervised, self_supervised"):
        load_recipe("vit_digits_pretrain", ["objective=contrastive"])
    with pytest.raises(LgframeError, match="mim.mask_ratio"):
        load_recipe("vit_digits_pretrain", ["mim.mask_ratio=1.5"])


def test_self_supervised_dit_never_sees_a_label():
    cfg = load_recipe("dit_digits_pretrain", ["objective=self_supervised", "model.name=DiT-Pico/2"])
    task = make_task(to_plain(cfg), create_model("DiT-Pico/2"))
    assert task.label_dropout == 1.0
    x = torch.randn(4, 1, 8, 8)
    losses = [task.diffusion_loss((x, torch.full((4,), c)), generator=torch.Generator().manual_seed(0), dropout=1.0)
              for c in (0, 7)]
    assert torch.equal(losses[0], losses[1])


@pytest.fixture(scope="module")
def mim_ancestor(tmp_path_factory):
    out = tmp_path_factory.mktemp("mim")
    res = fit(load_recipe("vit_digits_pretrain", [f"out_dir={out}", "name=mim", "model.name=ViT-Pico/2", "trainer.max_steps=150",
                                                  "trainer.val_every=75", "objective=self_supervised", *QUIET]))
    return res, out


def test_masked_image_modeling_loss_falls(mim_ancestor):
    res, _ = mim_ancestor
    assert res.final_loss < 0.6 * res.initial_loss  # MSE on masked pixels, data in [-1, 1]
    assert res.learngene is not None and res.learngene.is_file()


def test_mim_learngene_helps_a_classifier(mim_ancestor):
    """A ViT initialized from the label-free ancestor's svd learngene learns the
    labels faster than scratch: validation accuracy after 44 steps (measured:
    seed 3 0.44 vs 0.20, seed 4 0.31 vs 0.18; MIM loss 0.94 -> 0.36 in 150 steps)."""
    res, out = mim_ancestor
    common = [f"out_dir={out}", "model.name=ViT-Pico/2", "trainer.max_steps=44", "trainer.val_every=44", "seed=3", *QUIET]
    child = fit(load_recipe("vit_digits_descend", common + ["name=child", f"init.source={res.learngene}"]))
    scratch = fit(load_recipe("vit_digits_descend", common + ["name=scratch", "constraint=scratch"]))
    assert child.acc_curve[-1][1] > scratch.acc_curve[-1][1] + 0.1, (child.acc_curve, scratch.acc_curve)
