"""`lgframe compare`: every constraint against scratch, side by side, in one run.

For each constraint of `compare.constraints` an ancestor is pretrained (or
reused from the same output folder); training-free constraints (dct, dwt,
select: `TransformConstraint`) share one dense ancestor, as in their papers,
and extract their learngenes from it. Each learngene initializes every size of
`compare.sizes`; every descendant and a scratch model of the same size train
for `compare.steps` steps on the same data and seeds. The report (markdown +
PNG) gives per size and method: validation loss at step 0 and at the end,
steps to reach scratch's final loss, that as a ratio of scratch's steps, and
the digits FID / class accuracy of samples from the final model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from omegaconf import DictConfig

from lgframe.constraint import TransformConstraint, constraint_class, constraint_names
from lgframe.io import write_json, write_text
from lgframe.models import parse_size
from lgframe.recipes import load_recipe
from lgframe.run import RunResult, evaluate, extract_learngene, fit, plot_curves


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First step whose value is at or below `target` (None: never)."""
    for step, v in curve:
        if v <= target:
            return step
    return None


def methods(cfg: DictConfig) -> list[str]:
    """The learngene methods to compare: `compare.constraints`, [all] = every registered one."""
    names = list(cfg.compare.constraints)
    if "all" in names:
        names = [n for n in constraint_names() if n != "scratch"]
    return [n for n in names if n != "scratch"]


def _ancestors(cfg: DictConfig, out: Path, base: list[str]) -> dict[str, Path]:
    """learngene path per constraint; one dense ancestor serves every transform constraint."""
    learngenes: dict[str, Path] = {}
    dense: RunResult | None = None
    for name in methods(cfg):
        if name == "scratch":
            continue
        lg = out / "learngenes" / f"{name}.safetensors"
        if issubclass(constraint_class(name), TransformConstraint):
            if not lg.exists():
                if dense is None:
                    dense = _reuse_or_fit(cfg, out, base + ["name=ancestor_dense", "constraint=scratch"], "ancestor_dense")
                extract_learngene(dense.checkpoint, lg, {"name": name})
        elif not lg.exists():
            run = _reuse_or_fit(cfg, out, base + [f"name=ancestor_{name}", f"constraint={name}"], f"ancestor_{name}")
            extract_learngene(run.checkpoint, lg)
        learngenes[name] = lg
    return learngenes


def _reuse_or_fit(cfg: DictConfig, out: Path, overrides: list[str], name: str) -> RunResult:
    ckpt = out / name / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return RunResult(out / name, ckpt)
    return fit(load_recipe(cfg.compare.ancestor_recipe, overrides + [f"trainer.max_steps={cfg.compare.ancestor_steps}"]),
               extract_learngene=False)


def run_compare(cfg: DictConfig, samples: int = 300) -> Path:
    c = cfg.compare
    out = Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = [f"out_dir={out}", f"task={cfg.task}", f"model.name={cfg.model.name}", f"data.name={cfg.data.name}",
            "trainer.progress=" + str(cfg.trainer.progress).lower()]
    learngenes = _ancestors(cfg, out, base)
    val_every = max(1, c.steps // 10)
    results: dict[str, dict[str, list[dict]]] = {}
    for size in c.sizes:
        tag = size.replace("/", "_").replace(" ", "_").replace("=", "")
        name_, size_overrides = parse_size(size)
        for seed in c.seeds:
            common = [f"out_dir={out / 'runs'}", f"model.name={name_ or cfg.model.name}",
                      *[f"model.{k}={v}" for k, v in size_overrides.items()], f"trainer.max_steps={c.steps}",
                      f"trainer.val_every={val_every}", f"seed={seed}", f"data.name={cfg.data.name}",
                      f"data.train_fraction={c.train_fraction}", "trainer.progress=" + str(cfg.trainer.progress).lower()]
            runs = {"scratch": fit(load_recipe(c.descendant_recipe, common + [f"name={tag}_scratch_s{seed}", "constraint=scratch"]),
                                   extract_learngene=False)}
            for name, lg in learngenes.items():
                runs[name] = fit(load_recipe(c.descendant_recipe, common + [
                    f"name={tag}_{name}_s{seed}", f"constraint={name}", f"init.source={lg}"]), extract_learngene=False)
            for name, r in runs.items():
                row = {"seed": seed, "curve": r.curve, "initial": r.initial_loss, "final": r.final_loss}
                if cfg.task == "diffusion" and samples:
                    row |= {k: v for k, v in evaluate(r.task, load_recipe(None, [f"data.name={cfg.data.name}"]).data,
                                                      n_samples=samples, steps=25).items()
                            if k in ("fid_digits", "class_accuracy")}
                results.setdefault(size, {}).setdefault(name, []).append(row)
            plot_curves({n: r.curve for n, r in runs.items()}, out / f"loss_{tag}_s{seed}.png", "validation loss",
                        f"{size}, seed {seed}: descendants vs scratch")
            if cfg.task == "diffusion" and seed == c.seeds[0]:
                sample_rows({n: r.task for n, r in runs.items()}, out / f"samples_{tag}.png", f"{size}, after {c.steps} steps")
    summary = _summarize(results)
    write_json(out / "compare.json", {"summary": summary, "runs": results, "wall_seconds": round(time.time() - t0, 1),
                                      "recipe": {"constraints": methods(cfg), "sizes": list(c.sizes),
                                                 "seeds": list(c.seeds), "steps": c.steps}})
    report = out / "report.md"
    write_text(report, _markdown(cfg, summary, out, time.time() - t0))
    return report


def sample_rows(tasks: dict, path: Path, title: str, per_class: int = 2, steps: int = 25, seed: int = 0) -> Path:
    """One row of samples per method (classes 0..k-1, `per_class` each), the
    same noise and guidance for every row, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lgframe.io import atomic_path

    rows = {}
    for name, task in tasks.items():
        k = task.model.config.num_classes
        labels = torch.arange(k).repeat_interleave(per_class)
        rows[name] = task.sample(labels, steps=steps, seed=seed)
    n = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.32 + 1.2, len(rows) * 0.42 + 0.5), dpi=120, squeeze=False)
    for ax, (name, imgs) in zip(axes[:, 0], rows.items()):
        strip = torch.cat([torch.nn.functional.pad((im[0] + 1) / 2, (0, 1), value=0.5) for im in imgs], dim=1)
        ax.imshow(strip.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title}: samples of classes 0-9 left to right ({per_class} each), the same noise in every row", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _summarize(results: dict) -> dict:
    summary = {}
    for size, methods in results.items():
        scratch = methods["scratch"]
        for name, rows in methods.items():
            reach = []
            for row, ref in zip(rows, scratch):
                s = steps_to_reach(row["curve"], ref["final"])
                reach.append(s)
            done = [s for s in reach if s is not None]
            scratch_steps = scratch[0]["curve"][-1][0]
            entry = {
                "initial": statistics.mean(r["initial"] for r in rows),
                "final": statistics.mean(r["final"] for r in rows),
                "final_spread": statistics.pstdev([r["final"] for r in rows]),
                "steps_to_scratch_final": statistics.mean(done) if len(done) == len(rows) else None,
                "ratio_to_scratch": (statistics.mean(done) / scratch_steps) if len(done) == len(rows) else None,
            }
            for k in ("fid_digits", "class_accuracy"):
                if k in rows[0]:
                    entry[k] = statistics.mean(r[k] for r in rows)
            summary.setdefault(size, {})[name] = entry
    return summary


def _fmt(v, spec=".4f"):
    return "—" if v is None else format(v, spec)


def _markdown(cfg: DictConfig, summary: dict, out: Path, wall: float) -> str:
    c = cfg.compare
    lines = [
        "# lgframe compare", "",
        f"Task {cfg.task}, data {cfg.data.name} (train fraction {c.train_fraction}), ancestor {cfg.model.name} "
        f"({c.ancestor_steps} steps); descendants {c.steps} steps, seeds {list(c.seeds)}. Wall time {wall:.0f} s.", "",
        "Steps to reach scratch's final validation loss (validation every "
        f"{max(1, c.steps // 10)} steps; 0 = already there at initialization); ratio = those steps / scratch's steps.", "",
    ]
    for size, methods in summary.items():
        lines += [f"## {size}", "", "| method | val loss step 0 | final (± spread) | steps to scratch's final | ratio | FID (digits) | class acc |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in methods.items():
            lines.append(f"| {name} | {_fmt(e['initial'])} | {_fmt(e['final'])} ± {_fmt(e['final_spread'])} | "
                         f"{_fmt(e['steps_to_scratch_final'], '.0f')} | {_fmt(e['ratio_to_scratch'], '.2f')} | "
                         f"{_fmt(e.get('fid_digits'), '.1f')} | {_fmt(e.get('class_accuracy'), '.3f')} |")
        tag = size.replace("/", "_").replace(" ", "_").replace("=", "")
        lines += ["", *[f"![{size} seed {s}](loss_{tag}_s{s}.png)" for s in c.seeds], ""]
        if cfg.task == "diffusion":
            lines += [f"![{size} samples](samples_{tag}.png)", ""]
    return "\n".join(lines) + "\n"
