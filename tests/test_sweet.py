"""SWEET's width-wise stochastic scaling, measured on digits."""

import numpy as np
import pytest

from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve

QUIET = ["trainer.progress=false", "trainer.log_every=1", "ema.enabled=false", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)


def first_epoch(res) -> float:
    return float(np.mean([v for _, v in read_curve(res.run_dir, "train/loss")][: 1437 // 128]))


@pytest.mark.slow  # two 150-step ancestors and two descendants: about 30 s alone on 2 cores, 90 s under load
def test_stochastic_width_scaling_helps_an_untrained_width(tmp_path):
    """Ancestors DiT-Pico/2 with 4 heads (width 64), 150 steps, seed 0, tucker,
    with width_ratios [0.5, 1.0] (trains widths 32 and 64) and without; both
    descend to width 48 (3 heads), which neither trained. First-epoch loss of
    the descendant (measured with tucker's default core_lr 0.1: 0.355 vs 0.448;
    at core_lr 1, before it existed: seed 0 0.318 vs 0.412, seed 1 0.328 vs 0.392)."""
    losses = {}
    for tag, ratios in (("sweet", "[0.5, 1.0]"), ("plain", "null")):
        anc = fit(load_recipe("dit_digits_pretrain_sweet", [
            f"out_dir={tmp_path}", f"name=anc_{tag}", "model.name=DiT-Pico/2", "model.heads=4",
            f"constraint={{name: tucker, width_ratios: {ratios}}}", "trainer.max_steps=150", "trainer.val_every=150", *QUIET]))
        child = fit(load_recipe("dit_digits_descend", [
            f"out_dir={tmp_path}", f"name=child_{tag}", "model.name=DiT-Pico/2", "model.width=48", "model.heads=3",
            "constraint=tucker", f"init.source={anc.learngene}", "trainer.max_steps=11", "trainer.val_every=11", *QUIET]))
        losses[tag] = first_epoch(child)
    print(f"first-epoch loss at the untrained width 48: with width_ratios {losses['sweet']:.4f}, without {losses['plain']:.4f}")
    assert losses["sweet"] < losses["plain"] - 0.03, losses


def test_the_sweet_recipe_samples_valid_ratios():
    cfg = load_recipe("dit_digits_pretrain_sweet")
    assert list(cfg.constraint.width_ratios) == [0.5, 0.75, 1.0]
    from lgframe.core.registry import get_constraint
    from lgframe.errors import LgframeError
    from lgframe.models.registry import create_model

    get_constraint(cfg.constraint).attach(create_model("DiT-Nano/2"))  # 4 heads: 2, 3, 4 heads nested
    with pytest.raises(LgframeError, match="valid ratios for this model"):
        get_constraint(cfg.constraint).attach(create_model("DiT-Pico/2"))  # 2 heads: 0.75 breaks a head
