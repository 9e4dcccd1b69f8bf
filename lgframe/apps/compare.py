"""`lgframe compare`: every constraint against scratch, side by side, in one run.

For each constraint of `compare.constraints` an ancestor is pretrained (or
reused from the same output folder); training-free constraints (dct, dwt,
select: `TransformConstraint`) share one dense ancestor, as in their papers,
and extract their learngenes from it. Each learngene initializes every size of
`compare.sizes`; every descendant and a scratch model of the same size train
for `compare.steps` steps on the same data and seeds (`compare.descendant_data`
moves the descendants to another data source, a domain shift;
`compare.train_fraction` < 1 gives them a part of the training split).
Finished runs already in the output folder with the same settings are
reused, so an interrupted compare continues and one with more seeds or sizes
adds to what is there.

Quality is the validation loss for a DiT and the validation accuracy for a
ViT. The report (markdown + PNG) gives per size and method: quality at step 0
and at the end (mean and spread over seeds), steps to reach scratch's final
quality, that as a ratio of scratch's steps, steps to reach the ancestor's own
final quality (a harder target; only when the descendants train on the
ancestor's data), and the digits FID / class accuracy of samples from the
final DiT.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lgframe.apps.report import markdown_table
from lgframe.apps.stats import steps_to_reach, summarize  # noqa: F401 (also lgframe.apps.compare.steps_to_reach)
from lgframe.core.constraint import TransformConstraint
from lgframe.core.registry import constraint_class, constraint_names
from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint
from lgframe.formats.files import atomic_path, write_json, write_text
from lgframe.models.registry import parse_size
from lgframe.training.metrics import FEATURE_DATA
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import RunResult, evaluate, extract_learngene_file, fit, load_task, plot_curves, read_curve

log = logging.getLogger("lgframe")


def quality_key(task: str) -> tuple[str, bool]:
    """The metric a task is judged by, and whether higher is better."""
    return ("val/acc", True) if task == "classification" else ("val/loss", False)


def methods(cfg: DictConfig) -> list[str]:
    """The learngene methods to compare: `compare.constraints`, [all] = every registered one."""
    names = list(cfg.compare.constraints)
    if "all" in names:
        names = [n for n in constraint_names() if n != "scratch"]
    return [n for n in names if n != "scratch"]


def build_ancestors(cfg: DictConfig, out: Path, base: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    """learngene path and the ancestor's final quality per constraint; one
    dense ancestor serves every transform constraint."""
    learngenes: dict[str, Path] = {}
    finals: dict[str, float] = {}
    runs: dict[str, RunResult] = {}  # the dense ancestor is looked up once
    key = quality_key(cfg.task)[0]
    for name in methods(cfg):
        lg = out / "learngenes" / f"{name}.safetensors"
        transform = issubclass(constraint_class(name), TransformConstraint)
        run_name = "ancestor_dense" if transform else f"ancestor_{name}"
        if run_name not in runs:
            runs[run_name] = _reuse_or_fit(cfg, base + [f"name={run_name}", f"constraint={'scratch' if transform else name}"])
        run = runs[run_name]
        if not lg.exists():
            extract_learngene_file(run.checkpoint, lg, {"name": name} if transform else None)
        learngenes[name] = lg
        curve = read_curve(run.run_dir, key)
        if curve:
            finals[name] = curve[-1][1]
    return learngenes, finals


def _reuse_or_fit(cfg: DictConfig, overrides: list[str]) -> RunResult:
    return fit_or_reuse(load_recipe(cfg.compare.ancestor_recipe, overrides + [f"trainer.max_steps={cfg.compare.ancestor_steps}"]),
                        load=False)


def size_tag(size: str) -> str:
    """A size string as a file-name part: 'DiT-Pico/2 depth=3' -> 'DiT-Pico_2_depth3'."""
    return size.replace("/", "_").replace(" ", "_").replace("=", "")


def finished_run(cfg: DictConfig) -> Path | None:
    """The checkpoint of a finished run of this recipe in its run directory
    (`out_dir/name`): same settings (progress bars aside) and all steps done."""
    run_dir = Path(cfg.out_dir) / cfg.name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not (ckpt.is_file() and (run_dir / "config.yaml").is_file()):
        return None

    def settings(c):  # what decides the result: not where it is written, nor progress bars
        d = OmegaConf.to_container(c, resolve=True)
        d.pop("out_dir", None)
        d["trainer"].pop("progress", None)
        if d["init"].get("source"):
            d["init"]["source"] = os.path.realpath(d["init"]["source"])
        return d

    try:  # through the schema: a run written before a key was added, at its default, is the same run
        saved = load_recipe(OmegaConf.load(run_dir / "config.yaml"))
    except LgframeError:
        return None
    if settings(saved) != settings(cfg):
        return None
    return ckpt if load_checkpoint(ckpt).get("global_step", -1) >= cfg.trainer.max_steps else None


def set_aside_unfinished(run_dir: Path) -> Path | None:
    """A run folder by this name that is not the finished run wanted (a killed run, or other
    settings) and that no live process is writing: renamed to NAME.unfinished[-N], kept, so the
    new run gets the name and the next compare finds it (instead of writing NAME-1 every time)."""
    from lgframe.training.rundir import LOCK_NAME, lock_is_live, unique_dir

    if not run_dir.is_dir() or lock_is_live(run_dir / LOCK_NAME):
        return None
    aside = unique_dir(run_dir.with_name(run_dir.name + ".unfinished"))
    os.replace(run_dir, aside)
    log.warning("run folder %s is not a finished run of these settings: moved to %s", run_dir, aside)
    return aside


def fit_or_reuse(cfg: DictConfig, load: bool = True) -> RunResult:
    """`fit`, unless a finished run of the same recipe is in its run directory:
    then that run (and with `load` its final model). So a compare that stopped
    continues where it was, and one with more seeds or sizes adds to the runs
    it already has."""
    ckpt = finished_run(cfg)
    if ckpt is None:
        set_aside_unfinished(Path(cfg.out_dir) / cfg.name)
        return fit(cfg, extract_learngene=False)
    run_dir = ckpt.parent.parent
    return RunResult(run_dir, ckpt, read_curve(run_dir, "val/loss"), read_curve(run_dir, "val/acc"),
                     task=load_task(ckpt) if load else None)


def _given(section: DictConfig, schema, skip: tuple[str, ...]) -> list[str]:
    """`section.key=value` overrides for the keys the compare recipe sets away from the schema default."""
    prefix = schema.__name__.removesuffix("Cfg").lower()
    default = OmegaConf.structured(schema)
    return [f"{prefix}.{k}={OmegaConf.to_yaml(v).strip() if isinstance(v, DictConfig) else v}"
            for k, v in section.items() if k not in skip and v is not None and v != default.get(k)]


def data_overrides(cfg: DictConfig) -> list[str]:
    """The data settings a compare recipe gives (size, validation subset, batch): they apply to every run."""
    from lgframe.training.recipes import DataCfg  # the schema: what the recipe sets on purpose

    return _given(cfg.data, DataCfg, skip=("name", "train_fraction"))


def ancestor_overrides(cfg: DictConfig, out: Path) -> list[str]:
    """Overrides of every ancestor run of a compare recipe (written under `out`)."""
    from lgframe.training.recipes import ModelCfg

    return [f"out_dir={out}", f"task={cfg.task}", f"model.name={cfg.model.name}",
            *_given(cfg.model, ModelCfg, skip=("name",)), f"data.name={cfg.data.name}", *data_overrides(cfg),
            f"trainer.progress={str(cfg.trainer.progress).lower()}",
            f"trainer.val_every={max(1, cfg.compare.ancestor_steps // cfg.compare.points)}"]


def descendant_overrides(cfg: DictConfig, size: str, seed: int, runs: Path) -> list[str]:
    """Overrides of one descendant (or scratch) run of a compare recipe: size, budget, seed, data;
    the caller adds name, constraint and init.source."""
    c = cfg.compare
    name, size_overrides = parse_size(size)
    return [f"out_dir={runs}", f"model.name={name or cfg.model.name}",
            *[f"model.{k}={v}" for k, v in size_overrides.items()], f"trainer.max_steps={c.steps}",
            f"trainer.val_every={max(1, c.steps // c.points)}", f"seed={seed}",
            f"data.name={c.descendant_data or cfg.data.name}", *data_overrides(cfg),
            f"data.train_fraction={c.train_fraction}", f"trainer.progress={str(cfg.trainer.progress).lower()}",
            # phase 2 (the learngene unfrozen) for the second half unless the recipe says otherwise
            f"init.unfreeze_at={c.steps // 2 if c.unfreeze_at is None else c.unfreeze_at}"]


def run_compare(cfg: DictConfig, samples: int = 300) -> Path:
    """Ancestors, then every learngene and scratch at every size and seed; writes
    compare.json (per-seed curves, the summary with intervals) and report.md."""
    c = cfg.compare
    out = Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_given = data_overrides(cfg)
    learngenes, ancestor_finals = build_ancestors(cfg, out, ancestor_overrides(cfg, out))
    data = c.descendant_data or cfg.data.name
    if data != cfg.data.name:
        ancestor_finals = {}  # another domain: the ancestor's quality on its own data is no target here
    _, higher = quality_key(cfg.task)
    if higher:  # judged as the error 1 - accuracy: lower is better everywhere
        ancestor_finals = {k: 1.0 - v for k, v in ancestor_finals.items()}
    results: dict[str, dict[str, list[dict]]] = {}
    for size in c.sizes:
        tag = size_tag(size)
        for seed in c.seeds:
            common = descendant_overrides(cfg, size, seed, out / "runs")
            runs = {"scratch": fit_or_reuse(load_recipe(c.descendant_recipe, common + [f"name={tag}_scratch_s{seed}",
                                                                                        "constraint=scratch"]))}
            for name, lg in learngenes.items():
                runs[name] = fit_or_reuse(load_recipe(c.descendant_recipe, common + [
                    f"name={tag}_{name}_s{seed}", f"constraint={name}", f"init.source={lg}"]))
            for name, r in runs.items():
                curve = [(s, 1.0 - a) for s, a in r.acc_curve] if higher else r.curve
                row = {"seed": seed, "curve": curve, "loss_curve": r.curve}
                if cfg.task == "diffusion" and samples and data in FEATURE_DATA:
                    scores = evaluate(r.task, load_recipe(None, [f"data.name={data}", *data_given]).data,
                                      n_samples=samples, steps=25)
                    row |= {"fid": scores[f"fid_{data}"], "class_accuracy": scores["class_accuracy"]}
                results.setdefault(size, {}).setdefault(name, []).append(row)
            plot_curves({n: r.curve for n, r in runs.items()}, out / f"loss_{tag}_s{seed}.png", "validation loss",
                        f"{size}, seed {seed}: descendants vs scratch")
            if higher:
                plot_curves({n: r.acc_curve for n, r in runs.items()}, out / f"acc_{tag}_s{seed}.png",
                            "validation accuracy", f"{size}, seed {seed}: descendants vs scratch")
            if cfg.task == "diffusion" and seed == c.seeds[0]:
                sample_rows({n: r.task for n, r in runs.items()}, out / f"samples_{tag}.png", f"{size}, after {c.steps} steps")
    floor = 0.5 / cfg.data.val_subset if higher and cfg.data.val_subset else 0.0
    summary = {size: summarize(rows, ancestor_finals, floor=floor, metrics=("fid", "class_accuracy"),
                               ratio_metrics=("fid",))
               for size, rows in results.items()}
    wall = time.time() - t0
    write_json(out / "compare.json", {"summary": summary, "wall_seconds": round(wall, 1),
                                      "quality": "validation error (1 - accuracy)" if higher else "validation loss",
                                      "ancestor_final": ancestor_finals,
                                      "recipe": {"constraints": methods(cfg), "sizes": list(c.sizes), "data": data,
                                                 "train_fraction": c.train_fraction,
                                                 "seeds": list(c.seeds), "steps": c.steps, "points": c.points}})
    report = out / "report.md"
    write_text(report, _markdown(cfg, summary, out, wall))
    return report


def sample_rows(tasks: dict, path: Path, title: str, per_class: int = 2, steps: int = 25, seed: int = 0,
                guidance: float | None = None) -> Path:
    """One row of samples per method (classes 0..k-1, `per_class` each), the
    same noise and guidance for every row, as one PNG."""
    import matplotlib  # deferred: matplotlib (plots only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib (plots only)


    rows = {}
    for name, task in tasks.items():
        k = task.model.config.num_classes
        labels = torch.arange(k).repeat_interleave(per_class)
        rows[name] = task.sample(labels, steps=steps, seed=seed, guidance=guidance)
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


def _iv(v, spec=".3f") -> str:
    """An interval (mean, low, high) as 'mean [low, high]'; one value as itself; None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return format(v, spec)
    m, lo, hi = v
    return format(m, spec) if lo == hi else f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _markdown(cfg: DictConfig, summary: dict, out: Path, wall: float) -> str:
    c = cfg.compare
    acc = cfg.task == "classification"
    what = "validation error (1 - accuracy)" if acc else "validation loss"
    data = c.descendant_data or cfg.data.name
    n = len(c.seeds)
    lines = [
        "# lgframe compare", "",
        f"Task {cfg.task}; ancestor {cfg.model.name} on {cfg.data.name} ({c.ancestor_steps} steps); descendants on "
        f"{data} (train fraction {c.train_fraction}), {c.steps} steps, seeds {list(c.seeds)}. Wall time {wall:.0f} s.", "",
        f"Quality is the {what}, lower is better, validated every {max(1, c.steps // c.points)} steps. Values are means "
        f"over the {n} seed(s) with a 95% t-interval in brackets; AUC is the area under the validation curve over the "
        "steps (the mean quality during training: lower = got there sooner). \"/ select\" and \"/ scratch\" are "
        "paired per-seed ratios (geometric mean and interval); a win or a loss only where the interval excludes 1"
        + (" (one seed: no interval, no verdict; add seeds to compare.seeds)." if n == 1 else ".")
        + " Steps to reach: the first validation step at or below scratch's final (— = some seed never did).", "",
    ]
    for size, cell in summary.items():
        head = ["method", "step 0", "final", "AUC", "AUC / select", "vs select", "AUC / scratch", "vs scratch",
                "steps to scratch's final", "steps to ancestor's final"]
        sampled = "fid" in next(iter(cell.values()))
        if sampled:
            head += [f"FID ({data})", "class acc"]
        table = []
        for name, e in cell.items():
            cells = [name, _iv(e["step0"], ".4f"), _iv(e["final"], ".4f"), _iv(e["auc"], ".4f"),
                     _iv(e.get("auc_ratio_to_select"), ".2f"), e.get("auc_verdict_vs_select", "—"),
                     _iv(e.get("auc_ratio_to_scratch"), ".2f"), e.get("auc_verdict_vs_scratch", "—"),
                     _iv(e.get("steps_to_scratch_final"), ".0f"),
                     _iv(e.get("steps_to_ancestor_final"), ".0f") if "ancestor_final" in e else "n/a"]
            if sampled:
                cells += [_iv(e.get("fid"), ".1f"), _iv(e.get("class_accuracy"), ".3f")]
            table.append(cells)
        lines += [f"## {size}", "", *markdown_table(head, table)]
        tag = size_tag(size)
        lines += ["", *[f"![{size} seed {s}](loss_{tag}_s{s}.png)" for s in c.seeds], ""]
        if acc:
            lines += [*[f"![{size} seed {s} accuracy](acc_{tag}_s{s}.png)" for s in c.seeds], ""]
        else:
            lines += [f"![{size} samples](samples_{tag}.png)", ""]
    return "\n".join(lines) + "\n"
