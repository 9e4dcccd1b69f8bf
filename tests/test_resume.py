"""A pretrain killed with SIGKILL resumes (resume=auto) onto the uninterrupted run's curve, EMA included."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve

# 11 steps of 128 = one digits epoch; checkpoints and validations at epoch ends.
RUN = ["model.name=DiT-Pico/2", "trainer.val_every=11", "trainer.checkpoint_every=11", "trainer.progress=false",
       "optim.warmup_steps=0", "ema.decay=0.9", "sample.n=0"]


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=straight", "trainer.max_steps=44", *RUN]))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lgframe.cli", "pretrain", "dit_digits_pretrain", f"out_dir={tmp_path}",
                             "name=killed", "trainer.max_steps=4400", *RUN], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "killed/checkpoints/last.ckpt"
    deadline = time.time() + 240
    step = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file():
                try:
                    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
                except Exception:  # replaced while we read it
                    step = 0
                if step >= 22:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 22 <= step < 44, f"checkpoint step {step}; stderr: {proc.stderr.read().decode()[-2000:]}"
    ckpt = torch.load(last, weights_only=True)
    assert "averaging_state" in ckpt and "current_model_state" in ckpt  # EMA state is in the checkpoint

    resumed = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=killed", "trainer.max_steps=44",
                                                      "resume=auto", *RUN]))
    assert resumed.run_dir == tmp_path / "killed"
    ref = dict(straight.curve)
    after = [(s, v) for s, v in resumed.curve if s > step]
    assert after and after[-1][0] == 44
    for s, v in after:
        assert abs(v - ref[s]) < 1e-4, (s, v, ref[s])
    # the validated (EMA) weights at the end equal the uninterrupted run's
    a = torch.load(straight.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # history before the kill is kept beside the resumed metrics
    assert read_curve(resumed.run_dir, "val/loss")[0][0] == 0


MID = ["model.name=DiT-Pico/2", "trainer.val_every=5", "trainer.checkpoint_every=5", "trainer.progress=false",
       "optim.name=sgd", "optim.lr=0.05", "optim.warmup_steps=0", "ema.enabled=false", "sample.n=0"]


def test_kill_inside_an_epoch_resumes_exactly(tmp_path):
    """Checkpoints every 5 steps with 11-step epochs: the kill lands inside an epoch, and the
    resumed run continues with the next unseen batch (the loader's state is in the
    checkpoint), so its curve equals the uninterrupted one to float noise (SGD)."""
    straight = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=straight", "trainer.max_steps=40", *MID]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lgframe.cli", "pretrain", "dit_digits_pretrain", f"out_dir={tmp_path}",
                             "name=killed", "trainer.max_steps=4000", *MID], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "killed/checkpoints/last.ckpt"
    deadline, step = time.time() + 240, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file():
                try:
                    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
                except Exception:
                    step = 0
                if step >= 15:
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 15 <= step < 40 and step % 11 != 0, f"checkpoint step {step}; {proc.stderr.read().decode()[-2000:]}"
    assert (tmp_path / "killed/lgframe.lock").is_file()  # the killed run's lock is stale now
    resumed = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=killed", "trainer.max_steps=40",
                                                      "resume=auto", *MID]))
    ref = dict(straight.curve)
    after = [(s, v) for s, v in resumed.curve if s > step]
    assert after and after[-1][0] == 40
    worst = max(abs(v - ref[s]) for s, v in after)
    print(f"mid-epoch resume from step {step}: largest validation-loss gap {worst:.2e}")
    assert worst < 1e-5
    a = torch.load(straight.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not (tmp_path / "killed/lgframe.lock").exists()  # released at the end


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    cfg = ["model.name=DiT-Pico/2", "trainer.max_steps=3", "trainer.val_every=3", "trainer.progress=false", "sample.n=0"]
    first = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=done", *cfg]))
    ckpt = torch.load(first.checkpoint, weights_only=True)
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()}
    again = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=done", "resume=auto", *cfg]))
    assert again.finished and again.run_dir == first.run_dir and again.curve == first.curve
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()} == before
    more = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=done", "resume=auto",
                                                   *cfg[:1], "trainer.max_steps=6", *cfg[2:]]))
    assert not more.finished and more.curve[-1][0] == 6  # raising max_steps continues it
    # ... from the training weights, not the average: the final checkpoint keeps both (it is
    # written before the average is copied into the model), so it is the 6-step run
    assert max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in ckpt["current_model_state"].items()) > 1e-5
    straight = fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=six", *cfg[:1],
                                                       "trainer.max_steps=6", *cfg[2:]]))
    assert abs(more.curve[-1][1] - straight.curve[-1][1]) < 1e-4


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    from lgframe.errors import LgframeError

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LGFRAME_RUN_LOCK", None)
    args = [f"out_dir={tmp_path}", "name=busy", "model.name=DiT-Pico/2", "trainer.checkpoint_every=2", "trainer.val_every=2",
            "trainer.progress=false", "sample.n=0"]
    proc = subprocess.Popen([sys.executable, "-m", "lgframe.cli", "pretrain", "dit_digits_pretrain", *args,
                             "trainer.max_steps=100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock, ckpt = tmp_path / "busy/lgframe.lock", tmp_path / "busy/checkpoints/last.ckpt"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ckpt.is_file() and proc.poll() is None:
            time.sleep(0.05)
        assert lock.is_file() and ckpt.is_file(), proc.stderr.read().decode()[-2000:]
        before = sorted(p.name for p in (tmp_path / "busy").iterdir())
        with pytest.raises(LgframeError, match=f"being written by process {proc.pid} on this machine"):
            fit(load_recipe("dit_digits_pretrain", [*args, "trainer.max_steps=200000", "resume=auto"]))
        assert proc.poll() is None  # the first run was not disturbed
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == before
    finally:
        proc.kill()
        proc.wait()
