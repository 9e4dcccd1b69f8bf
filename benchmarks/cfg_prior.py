"""Does a swapped unconditional prior help classifier-free guidance after fine-tuning?

The claim (shared/seeds/004): fine-tuning a conditional diffusion model degrades
its own unconditional prediction, and CFG improves when the unconditional term
comes from the base model instead:
    eps = eps_base(x_t, null) + g * (eps_ft(x_t, c) - eps_base(x_t, null)).

Protocol: pretrain a DiT on all digits (label dropout 0.1); fine-tune it on
classes 0-4 with label dropout 0.01, so its null class is barely trained on the
new distribution; sample classes 0-4 from the fine-tuned model with its own
prior and with the base model's, at several guidance scales; report FID
(digits-classifier features, against real digits of classes 0-4) and class
accuracy of the samples. Same seeds, same noise for both priors.

    python benchmarks/cfg_prior.py            # full run, ~9 min on 2 CPU cores
    python benchmarks/cfg_prior.py --quick    # ~1 min smoke run

Writes benchmarks/results/cfg_prior.json and cfg_prior.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lgframe.apps.report import source_commit
from lgframe.data.datamodule import ImageDataModule
from lgframe.formats.files import atomic_path, write_json
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = [0, 1, 2, 3, 4]
SAMPLER = "ddpm"  # the digits recipes' (the run before 2026-12-03 used DDIM without the EMA warm-up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another benchmark)")
    args = ap.parse_args()
    q = args.quick
    base_steps, ft_steps, n, steps = (150, 60, 100, 10) if q else (1000, 400, 500, 30)
    scales = [1.0, 2.0, 4.0] if q else [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    t0 = time.time()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"out_dir={tmp}", "trainer.progress=false", "model.name=DiT-Nano/2" if not q else "model.name=DiT-Pico/2",
                  "constraint=scratch", "ema.decay=0.99", f"sample.scheduler={SAMPLER}", "ema.warmup=true"]
        base = fit(load_recipe("dit_digits_pretrain", common + ["name=base", f"trainer.max_steps={base_steps}",
                                                                f"trainer.val_every={base_steps}"]), extract_learngene=False)
        ft = fit(load_recipe("dit_digits_pretrain", common + [
            "name=ft", f"trainer.max_steps={ft_steps}", f"trainer.val_every={ft_steps}", f"init.source={base.checkpoint}",
            f"data.classes={CLASSES}", "diffusion.label_dropout=0.01", "optim.lr=3e-4", "optim.warmup_steps=0",
        ]), extract_learngene=False)
    dm = ImageDataModule("digits", classes=CLASSES)
    dm.setup()
    real = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    labels = torch.tensor(CLASSES).repeat(n // len(CLASSES) + 1)[:n]
    rows = []
    for g in scales:
        for prior, other in (("own", None), ("base", base.task.model)):
            x = ft.task.sample(labels, guidance=g, steps=steps, seed=0, uncond_model=other)
            rows.append({"guidance": g, "prior": prior, "fid_digits": digits_fid(real, x),
                         "class_accuracy": class_accuracy(x, labels)})
            print(f"guidance {g:>4}  prior {prior:<4}  FID {rows[-1]['fid_digits']:8.2f}  "
                  f"class accuracy {rows[-1]['class_accuracy']:.3f}")
    result = {
        "protocol": {"base_steps": base_steps, "finetune_steps": ft_steps, "finetune_classes": CLASSES,
                     "finetune_label_dropout": 0.01, "samples": n, "sampler": SAMPLER,
                     "sample_steps": steps, "ema_warmup": True, "quick": q,
                     "model": "DiT-Pico/2" if q else "DiT-Nano/2"},
        "rows": rows,
        "wall_seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d"), "commit": source_commit(RESULTS.parents[1]), "threads": args.threads,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    name = "cfg_prior_quick" if q else "cfg_prior"
    write_json(out / f"{name}.json", result)
    plot(rows, out / f"{name}.png")
    print(json.dumps({"wall_seconds": result["wall_seconds"]}))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for ax, key, label in ((axes[0], "fid_digits", "FID (digits features, lower is better)"),
                           (axes[1], "class_accuracy", "class accuracy of samples")):
        for prior, style in (("own", "o-"), ("base", "s--")):
            pts = [(r["guidance"], r[key]) for r in rows if r["prior"] == prior]
            ax.plot(*zip(*pts), style, label=f"{prior} unconditional prior")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Fine-tuned DiT (digits 0-4): CFG with its own vs the base model's unconditional prior")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


if __name__ == "__main__":
    main()
