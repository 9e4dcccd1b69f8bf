"""A pretrain killed with SIGKILL resumes (resume=auto) onto the uninterrupted run's curve, EMA included."""

import os
import signal
import subprocess
import sys
import time

import torch

from lgframe.recipes import load_recipe
from lgframe.run import fit, read_curve

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
