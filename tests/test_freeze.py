"""Freezing that freezes (#24): a rate of 0 freezes a group bit for bit; phase 1 keeps the
learngene out of the gradient, the clip norm and the optimizer; phase 2 warms it up."""

import lightning.pytorch as pl
import pytest
import torch

import lgframe
from lgframe.core.constraint import BANK
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit
from lgframe.training.tasks import LgTask

QUIET = ["trainer.progress=false", "trainer.log_every=1", "sample.n=0", "ema.enabled=false"]


@pytest.fixture(scope="module")
def learngene(tmp_path_factory):
    """An svd learngene of a random (untrained) DiT-Nano: enough to descend from."""
    from lgframe.models.registry import create_model

    out = tmp_path_factory.mktemp("lg")
    model = create_model("DiT-Nano/2", image_size=8, in_channels=1, out_channels=1, num_classes=10)
    torch.manual_seed(0)
    lgframe.get_constraint("svd").attach(model)
    path = out / "lg.safetensors"
    lgframe.extract_learngene(model).save(path)
    return path


class Recorder(pl.Callback):
    """Per optimizer step: the total norm Lightning clips, the grads of each group, the rates."""

    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, task, optimizer):
        self.pending = {"step": trainer.global_step,
                        "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}

    def record_grads(self):
        groups = self.task.constraint.param_groups(self.task.model)
        grads = lambda ps: [p.grad for p in ps if p.grad is not None]  # noqa: E731
        trainable = [g for n in ("scalers", "free") for g in grads(groups[n])]
        self.pending.update(trainable_norm=float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in trainable]))), learngene_grads=len(grads(groups["learngene"])))


def run(learngene, tmp_path, monkeypatch, extra, distributed=False):
    rec = Recorder()
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        rec.record_grads()  # before clipping scales them
        norm = clip(parameters, max_norm, *a, **k)
        rec.pending["norm"] = float(norm)
        rec.rows.append(rec.pending)
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    if distributed:  # DDP's path on one process: trainable when wrapped, gradient dropped in phase 1
        monkeypatch.setattr(LgTask, "_distributed", lambda self: True)
    callbacks = pl.Trainer.__init__

    def with_recorder(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [rec]
        callbacks(self, *a, **k)

    monkeypatch.setattr(pl.Trainer, "__init__", with_recorder)
    cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", "name=d", f"init.source={learngene}",
                                             "model.name=DiT-Pico/2", "trainer.max_steps=6", "trainer.val_every=6",
                                             "optim.grad_clip=1e-3", "optim.warmup_steps=0", *QUIET, *extra])
    original = LgTask.configure_model

    def keep(self):
        rec.task = self
        original(self)

    monkeypatch.setattr(LgTask, "configure_model", keep)
    before = {}

    def snapshot(self):
        keep(self)
        before.update({n: p.detach().clone() for n, p in self.model.named_parameters()})

    monkeypatch.setattr(LgTask, "configure_model", snapshot)
    res = fit(cfg, extract_learngene=False)
    after = dict(res.task.model.named_parameters())
    return rec.rows, before, after, res.task


def factor_names(task, group):
    ids = {id(p) for p in task.constraint.param_groups(task.model)[group]}
    return [n for n, p in task.model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("distributed", [False, True], ids=["one-process", "ddp-path"])
def test_phase_one_keeps_the_learngene_out_of_clip_and_step(learngene, tmp_path, monkeypatch, distributed):
    rows, before, after, task = run(learngene, tmp_path, monkeypatch,
                                    ["init.unfreeze_at=3", "init.unfreeze_warmup=4"], distributed)
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows[:3]:  # phase 1: no learngene gradient reaches the clip, the norm is the trainable groups'
        assert r["learngene_grads"] == 0
        assert r["norm"] == pytest.approx(r["trainable_norm"], rel=1e-6)
        assert r["lr"]["learngene"] == 0.0
    assert all(r["learngene_grads"] > 0 for r in rows[3:])  # phase 2: it trains
    lr = task.recipe["optim"]["lr"]
    assert [r["lr"]["learngene"] for r in rows[3:]] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4])  # own warmup
    assert all(r["lr"]["free"] == pytest.approx(lr) for r in rows)
    names = factor_names(task, "learngene")
    assert names and all(not torch.equal(before[n], after[n].detach()) for n in names)


def test_learngene_rate_zero_freezes_bit_for_bit(learngene, tmp_path, monkeypatch):
    rows, before, after, task = run(learngene, tmp_path, monkeypatch, ["init.unfreeze_at=2", "optim.learngene_lr=0"])
    names = factor_names(task, "learngene")
    assert names and all(torch.equal(before[n], after[n].detach()) for n in names)
    assert all(not after[n].requires_grad for n in names)
    assert all(r["learngene_grads"] == 0 and "learngene" not in r["lr"] for r in rows)
    free = factor_names(task, "free")
    assert any(not torch.equal(before[n], after[n].detach()) for n in free)


def test_scaler_rate_zero_freezes_bit_for_bit(learngene, tmp_path, monkeypatch):
    rows, before, after, task = run(learngene, tmp_path, monkeypatch, ["optim.scaler_lr=0"])
    names = factor_names(task, "scalers")
    assert names and all(torch.equal(before[n], after[n].detach()) for n in names)
    assert all("scalers" not in r["lr"] for r in rows)
    assert getattr(task.model, BANK) is not None


def test_materialized_descendant_starts_where_the_factorized_one_does(learngene, tmp_path):
    common = [f"out_dir={tmp_path}", f"init.source={learngene}", "model.name=DiT-Pico/2", "trainer.max_steps=3",
              "trainer.val_every=3", "data.val_subset=64", *QUIET]
    factorized = fit(load_recipe("dit_digits_descend", common + ["name=f"]), extract_learngene=False)
    dense = fit(load_recipe("dit_digits_descend", common + ["name=m", "init.materialize=true"]), extract_learngene=False)
    assert dense.initial_loss == pytest.approx(factorized.initial_loss, rel=1e-4)  # the same function at step 0
    assert not hasattr(dense.task.model, BANK) and hasattr(factorized.task.model, BANK)
    assert dense.task.constraint.name == "scratch"  # every parameter free, trained at optim.lr
    assert all(p.requires_grad for n, p in dense.task.model.named_parameters() if n != "pos_embed")
    assert dense.final_loss < dense.initial_loss
