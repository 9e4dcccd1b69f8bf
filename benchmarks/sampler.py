"""Which sampler turns the demo ancestor into recognizable digits?

`lgframe demo`'s ancestor (DiT-Nano/2 under svd, 800 steps on the embedded
digits, seed 0: recipes/dit_digits_pretrain.yaml) sampled with DDIM (deterministic,
the ODE) and DDPM (ancestral: fresh noise at every step) at 25, 50 and 100 steps and
guidance 1, 2 and 3, each with diffusers' `leading` timestep spacing (the first step
at t = 980 of 1000 for 50 steps) and `trailing` (t = 999; `sample.spacing`); 300
samples (30 per class) per cell, the same starting noise.
Scores: digits FID and class accuracy (lgframe.training.metrics: the digits
feature classifier) and the share of pixels brighter than -0.5 (real digits: the
`real` row). DDIM's samples carry the "salt" of stray bright background pixels
and get worse with more steps, the sign of a score model too rough for the ODE to
follow; DDPM's noise corrects it.

    python benchmarks/sampler.py                      # trains the ancestor (about 5 min alone), then 36 cells
    python benchmarks/sampler.py --checkpoint CKPT    # score an ancestor already trained
    python benchmarks/sampler.py --quick --out DIR    # tiny (the tests)

Writes benchmarks/results/sampler.json and sampler.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lgframe.apps.report import save_figure, source_commit
from lgframe.data.datamodule import ImageDataModule
from lgframe.formats.files import write_json
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, load_task

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record


def bright_share(x: torch.Tensor) -> float:
    return float((x > -0.5).float().mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a trained ancestor's last.ckpt (default: train the demo's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--spacings", default="leading,trailing", help="comma-separated sample.spacing values")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    n, steps_grid, guidances = (20, [5, 10], [1.0, 2.0]) if q else (300, [25, 50, 100], [1.0, 2.0, 3.0])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            task, source = load_task(args.checkpoint), str(args.checkpoint)
        else:
            over = [f"out_dir={tmp}", "name=ancestor", "seed=0", "constraint=svd", "trainer.progress=false",
                    f"trainer.max_steps={40 if q else 800}"] + (["model.name=DiT-Pico/2"] if q else [])
            task, source = fit(load_recipe("dit_digits_pretrain", over)).task, "trained here: dit_digits_pretrain, svd, 800 steps"
    dm = ImageDataModule("digits", seed=0)
    dm.setup()
    (train, _), (val, val_y) = dm.train_set.tensors, dm.val_set.tensors
    labels = torch.arange(n) % 10
    rows = [{"sampler": "real", "steps": 0, "guidance": None, "fid_digits": digits_fid(train, val[:n]),
             "class_accuracy": class_accuracy(val[:n], val_y[:n]), "bright_share": bright_share(val[:n])}]
    spacings = args.spacings.split(",")
    for kind in ("ddim", "ddpm"):
        for spacing in spacings:
            task.recipe["sample"]["spacing"] = spacing
            for steps in steps_grid:
                for g in guidances:
                    t1 = time.time()
                    x = task.sample(labels, guidance=g, steps=steps, scheduler=kind, seed=0)
                    rows.append({"sampler": kind, "spacing": spacing, "steps": steps, "guidance": g,
                                 "fid_digits": digits_fid(train, x), "class_accuracy": class_accuracy(x, labels),
                                 "bright_share": bright_share(x), "seconds": round(time.time() - t1, 1)})
                    r = rows[-1]
                    print(f"{kind} {spacing} {steps:>3} steps, guidance {g:g}: FID {r['fid_digits']:6.1f}  class acc "
                          f"{r['class_accuracy']:.3f}  bright {r['bright_share']:.3f}", flush=True)
    out = Path(args.out)
    name = "sampler_quick" if q else "sampler"
    write_json(out / f"{name}.json", {"date": time.strftime("%Y-%m-%d"), "commit": source_commit(ROOT),
                                      "ancestor": source,
                                      "samples": n, "spacings": spacings, "rows": rows,
                                      "wall_seconds": round(time.time() - t0, 1)})
    plot(rows, out / f"{name}.png", guidances, spacings)


def plot(rows: list[dict], path: Path, guidances: list[float], spacings: list[str]) -> None:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plots only

    real = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for ax, key, label in ((axes[0], "fid_digits", "FID (digits features, lower is better)"),
                           (axes[1], "class_accuracy", "class accuracy of samples"),
                           (axes[2], "bright_share", "share of pixels > -0.5")):
        for kind, marker in (("ddim", "o"), ("ddpm", "s")):
            for spacing, line in zip(spacings, ("-", "--", ":")):
                for i, g in enumerate(guidances):
                    pts = [(r["steps"], r[key]) for r in rows
                           if r["sampler"] == kind and r["guidance"] == g and r.get("spacing") == spacing]
                    ax.plot(*zip(*pts), marker + line, color=f"C{i + 3 * (kind == 'ddpm')}",
                            label=f"{kind} {spacing}, guidance {g:g}")
        ax.axhline(real[key], color="k", lw=0.8, ls=":", label="real held-apart digits")
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("The demo's ancestor: DDIM (deterministic) vs DDPM (ancestral) sampling, by timestep spacing")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
