"""`lgframe demo`: the whole chain on the embedded digits, with a report.

1. pretrain a DiT-Nano/2 ancestor (depth 6, width 128) under a constraint
   (`--constraint`, default svd (FINE); any registered name works);
2. extract its learngene;
3. descend to a smaller (DiT-Pico/2: depth 4, width 64) and a larger
   (DiT-Micro/2: depth 8, width 192) DiT;
4. train each descendant and a scratch model of the same size for the same
   steps on the same data and seed;
5. write report.md (table), loss curves and sample grids.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lgframe.apps.compare import steps_to_reach
from lgframe.apps.report import markdown_table
from lgframe.core.registry import constraint_class
from lgframe.formats.files import write_text
from lgframe.formats.learngene import Learngene
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import RunResult, fit, plot_curves

SIZES = {"smaller": "DiT-Pico/2", "larger": "DiT-Micro/2"}


def _fmt_steps(s: int | None) -> str:
    return "not reached" if s is None else str(s)


def sample_quality(runs: dict[str, RunResult], n: int = 300) -> dict:
    """Digits FID and class accuracy of each model's samples (its recipe's sampler, steps and
    guidance) and of real held-apart digits."""
    from lgframe.data.datamodule import ImageDataModule  # deferred: torch
    from lgframe.training.metrics import class_accuracy, digits_fid  # deferred: torch, torchmetrics

    dm = ImageDataModule("digits", seed=0)
    dm.setup()
    (train, _), (val, val_y) = dm.train_set.tensors, dm.val_set.tensors
    n = min(n, len(val))
    rows = [["real held-apart digits", "—", f"{digits_fid(train, val[:n]):.1f}", f"{class_accuracy(val[:n], val_y[:n]):.3f}"]]
    for name, r in runs.items():
        s = r.task.recipe["sample"]
        labels = torch.arange(n) % r.task.model.config.num_classes
        fake = r.task.sample(labels, seed=0)
        rows.append([name, f"{s['scheduler']}, {s['steps']} steps, guidance {s['guidance']:g}",
                     f"{digits_fid(train, fake):.1f}", f"{class_accuracy(fake, labels):.3f}"])
    return {"rows": rows, "n": n}


def run_demo(out: Path, steps: int = 800, descendant_steps: int = 300, seed: int = 0, constraint: str = "svd",
             overrides: list[str] | None = None) -> Path:
    """`overrides` (key=value) apply to every run, e.g. sample.n=10 for a fast check."""

    out = Path(out)
    t0 = time.time()
    cname = constraint_class(constraint).name  # an unknown name fails here, before any training
    common = [f"out_dir={out}", f"seed={seed}", *(overrides or [])]
    total = 1 + 2 * len(SIZES)
    anc = fit(load_recipe("dit_digits_pretrain", common + ["name=ancestor", f"trainer.max_steps={steps}", f"constraint={cname}"]),
              label=f"run 1/{total}: ancestor DiT-Nano/2 under {cname}")
    lg = Learngene.load(anc.learngene)
    anc_bytes = sum(p.numel() * p.element_size() for p in anc.task.model.parameters())
    val_every = max(10, descendant_steps // 10)
    runs: dict[str, dict[str, RunResult]] = {}
    for label, size in SIZES.items():
        base = common + [f"model.name={size}", f"trainer.max_steps={descendant_steps}", f"trainer.val_every={val_every}",
                         f"init.unfreeze_at={descendant_steps // 2}"]
        i = 2 + 2 * list(SIZES).index(label)
        runs[label] = {
            f"{cname} descendant": fit(load_recipe("dit_digits_descend", base + [
                f"name={label}_{cname}", f"constraint={cname}", f"init.source={anc.learngene}"]),
                label=f"run {i}/{total}: {size} descendant from the {cname} learngene"),
            "scratch": fit(load_recipe("dit_digits_descend", base + [f"name={label}_scratch", "constraint=scratch"]),
                           label=f"run {i + 1}/{total}: {size} from scratch"),
        }
        plot_curves({k: r.curve for k, r in runs[label].items()}, out / f"loss_{label}.png", "validation loss",
                    f"{size}: {cname} descendant vs scratch")
    quality = sample_quality({"ancestor": anc, **{f"{SIZES[label]} {kind}": r for label, pair in runs.items()
                                                   for kind, r in pair.items()}})
    wall = time.time() - t0

    rows = []
    for label, pair in runs.items():
        scratch_final = pair["scratch"].final_loss
        for kind, r in pair.items():
            c = r.task.model.config
            params = sum(p.numel() for p in r.task.model.parameters())
            rows.append([f"{SIZES[label]} ({c.depth}x{c.width})", kind, f"{params:,}", f"{r.initial_loss:.4f}",
                         f"{r.final_loss:.4f}", _fmt_steps(steps_to_reach(r.curve, scratch_final)),
                         _fmt_steps(steps_to_reach(r.curve, anc.final_loss))])
    lgb = lg.bytes("learngene")
    report = f"""# lgframe demo report

Embedded digits (scikit-learn, 8x8, 10 classes), DDPM noise prediction, seed {seed}.
Wall time: {wall:.0f} s.

## Ancestor

DiT-Nano/2 (depth 6, width 128) under `{cname}`, {steps} steps:
validation loss {anc.initial_loss:.4f} at step 0 -> {anc.final_loss:.4f}.

| learngene file part | bytes | share of the ancestor's {anc_bytes:,} parameter bytes |
|---|---|---|
| learngene (shared by all layers and sizes) | {lgb:,} | {lgb / anc_bytes:.1%} |
| scalers (per layer) | {lg.bytes('scalers'):,} | {lg.bytes('scalers') / anc_bytes:.1%} |
| rest (free parameters, for `rest: select`) | {lg.bytes('rest'):,} | {lg.bytes('rest') / anc_bytes:.1%} |

## Descendants vs scratch ({descendant_steps} steps each, same data and seed)

The descendant trains its scalers and the free parameters with the learngene
frozen for {descendant_steps // 2} steps, then everything (training-free
constraints train everything from the start). "Steps to reach" counts
validation checks every {val_every} steps (0 = already there at initialization).

{chr(10).join(markdown_table(["model", "init", "parameters", "val loss step 0", "val loss final",
                              "steps to scratch's final", f"steps to ancestor's final ({anc.final_loss:.4f})"], rows))}

![smaller](loss_smaller.png) ![larger](loss_larger.png)

Why the descendant has fewer parameters than scratch at the same size: its
constrained layers keep the learngene's shared factors (for svd, one U and V per
role for all layers, with per-layer singular values), where scratch has a full
matrix per layer. Why every fresh model starts at loss about 1.0: the task
predicts the added noise, whose variance is 1, and an untrained model predicts
about 0; a descendant starts below 1 because it already knows something.

## Sample quality

Digits FID (digits-classifier features, lower is better) and class accuracy
(share of samples the digits classifier reads as the class they were drawn
for) of {quality["n"]} samples per model (each model's recipe sampler: DDPM, whose
fresh noise at every step keeps the backgrounds clean where DDIM's deterministic
steps leave stray bright pixels, benchmarks/sampler.py), next to the same numbers for {quality["n"]} real
held-apart digits (the validation split) against the training split. FID from a
few hundred samples is biased upward: compare the rows with each other, not
with published figures.

{chr(10).join(markdown_table(["images", "sampler", "FID (digits)", "class accuracy"], quality["rows"]))}

## Samples

One class per column; the first row is real validation digits, then a grey
row, then the model's samples. Ancestor: ![ancestor]({anc.samples.relative_to(out)})

""" + "\n".join(
        f"{SIZES[label]} {kind}: ![{label} {kind}]({r.samples.relative_to(out)})\n"
        for label, pair in runs.items() for kind, r in pair.items()
    )
    path = out / "report.md"
    write_text(path, report)
    return path
