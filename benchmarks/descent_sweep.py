"""Each method's descent done as its paper does it, swept on the proof's base setting (#24).

The setting is `recipes/compare_animals.yaml` (the proof benchmark's base setting in
one recipe: ancestors depth 4 x width 64 on the Animal-Shape silhouettes at 16x16, patch
4; descendants one size smaller, 3 x 32, and one larger, 6 x 96; 240 steps validated
every 12; 3 seeds), for the DiT (validation loss) or the ViT (validation error). Its
ancestors and its select and scratch runs are `lgframe compare`'s, reused from the
same work folder when a compare of that recipe already ran there.

A variant is a method plus recipe overrides (VARIANTS below): the descent schedule
(`init.unfreeze_at`: 0 = all parameters from the start, half = the default two phases,
-1 = the learngene frozen throughout, the papers' transfer protocol), dropping the
constraint after the descent (`init.materialize`, WAVE's dense stage 2), svd's
`sigma_init`, and the training-free amplitude rules of dct and dwt (`keep`,
`renormalize` / `match_stats`, `fan_in_power`), and FRONT's spectral refinement (the
dense ancestor trained on with the dct regularizer before its learngene is taken, against
the same extra steps without it). Per variant and size: the paired AUC
ratio to select and to scratch with 95% t-intervals over the seeds
(lgframe/apps/stats.py), and the final-loss ratio.

    python benchmarks/descent_sweep.py --threads 1 --variants svd,svd_unfreeze0 &  # one process per core
    python benchmarks/descent_sweep.py --threads 1 --variants kronecker,tucker
    python benchmarks/descent_sweep.py --report        # results/descent_sweep_<family>.json/.md/.png from what is there

Runs live in `--work` (default benchmarks/.work/sweep): finished runs are reused, each
finished variant is written to rows/<variant>.json there, so a stopped sweep continues.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lgframe.apps.compare import (
    ancestor_overrides,
    build_ancestors,
    descendant_overrides,
    fit_or_reuse,
    quality_key,
    size_tag,
)
from lgframe.apps.report import markdown_table, save_figure, source_commit
from lgframe.apps.stats import summarize
from lgframe.formats.files import write_json, write_text
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import extract_learngene_file

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
BASELINES = ("select", "scratch")

# variant -> (method, overrides); "select" and "scratch" are the baselines every ratio is paired with.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "select": ("select", []),
    "scratch": ("scratch", []),
    # svd (FINE): U, V the learngene, sigma and the free parameters trained first
    "svd": ("svd", []),
    "svd_unfreeze0": ("svd", ["init.unfreeze_at=0"]),
    "svd_frozen": ("svd", ["init.unfreeze_at=-1"]),  # FINE's protocol: U, V frozen throughout
    "svd_materialize": ("svd", ["init.materialize=true"]),
    "svd_sigma_copy": ("svd", ["constraint={name: svd, sigma_init: copy}"]),
    "svd_sigma_random": ("svd", ["constraint={name: svd, sigma_init: random}"]),
    # kronecker (WAVE / WeiT): templates the learngene, scalers trained first; WAVE's stage 2 trains dense
    "kronecker": ("kronecker", []),
    "kronecker_unfreeze0": ("kronecker", ["init.unfreeze_at=0"]),
    "kronecker_frozen": ("kronecker", ["init.unfreeze_at=-1"]),
    "kronecker_materialize": ("kronecker", ["init.materialize=true"]),
    # tucker (SWEET): G the learngene, A, B, C trained first
    "tucker": ("tucker", []),
    "tucker_unfreeze0": ("tucker", ["init.unfreeze_at=0"]),
    "tucker_frozen": ("tucker", ["init.unfreeze_at=-1"]),
    "tucker_materialize": ("tucker", ["init.materialize=true"]),
    # kind: learngene components and tailors
    "kind": ("kind", []),
    "kind_unfreeze0": ("kind", ["init.unfreeze_at=0"]),
    # (no kind_materialize: the inherited tailors make kind's weights depend on the class, so it has no
    # single dense form to train; `lgframe decompose --learngene-only` is the class-agnostic part)
    "kind_fresh_tailors": ("kind", ["constraint={name: kind, tailors: fresh}"]),
    # dct (FRONT) and dwt (BoT): training-free; the amplitude rules
    "dct": ("dct", []),
    # (no dct keep variants: `keep` acts when the learngene is extracted, and the sweep reuses compare's
    # learngene; a keep override on the descendant changes nothing, measured: identical rows on 2026-12-03)
    "dct_no_renormalize": ("dct", ["constraint={name: dct, renormalize: false}"]),
    "dct_fan_in_0": ("dct", ["constraint={name: dct, fan_in_power: 0.0}"]),
    "dct_fan_in_1": ("dct", ["constraint={name: dct, fan_in_power: 1.0}"]),
    # FRONT's spectral refinement: the dense ancestor trained REFINE_STEPS more steps with the dct
    # regularizer (lam: the share of each role's energy outside the kept block), then the dct learngene
    # of that; `dct_continued` is the same extra training at lam 0 (the control for the extra steps)
    "dct_refined": ("dct", []),
    "dct_continued": ("dct", []),
    "dwt": ("dwt", []),
    "dwt_no_match_stats": ("dwt", ["constraint={name: dwt, match_stats: false}"]),
    "dwt_fan_in_0": ("dwt", ["constraint={name: dwt, fan_in_power: 0.0}"]),
    "dwt_fan_in_1": ("dwt", ["constraint={name: dwt, fan_in_power: 1.0}"]),
}
REFINE = {"dct_refined": 1.0, "dct_continued": 0.0}  # variant -> lam of the refinement phase
REFINE_STEPS, REFINE_LR = 200, 3e-4  # as recipes/dit_digits_refine_dct.yaml
FAMILIES = {  # family -> compare_animals overrides turning it into that family's compare
    "dit": [],
    "vit": ["task=classification", "model.name=ViT-Pico/4", "compare.ancestor_recipe=vit_digits_pretrain",
            "compare.descendant_recipe=vit_digits_descend",
            'compare.sizes=["ViT-Pico/4 depth=3 width=32 heads=2", "ViT-Pico/4 depth=6 width=96 heads=3"]'],
}


def compare_cfg(family: str, work: Path, seeds: int, progress: bool):
    return load_recipe("compare_animals", [f"out_dir={work}", f"name=compare_animals_{family}" if family != "dit"
                                           else "name=compare_animals", *FAMILIES[family],
                                           f"compare.seeds=[{','.join(map(str, range(seeds)))}]",
                                           # the sweep's default rows are the two phases (unfreeze at half the
                                           # steps), as measured on 2026-12-03, whatever the recipe now says
                                           "compare.unfreeze_at=null",
                                           f"trainer.progress={str(progress).lower()}"])


def refined_learngene(cfg, ancestor_dir: Path, variant: str) -> Path:
    """The dct learngene of the dense ancestor after REFINE_STEPS more steps at the variant's lam
    (FRONT's refinement, or its lam-0 control); the run and the file are reused when there."""
    lam = REFINE[variant]
    lg = ancestor_dir / "learngenes" / f"dct_refine_lam{lam:g}.safetensors"
    if lg.exists():
        return lg
    dense = ancestor_dir / "ancestor_dense" / "checkpoints" / "last.ckpt"
    over = ancestor_overrides(cfg, ancestor_dir) + [
        f"name=ancestor_dense_refine_lam{lam:g}", f"constraint={{name: dct, lam: {lam}}}", f"init.source={dense}",
        f"trainer.max_steps={REFINE_STEPS}", f"trainer.val_every={REFINE_STEPS // 4}", f"optim.lr={REFINE_LR}",
        "optim.warmup_steps=0", "ema.enabled=false"]
    run = fit_or_reuse(load_recipe(cfg.compare.ancestor_recipe, over), load=False)
    extract_learngene_file(run.checkpoint, lg, {"name": "dct"})
    return lg


def run_variant(cfg, variant: str, learngenes: dict, work: Path) -> dict[str, list[dict]]:
    """{size: [one row per seed]} for one variant; its runs are compare's for the baselines."""
    method, extra = VARIANTS[variant]
    out = Path(cfg.out_dir) / cfg.name
    higher = quality_key(cfg.task)[1]
    rows: dict[str, list[dict]] = {}
    for size in cfg.compare.sizes:
        for seed in cfg.compare.seeds:
            common = descendant_overrides(cfg, size, seed, out / "runs")
            # compare's own runs for the baselines (reused); the others under the sweep's names, so a
            # compare run made by older code is not taken for this code's
            name = f"{size_tag(size)}_{variant if variant in BASELINES else 'sweep_' + variant}_s{seed}"
            if method == "scratch":
                over = [f"name={name}", "constraint=scratch"]
            else:
                source = learngenes.get(variant, learngenes[method])
                over = [f"name={name}", f"constraint={method}", f"init.source={source}"]
            r = fit_or_reuse(load_recipe(cfg.compare.descendant_recipe, common + over + extra), load=False)
            curve = [(s, 1.0 - a) for s, a in r.acc_curve] if higher else r.curve
            rows.setdefault(size, []).append({"seed": seed, "curve": curve})
    return rows


def report(family: str, work: Path, out: Path, meta: dict) -> Path:
    """descent_sweep_<family>.json/.md/.png from every finished variant in `work`."""
    rows_dir = work / "rows" / family
    found = {p.stem: json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))}
    if "scratch" not in found or "select" not in found:
        raise SystemExit(f"{rows_dir}: select and scratch must be measured first (--variants select,scratch)")
    sizes = list(found["select"]["rows"])
    summary = {size: summarize({v: d["rows"][size] for v, d in found.items()}, {}, metrics=(), ratio_metrics=())
               for size in sizes}
    doc = {"meta": meta | {"measured": {v: d["measured"] for v, d in found.items()}},
           "variants": {v: VARIANTS[v][1] for v in found}, "summary": summary}
    write_json(out / f"descent_sweep_{family}.json", doc)
    lines = [f"# Descent sweep ({family}): each method's descent, paired with select and scratch", "",
             f"Generated by `python benchmarks/descent_sweep.py --report` from `descent_sweep_{family}.json`. "
             "Setting: recipes/compare_animals.yaml (the proof's base setting), seeds "
             f"{meta['seeds']}; AUC of the validation {'error' if family == 'vit' else 'loss'} curve, paired ratios "
             "with 95% t-intervals (lower is better; win/loss only where the interval excludes 1).", ""]
    for size in sizes:
        lines += [f"## {size}", ""]
        table = []
        for v in found:
            e = summary[size][v]
            def iv(k, e=e):
                return "—" if e.get(k) is None else f"{e[k][0]:.2f} [{e[k][1]:.2f}, {e[k][2]:.2f}]"

            table.append([v, " ".join(VARIANTS[v][1]) or "(defaults)", f"{e['step0'][0]:.3f}", f"{e['final'][0]:.3f}",
                          f"{e['auc'][0]:.3f}", iv("auc_ratio_to_select"), e.get("auc_verdict_vs_select", "—"),
                          iv("final_ratio_to_select"), iv("auc_ratio_to_scratch")])
        lines += markdown_table(["variant", "overrides", "step 0", "final", "AUC", "AUC / select", "vs select",
                                 "final / select", "AUC / scratch"], table) + [""]
    path = out / f"descent_sweep_{family}.md"
    write_text(path, "\n".join(lines) + "\n")
    plot(summary, found, out / f"descent_sweep_{family}.png", family)
    return path


def plot(summary: dict, found: dict, path: Path, family: str) -> None:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in found if v not in ("select", "scratch")]
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 0.28 * len(names) + 1.5), squeeze=False)
    for ax, (size, cell) in zip(axes[0], summary.items()):
        for i, v in enumerate(names):
            m, lo, hi = cell[v]["auc_ratio_to_select"]
            color = "tab:green" if hi < 1 else "tab:red" if lo > 1 else "tab:gray"
            ax.errorbar([m], [i], xerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=2)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("AUC / select (95% interval; < 1: better than select)")
        ax.set_title(size, fontsize=8)
    fig.suptitle(f"descent sweep, {family}: green = beats select, red = loses", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="dit", choices=sorted(FAMILIES))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / ".work" / "sweep"), help="folder of the runs (kept: resumable)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 per process on a small machine)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rebuild the JSON, table and plot")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    cfg = compare_cfg(args.family, work, args.seeds, args.progress)
    meta = {"recipe": "compare_animals", "family": args.family, "seeds": list(cfg.compare.seeds),
            "sizes": list(cfg.compare.sizes), "steps": cfg.compare.steps, "points": cfg.compare.points,
            "ancestor_steps": cfg.compare.ancestor_steps}
    if not args.report:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
        ancestor_dir = Path(cfg.out_dir) / cfg.name
        methods = sorted({VARIANTS[v][0] for v in args.variants.split(",")} - {"scratch"})
        learngenes, _ = build_ancestors(load_recipe(cfg, [f"compare.constraints=[{','.join(methods)}]"]), ancestor_dir,
                                        ancestor_overrides(cfg, ancestor_dir))
        for v in args.variants.split(","):
            path = work / "rows" / args.family / f"{v}.json"
            if path.exists():
                continue
            t0 = time.time()
            if v in REFINE:  # its own learngene (the refinement run is part of the variant's time)
                learngenes[v] = refined_learngene(cfg, ancestor_dir, v)
            rows = run_variant(cfg, v, learngenes, work)
            write_json(path, {"rows": rows, "measured": {"date": time.strftime("%Y-%m-%d"),
                                                         "commit": source_commit(ROOT),
                                                         "wall_seconds": round(time.time() - t0, 1)}})
            print(f"{v}: done in {time.time() - t0:.0f} s", flush=True)
    print(report(args.family, work, out, meta))


if __name__ == "__main__":
    main()
