"""The proof: does a learngene initialize other sizes better than Weight Selection
(`select`) and than scratch? The init-quality benchmark on real data.

Protocol (DESIGN.md's benchmark protocol, completed; every number below is an option):

- Data: Animal-Shape silhouettes (`data.name=animals`, 9,716 images after the
  exact copies are dropped) at 16x16, patch 4 (16 tokens); validation on a fixed
  random subset of 256 validation images, the same for every run.
- Ancestors, per family (DiT: validation loss; ViT: validation accuracy), all
  the same size (depth 4, width 64) and the same steps: svd, kronecker, tucker
  and kind each trained under their constraint; one dense ancestor shared by
  dct, dwt and select. Each ancestor's own final quality is reported (the cost
  of pre-training under a constraint).
- Descendants one size smaller (depth 3, width 32) and one larger (depth 6,
  width 96) than the ancestor: depth and width both change. Every method plus
  scratch, the same seeds, data order and budget, validated every
  `steps / 20` steps (21 points per curve). The learngene trains from step 0
  for the DiT and joins at half the steps for the ViT (`UNFREEZE`: the descend
  recipes' defaults, measured by descent_sweep.py).
- Settings: `base` (ancestor and descendant on animals), `limited` (the
  descendant sees 10% of its training split), `shift` (ancestor on animals,
  descendant on the generated shapes at 16x16), and, opt-in, `shift_digits`
  (ancestors trained on digits upscaled to 16x16, descendants on animals).
- Per run: step-0 and final quality; area under the validation curve (of the
  loss, or of the error 1 - accuracy: lower is better for both); steps to
  reach scratch's final, select's final and the ancestor's final quality. For
  the DiT: FID (animals- or shapes-classifier features, 200 samples, 20 DDPM
  steps, EMA weights with warm-up) and class accuracy at guidance 1 and at the best of 1, 1.5, 2, 3,
  chosen on one half of the validation split and reported on the other half
  with fresh noise.
- Per cell (family, setting, size, method): mean with a 95% t-interval over
  seeds, and the paired ratio method / select and method / scratch with its
  95% interval (lgframe/apps/stats.py). A cell is a win only where the
  interval excludes 1.

    python benchmarks/proof.py --families dit --threads 1 &   # one process per core
    python benchmarks/proof.py --families vit --threads 1
    python benchmarks/proof.py --report                      # tables and plots from what is there
    python benchmarks/proof.py --quick --out DIR             # svd, select, scratch; 1 seed; tiny (the tests)

Runs live in `--work` (default benchmarks/.work, under proof/): a stopped benchmark
continues where it was, finished runs and evaluations are reused. Writes
benchmarks/results/proof_<family>.json, proof.json (both families, summary),
proof_curves.png, proof_ratios.png, proof_samples_<setting>_<size>.png and
proof.md (the tables the README quotes). The run before #24's defaults (DDIM,
no EMA warm-up, every learngene frozen for half the steps; 2026-12-02 at
82c04fe/fde6168) is kept in benchmarks/results/proof_2026-12-02/.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from lgframe.apps.compare import build_ancestors, fit_or_reuse, sample_rows
from lgframe.apps.report import markdown_table, save_figure, source_commit
from lgframe.apps.stats import summarize, t_interval
from lgframe.data.datamodule import build_datamodule
from lgframe.formats.files import write_json, write_text
from lgframe.models.registry import parse_size
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import load_recipe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
METHODS = ["svd", "kronecker", "tucker", "kind", "dct", "dwt", "select"]
# setting -> (ancestor data, descendant data, descendant train fraction)
SETTINGS = {"base": ("animals", "animals", 1.0), "limited": ("animals", "animals", 0.1),
            "shift": ("animals", "shapes", 1.0), "shift_digits": ("digits", "animals", 1.0)}
FAMILIES = {"dit": ("diffusion", "dit_digits_pretrain", "dit_digits_descend", "DiT"),
            "vit": ("classification", "vit_digits_pretrain", "vit_digits_descend", "ViT")}
GUIDANCES = [1.0, 1.5, 2.0, 3.0]
BEFORE = "proof_2026-12-02"  # the run before #24's defaults, beside the results (the report compares with it)


def protocol(quick: bool) -> dict:
    if quick:
        return {"image_size": 16, "patch": 4, "ancestor": "depth=2 width=32 heads=2", "ancestor_steps": 20,
                "sizes": {"smaller": "depth=2 width=16 heads=2", "larger": "depth=3 width=48 heads=2"},
                "steps": 10, "points": 5, "batch": 32, "val_subset": 64, "fid_samples": 20, "sample_steps": 4,
                "unfreeze": UNFREEZE, "sampler": "ddpm", "ema_warmup": True}
    return {"image_size": 16, "patch": 4, "ancestor": "depth=4 width=64 heads=2", "ancestor_steps": 1500,
            "sizes": {"smaller": "depth=3 width=32 heads=2", "larger": "depth=6 width=96 heads=3"},
            "steps": 240, "points": 20, "batch": 64, "val_subset": 256, "fid_samples": 200, "sample_steps": 20,
            "unfreeze": UNFREEZE, "sampler": "ddpm", "ema_warmup": True}


# Where the descendant's learngene joins training, a fraction of `steps` per family: the descend
# recipes' measured defaults (descent_sweep, benchmarks/README.md): the DiT trains everything from
# step 0, the ViT keeps FINE's two phases (half the steps with the learngene frozen).
UNFREEZE = {"dit": 0.0, "vit": 0.5}


def data_overrides(p: dict, name: str) -> list[str]:
    return [f"data.name={name}", f"data.image_size={p['image_size']}", f"data.val_subset={p['val_subset']}",
            f"sample.scheduler={p['sampler']}", f"ema.warmup={str(p['ema_warmup']).lower()}"]


def model_name(family: str, p: dict, size: str) -> str:
    return f"{FAMILIES[family][3]}-Pico/{p['patch']} {size}"


def ancestors(family: str, data: str, p: dict, methods: list[str], work: Path, progress: bool) -> tuple[dict, dict]:
    """Learngene files and each ancestor's final quality, per method (compare's machinery)."""
    task, anc_recipe, desc_recipe, _ = FAMILIES[family]
    name, overrides = parse_size(model_name(family, p, p["ancestor"]))
    out = work / family / f"ancestors_{data}"
    base = [f"out_dir={out}", f"task={task}", f"model.name={name}", *[f"model.{k}={v}" for k, v in overrides.items()],
            *data_overrides(p, data), f"trainer.progress={str(progress).lower()}",
            f"trainer.val_every={max(1, p['ancestor_steps'] // p['points'])}"]
    cfg = load_recipe("compare_digits", [f"task={task}", f"model.name={name}", f"compare.constraints=[{','.join(methods)}]",
                                         f"compare.ancestor_steps={p['ancestor_steps']}",
                                         f"compare.ancestor_recipe={anc_recipe}", f"compare.descendant_recipe={desc_recipe}"])
    return build_ancestors(cfg, out, base)


def descendant_run(family: str, setting: str, size: str, method: str, seed: int, p: dict, work: Path,
                   learngene: Path | None, progress: bool):
    task, _, desc_recipe, _ = FAMILIES[family]
    _, desc_data, frac = SETTINGS[setting]
    name, overrides = parse_size(model_name(family, p, p["sizes"][size]))
    # scratch does not depend on the ancestor: one run per (data, fraction), shared by the settings
    run = f"{desc_data}_f{frac}_{size}_scratch_s{seed}" if method == "scratch" else f"{setting}_{size}_{method}_s{seed}"
    common = [f"out_dir={work / family / 'runs'}", f"name={run}", f"model.name={name}",
              *[f"model.{k}={v}" for k, v in overrides.items()], *data_overrides(p, desc_data),
              f"data.batch_size={p['batch']}", f"data.train_fraction={frac}", f"trainer.max_steps={p['steps']}",
              f"trainer.val_every={max(1, p['steps'] // p['points'])}", f"seed={seed}",
              f"init.unfreeze_at={int(p['steps'] * p['unfreeze'][family])}", f"trainer.progress={str(progress).lower()}"]
    if method == "scratch":
        common.append("constraint=scratch")
    else:
        common += [f"constraint={method}", f"init.source={learngene}"]
    return fit_or_reuse(load_recipe(desc_recipe, common))


@functools.lru_cache(maxsize=4)
def _real_halves(data: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole validation split in two fixed halves: one chooses the guidance, one reports
    (read once per data set, not once per run)."""
    dm = build_datamodule(load_recipe(None, [f"data.name={data}", f"data.image_size={image_size}"]).data)
    dm.setup()
    x = dm.val_set.tensors[0]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[: len(x) // 2]], x[perm[len(x) // 2:]]


def sample_quality(run, data: str, p: dict) -> dict:
    """FID and class accuracy at guidance 1 and at the best guidance (chosen on one half
    of the validation split, reported on the other with fresh noise); cached in the run."""
    cache = run.run_dir / "proof_eval.json"
    key = {"guidances": GUIDANCES, "n": p["fid_samples"], "steps": p["sample_steps"], "data": data,
           "checkpoint_mtime": run.checkpoint.stat().st_mtime}
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["result"]
    choose, report = _real_halves(data, p["image_size"])
    task = run.task
    task.eval()
    labels = torch.arange(p["fid_samples"]) % task.model.config.num_classes
    with torch.no_grad():
        fid_at = {g: digits_fid(choose, task.sample(labels, guidance=g, steps=p["sample_steps"], seed=1), data)
                  for g in GUIDANCES}
        best = min(fid_at, key=fid_at.get)
        result = {"fid_choose": {str(g): v for g, v in fid_at.items()}, "best_guidance": best}
        for tag, g in (("g1", 1.0), ("best", best)):
            fake = task.sample(labels, guidance=g, steps=p["sample_steps"], seed=2)
            result[f"fid_{tag}"] = digits_fid(report, fake, data)
            result[f"class_acc_{tag}"] = class_accuracy(fake, labels, data)
    write_json(cache, {"key": key, "result": result})
    return result


def quality_curve(run, family: str) -> list[tuple[int, float]]:
    """The curve a cell is judged by, lower is better: validation loss (DiT) or error (ViT)."""
    return run.curve if family == "dit" else [(s, 1.0 - a) for s, a in run.acc_curve]


def run_family(family: str, settings: list[str], seeds: list[int], methods: list[str], p: dict, work: Path,
               progress: bool, samples: bool | list[str], save=None) -> dict:
    """Every setting of one family; `save(result)` after each setting (a long run's partial results)."""
    t0 = time.time()
    by_data: dict[str, tuple[dict, dict]] = {}
    out: dict = {"settings": {}, "ancestors": {}}
    for setting in settings:
        anc_data, desc_data, _ = SETTINGS[setting]
        if anc_data not in by_data:
            print(f"[{family}] ancestors on {anc_data}: {', '.join(methods)}", flush=True)
            by_data[anc_data] = ancestors(family, anc_data, p, methods, work, progress)
            lgs, finals = by_data[anc_data]
            out["ancestors"][anc_data] = {m: (finals[m] if family == "dit" else 1.0 - finals[m]) for m in finals}
        learngenes, finals = by_data[anc_data]
        t_setting = time.time()
        fid = samples if isinstance(samples, bool) else setting in samples
        cell_rows: dict = {}
        for size in p["sizes"]:
            rows: dict[str, list[dict]] = {}
            for seed in seeds:
                runs = {}
                for method in ["scratch", *methods]:
                    print(f"[{family}] {setting} {size} {method} seed {seed} ({time.time() - t0:.0f} s)", flush=True)
                    r = descendant_run(family, setting, size, method, seed, p, work, learngenes.get(method), progress)
                    runs[method] = r
                    row = {"seed": seed, "curve": quality_curve(r, family), "loss_curve": r.curve}
                    if family == "dit" and fid:
                        row |= sample_quality(r, desc_data, p)
                    rows.setdefault(method, []).append(row)
                if family == "dit" and fid and seed == seeds[0]:
                    grid = work / family / f"samples_{setting}_{size}.png"
                    sample_rows({m: r.task for m, r in runs.items()}, grid,
                                f"DiT {setting}, {size} descendant after {p['steps']} steps, guidance 1.5",
                                steps=p["sample_steps"], guidance=1.5)
                del runs
            same_data = anc_data == desc_data
            cell_rows[size] = summarize(rows, {m: (v if family == "dit" else 1.0 - v) for m, v in finals.items()}
                                        if same_data else {}, floor=0.0 if family == "dit" else 0.5 / p["val_subset"])
        out["settings"][setting] = cell_rows
        out.setdefault("setting_seconds", {})[setting] = round(time.time() - t_setting, 1)
        out.setdefault("setting_measured", {})[setting] = f"{time.strftime('%Y-%m-%d')} at {source_commit(ROOT)}"
        out["wall_seconds"] = round(time.time() - t0, 1)
        if save:
            save(out)
    return out


# ------------------------------------------------------------------ report
def _measured(res: dict) -> str:
    """Date and commit per setting (settings may come from different runs), or the run's one date and commit."""
    m = res.get("setting_measured")
    if not m or len(set(m.values())) == 1:
        return f"{res['meta']['date']} at commit {res['meta']['commit']}"
    return "; ".join(f"{s} {v}" for s, v in m.items())


def _iv(v, spec=".3f") -> str:
    if v is None:
        return "—"
    m, lo, hi = v
    return f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def report(out: Path, families: dict) -> Path:
    """proof.json (summary without per-run curves), proof.md and the plots, from the family files."""
    lines = ["# The proof: learngenes against Weight Selection and scratch", "",
             "Generated by `python benchmarks/proof.py --report` from " +
             ", ".join(f"`proof_{f}.json`" for f in families) + ". Ratios are paired over seeds (geometric mean, 95% "
             "t-interval on the log-ratio); lower is better for every quantity (loss, error = 1 - accuracy, FID); "
             "win/loss only where the interval excludes 1.", ""]
    summary: dict = {}
    for family, res in families.items():
        meta = res["meta"]
        lines += [f"## {family.upper()}: {meta['quality']} (lower is better)", "",
                  f"Measured {_measured(res)}; {len(meta['seeds'])} seeds {meta['seeds']}; "
                  f"wall time {res['wall_seconds']:.0f} s (the sum over settings: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in res.get("setting_seconds", {}).items())
                  + f"). Protocol: {json.dumps(meta['protocol'])}", ""]
        anc = res["ancestors"]
        lines += ["Ancestor final quality per constraint (same size and steps; dct, dwt and select share the dense "
                  "ancestor):", ""]
        lines += markdown_table(["data", *next(iter(anc.values())).keys()],
                                [[d, *[f"{v:.4f}" for v in a.values()]] for d, a in anc.items()])
        lines.append("")
        for setting, sizes in res["settings"].items():
            for size, cell in sizes.items():
                head = ["method", "step 0", "final", "AUC", "AUC / select", "vs select", "AUC / scratch", "vs scratch",
                        "final / select", "steps to scratch's final"]
                fid = "fid_best" in cell["scratch"]
                if fid:
                    head += ["FID g=1", "FID best g", "class acc best g", "best g"]
                table = []
                for m, e in cell.items():
                    row = [m, _iv(e["step0"]), _iv(e["final"]), _iv(e["auc"]),
                           _iv(e.get("auc_ratio_to_select"), ".2f"), e.get("auc_verdict_vs_select", "—"),
                           _iv(e.get("auc_ratio_to_scratch"), ".2f"), e.get("auc_verdict_vs_scratch", "—"),
                           _iv(e.get("final_ratio_to_select"), ".2f"), _iv(e.get("steps_to_scratch_final"), ".0f")]
                    if fid:
                        row += [_iv(e["fid_g1"], ".1f"), _iv(e["fid_best"], ".1f"), _iv(e["class_acc_best"], ".2f"),
                                ",".join(f"{g:g}" for g in e["best_guidance"])]
                    table.append(row)
                    summary.setdefault(family, {}).setdefault(setting, {}).setdefault(size, {})[m] = {
                        k: v for k, v in e.items() if k != "runs"}
                lines += [f"### {family} {setting}, {size} descendant", "", *markdown_table(head, table), ""]
        lines += [f"![curves](proof_curves_{family}.png)", ""]
        plot_curves(res, out / f"proof_curves_{family}.png", family)
    lines += ["## Wins, ties and losses against select (AUC of the validation curve)", "",
              *verdict_table(summary), "", "![ratios](proof_ratios.png)", ""]
    before = out / BEFORE / "proof.json"
    if before.is_file():
        old = json.loads(before.read_text())["summary"]
        lines += ["## Before and after #24's defaults", "",
                  f"Before: `{BEFORE}/proof.json` (DDIM samples, no EMA warm-up, every learngene frozen for "
                  "the first half of the steps); after: this run. The issue's targets, after: a factorized "
                  "method reaches select's final quality within 1/2 of the steps, every method scratch's within "
                  "1/5 (the share of the steps, mean over seeds; — where the mean run never reaches it).", "",
                  *before_after_table(summary, old, families), ""]
    write_json(out / "proof.json", {"summary": summary, "meta": {f: r["meta"] for f, r in families.items()}})
    plot_ratios(summary, out / "proof_ratios.png")
    md = out / "proof.md"
    write_text(md, "\n".join(lines) + "\n")
    return md


def before_after_table(summary: dict, before: dict, families: dict) -> list[str]:
    """AUC / select and AUC / scratch before and after, and the step-share targets after, per cell."""
    def ratio(cell, key):
        return _iv(cell.get(key), ".2f") if cell else "not run"

    def share(e, key, steps):
        v = e.get(key)
        return "—" if v is None or v[0] is None else f"{v[0] / steps:.2f}"

    rows = []
    for family, settings in summary.items():
        steps = families[family]["meta"]["protocol"]["steps"]
        for setting, sizes in settings.items():
            for size, cell in sizes.items():
                for m, e in cell.items():
                    if m in ("select", "scratch"):
                        continue
                    old = before.get(family, {}).get(setting, {}).get(size, {}).get(m)
                    rows.append([f"{family} {setting} {size}", m, ratio(old, "auc_ratio_to_select"),
                                 ratio(e, "auc_ratio_to_select"), ratio(old, "auc_ratio_to_scratch"),
                                 ratio(e, "auc_ratio_to_scratch"), share(e, "steps_to_select_final", steps),
                                 share(e, "steps_to_scratch_final", steps)])
    return markdown_table(["cell", "method", "AUC / select before", "after", "AUC / scratch before", "after",
                           "steps to select's final (share)", "steps to scratch's final (share)"], rows)


def verdict_table(summary: dict) -> list[str]:
    """One row per family and method: against select, per setting and size, the verdict
    and the AUC ratio (< 1: better than select), and the count of wins / ties / losses."""
    rows = []
    settings_all = list(dict.fromkeys(s for f in summary.values() for s in f))
    for family, settings in summary.items():
        methods = [m for m in next(iter(next(iter(settings.values())).values())) if m != "select"]
        for m in methods:
            cells, count = [f"{family.upper()} {m}"], {"win": 0, "tie": 0, "loss": 0}
            for setting in settings_all:
                parts = []
                for size, cell in settings.get(setting, {}).items():
                    e = cell[m]
                    r, v = e.get("auc_ratio_to_select"), e.get("auc_verdict_vs_select", "—")
                    count[v] = count.get(v, 0) + 1
                    parts.append(f"{size}: {v} {r[0]:.2f}" if r else f"{size}: —")
                cells.append("; ".join(parts) or "not run")
            cells.append(f"{count['win']} / {count['tie']} / {count['loss']}")
            rows.append(cells)
    head = ["method", *[f"{s}: verdict, AUC / select" for s in settings_all], "wins / ties / losses"]
    return markdown_table(head, rows)


def _plt():
    import matplotlib  # deferred: matplotlib (plots only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib (plots only)

    return plt


def plot_curves(res: dict, path: Path, family: str) -> None:
    """One panel per setting and size: every method's validation curve, mean over seeds with a 95% band."""
    plt = _plt()
    panels = [(s, z) for s, sizes in res["settings"].items() for z in sizes]
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.0 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    colors = plt.get_cmap("tab10")
    for ax, (setting, size) in zip(axes.flat, panels):
        cell = res["settings"][setting][size]
        for i, (m, e) in enumerate(cell.items()):
            curves = [r["curve"] for r in e["runs"]]
            steps = [s for s, _ in curves[0]]
            ivs = [t_interval([c[j][1] for c in curves]) for j in range(len(steps))]
            style = {"scratch": "--", "select": ":"}.get(m, "-")
            ax.plot(steps, [v[0] for v in ivs], style, color=colors(i), label=m, lw=1.4)
            ax.fill_between(steps, [v[1] for v in ivs], [v[2] for v in ivs], color=colors(i), alpha=0.15)
        ax.set_title(f"{family} {setting}: {size} descendant ({len(curves)} seeds, mean and 95% band)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss" if family == "dit" else "validation error (1 - accuracy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_ratios(summary: dict, path: Path) -> None:
    """AUC ratio method / select with its 95% interval, per family, setting and size; a line at 1."""
    plt = _plt()
    panels = [(f, s) for f, settings in summary.items() for s in settings]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.2), dpi=100, squeeze=False)
    for ax, (family, setting) in zip(axes[0], panels):
        sizes = summary[family][setting]
        methods = [m for m in next(iter(sizes.values())) if m != "select"]
        for k, (size, cell) in enumerate(sizes.items()):
            xs = [i + (k - 0.5) * 0.3 for i in range(len(methods))]
            ivs = [cell[m]["auc_ratio_to_select"] for m in methods]
            ax.errorbar(xs, [v[0] for v in ivs], yerr=[[v[0] - v[1] for v in ivs], [v[2] - v[0] for v in ivs]],
                        fmt="o", capsize=3, label=f"{size} descendant")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=45)
        ax.set_yscale("log")
        ax.set_ylabel("AUC ratio to select (< 1: better than select)")
        ax.set_title(f"{family} {setting}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="svd, select and scratch; 1 seed; tiny sizes (the tests)")
    ap.add_argument("--families", default="dit,vit", help="comma-separated: dit, vit")
    ap.add_argument("--settings", default="base,limited,shift", help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated learngene methods")
    ap.add_argument("--samples-in", default="base",
                    help="settings in which the DiT's samples are scored (FID, guidance sweep, grids; comma-separated, "
                    "'all' or 'none'; default base: sampling costs about as much as training on a CPU)")
    ap.add_argument("--work", default=str(HERE / ".work"), help="folder of the runs (kept: resumable)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 per process on a small machine)")
    ap.add_argument("--progress", action="store_true", help="Lightning progress bars per run")
    ap.add_argument("--report", action="store_true", help="only rebuild proof.json/md and plots from the family files")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "proof_quick" if args.quick else "proof"
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES] + [s for s in args.settings.split(",") if s not in SETTINGS]
    if bad:
        ap.error(f"unknown family or setting {bad}; families: {', '.join(FAMILIES)}; settings: {', '.join(SETTINGS)}")
    if not args.report:
        p = protocol(args.quick)
        methods = ["svd", "select"] if args.quick else [m for m in args.methods.split(",") if m]
        settings = ["base"] if args.quick else args.settings.split(",")
        seeds = list(range(1 if args.quick else args.seeds))
        for family in families:
            meta = {"date": time.strftime("%Y-%m-%d"), "commit": source_commit(ROOT), "seeds": seeds,
                    "methods": methods, "protocol": p, "quality": "validation loss" if family == "dit" else "validation error",
                    "quick": args.quick}

            def save(res, family=family, meta=meta):
                path = out / f"{stem}_{family}.json"
                old = json.loads(path.read_text()) if path.is_file() else {}
                if old.get("meta", {}).get("protocol") == meta["protocol"]:  # settings run by another process stay
                    seconds = old.get("setting_seconds") or {next(iter(old["settings"])): old.get("wall_seconds", 0)}
                    seconds = seconds | res["setting_seconds"]
                    measured = {s: f"{old['meta']['date']} at {old['meta']['commit']}" for s in old["settings"]}
                    measured |= old.get("setting_measured", {}) | res["setting_measured"]
                    res = res | {"settings": old["settings"] | res["settings"], "setting_measured": measured,
                                 "ancestors": old["ancestors"] | res["ancestors"], "setting_seconds": seconds,
                                 # processes that ran side by side: their sum, not the elapsed time
                                 "wall_seconds": round(sum(seconds.values()), 1)}
                    res = res | {"settings": {k: res["settings"][k] for k in SETTINGS if k in res["settings"]}}
                write_json(path, res | {"meta": meta})
                for setting in res["settings"]:  # the sample grids next to the results
                    for size in p["sizes"]:
                        grid = Path(args.work) / stem / family / f"samples_{setting}_{size}.png"
                        if grid.is_file():
                            (out / f"{stem}_samples_{setting}_{size}.png").write_bytes(grid.read_bytes())

            scored = {"all": True, "none": False}.get(args.samples_in, args.samples_in.split(","))
            run_family(family, settings, seeds, methods, p, Path(args.work) / stem, args.progress,
                       samples=scored, save=save)
    found = {f: json.loads((out / f"{stem}_{f}.json").read_text()) for f in FAMILIES if (out / f"{stem}_{f}.json").is_file()}
    if found:
        md = report(out, found) if not args.quick else _quick_report(out, found)
        print(f"wrote {md}")


def _quick_report(out: Path, found: dict) -> Path:
    path = out / "proof_quick.md"
    lines = []
    for family, res in found.items():
        for setting, sizes in res["settings"].items():
            for size, cell in sizes.items():
                for m, e in cell.items():
                    r = e.get("auc_ratio_to_select")
                    lines.append(f"{family} {setting} {size} {m}: AUC {e['auc'][0]:.4f}"
                                 + (f", / select {r[0]:.3f} ({e['auc_verdict_vs_select']})" if r else ""))
    write_text(path, "\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
