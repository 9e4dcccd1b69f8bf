"""Training behaviour on the embedded digits: losses fall, descendants start ahead of scratch."""

import pytest
import torch

from lgframe.core.constraint import BANK
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve

QUIET = ["trainer.progress=false", "trainer.log_every=1", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)


@pytest.fixture(scope="module")
def ancestor(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={out}", "name=anc", "model.name=DiT-Pico/2", "trainer.max_steps=200",
                                              "trainer.val_every=100", "ema.enabled=false", *QUIET])
    return fit(cfg), out


def test_ancestor_loss_falls(ancestor):
    res, _ = ancestor
    assert res.initial_loss > 0.95  # the zero-initialized DiT predicts eps = 0: loss ~ 1
    assert res.final_loss < 0.6 * res.initial_loss


def first_epoch_train_loss(res):
    curve = read_curve(res.run_dir, "train/loss")
    steps_per_epoch = 1437 // 128  # digits train split, drop_last
    return sum(v for _, v in curve[:steps_per_epoch]) / steps_per_epoch


@pytest.mark.parametrize("size", [["model.depth=3"], ["model.depth=6", "model.width=96", "model.heads=3"]], ids=["shallower", "deeper-wider"])
def test_descendant_first_epoch_beats_scratch(ancestor, size):
    res, out = ancestor
    common = [f"out_dir={out}", "model.name=DiT-Pico/2", *size, "trainer.max_steps=11", "trainer.val_every=11",
              "ema.enabled=false", "seed=3", *QUIET]
    child = fit(load_recipe("dit_digits_descend", common + ["name=child", f"init.source={res.learngene}",
                                                            "init.unfreeze_at=300"]))
    scratch = fit(load_recipe("dit_digits_descend", common + ["name=scratch", "constraint=scratch"]))
    assert child.initial_loss < scratch.initial_loss - 0.1
    assert first_epoch_train_loss(child) < first_epoch_train_loss(scratch) - 0.05
    # phase 1 (unfreeze_at=300): the learngene is unchanged
    from lgframe.formats.learngene import Learngene

    U0 = Learngene.load(res.learngene).tensors["learngene/attn.proj.weight/U"]
    U1 = getattr(child.task.model, BANK).factors["attn__proj"]["U"].detach()
    if size == ["model.depth=3"]:
        assert torch.equal(U0, U1)


def test_phase_two_unfreezes_the_learngene(ancestor, tmp_path):
    res, _ = ancestor
    cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", "name=p2", f"init.source={res.learngene}",
                                             "model.name=DiT-Pico/2", "trainer.max_steps=6", "trainer.val_every=6",
                                             "init.unfreeze_at=3", "ema.enabled=false", *QUIET])
    child = fit(cfg)
    from lgframe.formats.learngene import Learngene

    U0 = Learngene.load(res.learngene).tensors["learngene/attn.proj.weight/U"]
    U1 = getattr(child.task.model, BANK).factors["attn__proj"]["U"].detach()
    assert all(p.requires_grad for p in getattr(child.task.model, BANK).parameters())
    assert not torch.allclose(U0, U1)


def test_vit_accuracy_rises(tmp_path):
    cfg = load_recipe("vit_digits_pretrain", [f"out_dir={tmp_path}", "name=v", "model.name=ViT-Pico/2",
                                              "trainer.max_steps=300", "trainer.val_every=150", "ema.enabled=false", *QUIET])
    res = fit(cfg)
    assert res.acc_curve[0][1] < 0.3 and res.acc_curve[-1][1] > 0.6
    assert res.final_loss < 0.6 * res.initial_loss


def nan_at(monkeypatch, steps):
    """Make the DiT return NaN on the given training forward calls."""
    from lgframe.models.dit import DiT

    calls = {"n": 0}
    forward = DiT.forward

    def patched(self, x, t, y):
        out = forward(self, x, t, y)
        if self.training:
            calls["n"] += 1
            if calls["n"] in steps:
                return out * float("nan")
        return out

    monkeypatch.setattr(DiT, "forward", patched)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from lgframe.errors import LgframeError

    nan_at(monkeypatch, {4})
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=nan", "model.name=DiT-Pico/2",
                                              "trainer.max_steps=6", "trainer.val_every=3", "trainer.checkpoint_every=2",
                                              *QUIET])
    with pytest.raises(LgframeError, match="non-finite loss or gradient at step 3.*optim.lr=0.001.*trainer.nan_skip"):
        fit(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "nan/checkpoints").iterdir())
    assert ckpts == ["last.ckpt"]
    saved = torch.load(tmp_path / "nan/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_nan_guard_skips_a_bounded_number_of_steps(tmp_path, monkeypatch):
    nan_at(monkeypatch, {2, 4})
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=skip", "model.name=DiT-Pico/2",
                                              "trainer.max_steps=6", "trainer.val_every=6", "trainer.nan_skip=2", *QUIET])
    res = fit(cfg)
    assert all(torch.isfinite(p).all() for p in res.task.model.parameters())
    assert res.curve[-1][0] == 6 and res.final_loss < res.initial_loss
