"""A pretrained dense model into a constrained ancestor (#24): the closed form is refused
with its measured error; `lgframe refit` distills it and lands far below that error."""

import logging

import pytest
from test_convert import diffusers_dit

from lgframe.cli import main
from lgframe.formats.learngene import Learngene
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit

QUIET = ["trainer.progress=false", "sample.n=0", "ema.enabled=false", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small random diffusers DiT, imported, then trained briefly on digits: the dense teacher."""
    out = tmp_path_factory.mktemp("refit")
    diffusers_dit(layers=4).save_pretrained(out / "dit")
    assert main(["import", "diffusers", str(out / "dit"), "--out", str(out / "m.safetensors")]) == 0
    run = fit(load_recipe("dit_digits_pretrain", [f"out_dir={out}", "name=teacher", "constraint=scratch",
                                                  f"init.source={out / 'm.safetensors'}", "trainer.max_steps=60",
                                                  "trainer.val_every=60", *QUIET]), extract_learngene=False)
    assert run.final_loss < 0.6 * run.initial_loss
    return run.checkpoint, out


def test_closed_form_learngene_is_refused_with_the_error_and_the_command(teacher, capsys):
    ckpt, out = teacher
    lg = out / "lossy.safetensors"
    assert main(["learngene", str(ckpt), "--constraint", "svd", "--out", str(lg)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "relative weight error of 0.9" in err and "`lgframe refit" in err  # (the terminal wraps the path)
    assert "--constraint svd --out REFIT.safetensors" in err
    assert "--allow-lossy" in err and not lg.exists()
    assert main(["learngene", str(ckpt), "--constraint", "svd", "--out", str(lg), "--allow-lossy"]) == 0
    assert Learngene.load(lg).constraint == "svd"
    # a transform constraint decomposes nothing at attach: not refused
    assert main(["learngene", str(ckpt), "--constraint", "dwt", "--out", str(out / "dwt.safetensors")]) == 0


def test_dense_init_source_under_a_factorized_constraint_warns_with_the_numbers(teacher, caplog, tmp_path):
    ckpt, _ = teacher
    with caplog.at_level(logging.WARNING, logger="lgframe"):
        fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=w", "constraint=kronecker",
                                                f"init.source={ckpt}", "trainer.max_steps=1", "trainer.val_every=1",
                                                *QUIET]), extract_learngene=False)
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "into constraint 'kronecker' in closed form leaves a relative weight error of 0.8" in text
    assert "lgframe refit" in text


@pytest.mark.parametrize("name", ["svd", "kronecker"])
def test_refit_lands_far_below_the_closed_form(teacher, name, capsys):
    ckpt, out = teacher
    lg = out / f"refit_{name}.safetensors"
    assert main(["refit", str(ckpt), "--constraint", name, "--out", str(lg), f"out_dir={out}", f"name=refit_{name}",
                 "trainer.max_steps=120", "trainer.val_every=40", *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "relative output error vs the dense model" in printed
    from lgframe.training.stages import read_curve

    run_dir = out / f"refit_{name}"
    err = read_curve(run_dir, "val/teacher_error")
    loss, teacher_loss = read_curve(run_dir, "val/loss"), read_curve(run_dir, "val/teacher_loss")
    assert err[0][0] == 0 and err[0][1] > 0.8  # the closed form: outputs nearly unrelated to the teacher's
    assert err[-1][1] < 0.25 * err[0][1]  # measured: svd 1.04 -> 0.11, kronecker 0.91 -> 0.08 in 150 steps
    assert loss[-1][1] < 1.1 * teacher_loss[-1][1]  # the task quality of the teacher, within 10%
    assert loss[0][1] > 1.5 * teacher_loss[0][1]  # where the closed form started
    got = Learngene.load(lg)
    assert got.constraint == name and got.family == "dit"
