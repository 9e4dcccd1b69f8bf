"""Training memory and quality of DiT-BlockSkip personalization against plain LoRA fine-tuning.

Four configurations, same LoRA rank, subject and steps:
  full   LoRA on every block at full resolution s_max (the baseline)
  patch  timestep-dependent patch sampling only (trains at s_min)
  skip   block skipping only (first n, last m blocks), full resolution
  both   the two together (DiT-BlockSkip)

Memory: counted bytes of one training step (parameters, gradients, AdamW
state, the EMA copy when the recipe's ema is on, as it is by default, and the
tensors autograd saves for backward without the model's own weights;
lgframe.apps.personalize.step_memory),
at a DiT-S-like size (depth 12, width 384, 32x32 -> s_min 16, batch 8; random
weights: the bytes do not depend on their values) and at the quality run's size.
On CPU the process RSS is dominated by the allocator and libraries, so the
counted bytes are the measure; on a GPU, torch.cuda.max_memory_allocated
would include the same terms. Quality: `lgframe personalize` of each
configuration from one pretrained base (`--base`, e.g. a DiT-Pico trained on
shapes), held-out subject denoising loss at full resolution after the same
steps, and the samples of each run.

  python benchmarks/personalize_memory.py --base runs/dit_shapes/checkpoints/last.ckpt
  python benchmarks/personalize_memory.py --memory-only             # memory rows only, quality rows kept
  python benchmarks/personalize_memory.py --quick --out /tmp/x      # what CI runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lgframe.apps.personalize import (  # noqa: E402
    PersonalizeTask,
    add_lora,
    block_ranges,
    run_personalize,
    step_memory,
    subject_images,
    with_subject_class,
)
from lgframe.apps.report import source_commit
from lgframe.formats.files import atomic_path, write_json  # noqa: E402
from lgframe.models.files import save_model
from lgframe.models.registry import create_model  # noqa: E402
from lgframe.training.recipes import load_recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
CODE = ("lgframe", "strategies", "benchmarks/personalize_memory.py")  # the code a result depends on


def configs(front: int, back: int, s_min: int, s_max: int) -> dict[str, dict]:
    return {
        "full": dict(patch_sampling=False, s_min=s_max, skip_front=0, skip_back=0),
        "patch": dict(patch_sampling=True, s_min=s_min, skip_front=0, skip_back=0),
        "skip": dict(patch_sampling=False, s_min=s_max, skip_front=front, skip_back=back),
        "both": dict(patch_sampling=True, s_min=s_min, skip_front=front, skip_back=back),
    }


def recipe_dict(p: dict, image_size: int, batch: int) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_recipe("dit_personalize_shapes", [f"data.batch_size={batch}"]), resolve=True)
    cfg["personalize"] |= p | {"image_size": image_size}
    return cfg


def memory_rows(size: dict, front: int, back: int, s_min: int, s_max: int, batch: int, rank: int) -> list[dict]:
    x0 = subject_images("shapes:3", batch, s_max, 1)
    rows = []
    for name, p in configs(front, back, s_min, s_max).items():
        torch.manual_seed(0)
        base = create_model("DiT-Pico/2", **size, image_size=p["s_min"])
        model, subject = with_subject_class(base)
        _, middle, _ = block_ranges(size["depth"], p["skip_front"], p["skip_back"])
        model = add_lora(model, rank, float(rank), middle)
        task = PersonalizeTask(recipe_dict(p, s_max, batch), model, subject)
        m = step_memory(task, x0)
        rows.append({"config": name, **p, "s_max": s_max, "batch": batch, **m})
    full = rows[0]
    for r in rows:
        r["total_ratio"] = r["total"] / full["total"]
        r["activation_ratio"] = r["activations"] / full["activations"]
    return rows


def quality_rows(base: str, out: Path, steps: int, front: int, back: int, s_min: int, s_max: int, seed: int,
                 samples_dir: Path, stem: str) -> list[dict]:
    rows = []
    for name, p in configs(front, back, s_min, s_max).items():
        over = [f"personalize.base={base}", f"out_dir={out}", f"name=personalize_{name}", f"trainer.max_steps={steps}",
                f"trainer.val_every={max(1, steps // 4)}", "trainer.progress=false", f"seed={seed}",
                f"personalize.image_size={s_max}"] + [f"personalize.{k}={v}" for k, v in p.items()]
        res = run_personalize(load_recipe("dit_personalize_shapes", over))
        shutil.copyfile(res.samples, samples_dir / f"{stem}_samples_{name}.png")
        rows.append({"config": name, **p, "steps": steps, "val_loss_start": res.val_curve[0][1],
                     "val_loss": res.val_curve[-1][1], "curve": res.val_curve, "memory_total": res.memory["total"],
                     "samples": f"{stem}_samples_{name}.png"})
        print(f"quality {name:<5} held-out val loss {res.val_curve[0][1]:.4f} -> {res.val_curve[-1][1]:.4f} "
              f"(counted step memory {res.memory['total'] / 2**20:.2f} MiB)", flush=True)
    full = rows[0]
    for r in rows:
        r["memory_ratio"] = r["memory_total"] / full["memory_total"]
    return rows


def pretrain_base(out: Path, size: int, steps: int, seed: int = 0) -> str:
    """A DiT-Pico pretrained on all generated shapes at the full resolution (the base a user
    would personalize); returns its model file."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    from lgframe.data.datasets import make_shapes
    from lgframe.training.tasks import DiffusionTask

    pl.seed_everything(seed, verbose=False)
    x, y = make_shapes(4000, seed=seed, size=size)
    recipe = OmegaConf.to_container(load_recipe("dit_digits_pretrain", ["constraint=scratch", "optim.warmup_steps=20"]), resolve=True)
    task = DiffusionTask(recipe, create_model("DiT-Pico/2", image_size=size))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(task, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True))
    path = out / f"base_shapes{size}.safetensors"
    save_model(task.model, path)
    print(f"pretrained base: DiT-Pico/2 at {size}x{size} on shapes, {steps} steps -> {path}", flush=True)
    return str(path)


def plot(mem: list[dict], quality: list[dict], path: Path, quality_note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(11 if quality else 6, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    names = [r["config"] for r in mem]
    parts = ["params", "grads", "optimizer", "ema", "activations"]
    bottom = [0.0] * len(mem)
    for k, part in enumerate(parts):
        vals = [r.get(part, 0) / 2**20 for r in mem]
        ax.bar(names, vals, bottom=bottom, label=part, color=f"C{k}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(mem):
        ax.text(i, bottom[i], f"{r['total_ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB per training step (counted)")
    ax.set_title(f"memory, batch {mem[0]['batch']}, s_max {mem[0]['s_max']}", fontsize=10)
    ax.legend(fontsize=8)
    if quality:
        ax = axes[0][1]
        for r in quality:
            ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", label=f"{r['config']} ({r['memory_ratio']:.2f}x mem)")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out subject loss (full resolution)")
        ax.set_title("quality after the same steps" + (f" ({quality_note})" if quality_note else ""), fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def last_commit(path: Path) -> str | None:
    """The commit that last changed `path` (a results file written before runs recorded their commit)."""
    try:
        r = subprocess.run(["git", "log", "-1", "--format=%h", "--", path.name], cwd=path.parent, capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and steps; writes personalize_memory_quick.*")
    ap.add_argument("--base", default=None, help="pretrained DiT for the quality runs (none: memory only; --quick makes one)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="without --base: pretrain a DiT-Pico base on 16x16 shapes for this many steps first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=None, help="where the quality runs go (default: a temporary folder)")
    ap.add_argument("--memory-only", action="store_true",
                    help="measure the memory rows only; the quality rows of the existing results file are kept "
                         "(with the run they come from)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        size, geo, batch = dict(depth=4, width=64, heads=2), (1, 1, 8, 16), 8
    else:
        size, geo, batch = dict(depth=12, width=384, heads=6), (3, 3, 16, 32), 8
    mem = memory_rows(size, *geo, batch=batch, rank=4)
    for r in mem:
        print(f"memory {r['config']:<5} total {r['total'] / 2**20:8.2f} MiB ({r['total_ratio']:.2f}x), "
              f"activations {r['activations'] / 2**20:8.2f} MiB ({r['activation_ratio']:.2f}x), "
              f"EMA copy {r['ema'] / 2**20:.2f} MiB", flush=True)
    stem = "personalize_memory_quick" if args.quick else "personalize_memory"
    measured = {"date": datetime.date.today().isoformat(), "commit": source_commit(ROOT, CODE, missing=None)}
    if args.memory_only:
        path = out / f"{stem}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        quality = old.get("quality", [])
        origin = old.get("quality_measured") or old.get("measured") or {"committed_in": last_commit(path)}
        write_json(path, old | {"torch": torch.__version__, "threads": args.threads, "model": size, "skip_front": geo[0],
                                "skip_back": geo[1], "s_min": geo[2], "s_max": geo[3], "memory": mem,
                                "measured": measured, "quality_measured": origin})
        note = f"earlier run {origin.get('commit') or origin.get('committed_in')}"
        plot(mem, quality, out / f"{stem}.png", note if quality else "")
        print(f"wrote the memory rows of {path} (quality rows kept, measured {origin}) and .png")
        return
    base = args.base
    if base is None and args.pretrain_steps:
        base = pretrain_base(Path(tempfile.mkdtemp(prefix="personalize_base_")), 16, args.pretrain_steps, args.seed)
    if args.quick and base is None:
        torch.manual_seed(0)
        model = create_model("DiT-Pico/2")
        with torch.no_grad():  # a non-degenerate base (adaLN-Zero starts every block as identity)
            for _n, p in model.named_parameters():
                if p.requires_grad and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        base = str(out / "quick_base.safetensors")
        save_model(model, base)
    quality = []
    if base:
        steps = 20 if args.quick else args.steps
        runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="personalize_runs_"))
        quality = quality_rows(base, runs, steps, 1, 1, 8, 16, args.seed, out, stem)
    write_json(out / f"{stem}.json", {"torch": torch.__version__, "threads": args.threads, "model": size,
                                      "skip_front": geo[0], "skip_back": geo[1], "s_min": geo[2], "s_max": geo[3],
                                      "memory": mem, "quality": quality, "quality_base": base, "measured": measured,
                                      "quality_measured": measured if quality else None})
    plot(mem, quality, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
