"""WeiT multi-size pre-training against plain WeiT (kronecker), on the proof's base setting (#24 item 4).

The setting is `recipes/compare_animals.yaml` (DiT ancestors depth 4 x width 64, 2 heads of 32,
on the Animal-Shape silhouettes at 16x16, patch 4, 1000 steps; descendants 240 steps validated
every 12; 3 seeds), built with `lgframe compare`'s own ancestor and descendant overrides, as
benchmarks/descent_sweep.py does. Two kronecker ancestors train side by side with the same recipe,
seed and steps: the plain one (compare's `ancestor_kronecker`) and one with the recipe section
`multisize: {depths: [2, 3, 4], widths: [32, 64]}` (every step draws one nested sub-network; the
model's width 64 has 2 heads of 32, so 32 and 64 are the only nested widths: 48 is refused).
The dense ancestor (select's) is compare's too.

Descendants (every method on the same seeds, so ratios are paired per seed):
- inside the list: depth 2 x width 32 x 1 head (layers 0 and 3, the first head: exactly a
  sub-network the multi-size ancestor trained) and depth 3 x width 32 x 1 head (its depth is in
  the list, but the descent interpolates the middle layer between ancestor layers 1 and 2, while
  the nested depth 3 trained layers 0, 2, 3);
- outside: compare's two sizes, depth 3 x width 32 x 2 heads of 16 (the 32x32 templates cut each
  head: the width axis is interpolated) and depth 6 x width 96 x 3 heads (larger than the ancestor).
Per size: select, scratch, plain and multi-size kronecker descendants under the recipe's protocol
(every parameter trains from step 0, `compare.unfreeze_at: 0`) and under WeiT's transfer protocol
(templates frozen throughout, `init.unfreeze_at=-1`). Reported: the paired AUC ratio multi-size /
plain, and each / select and / scratch, with 95% t-intervals over the seeds (lgframe/apps/stats.py).
By default only the first inside size and the larger outside size, under the recipe's protocol
(DEFAULT_SIZES, DEFAULT_VARIANTS); `--sizes all --variants all` is the whole grid. Measured on
2026-12-03 on one core of a shared 2-core machine: ancestors 449 s, default grid 1174 s, the rest of
the whole grid 983 s (about 45 min in all; the first estimate, 117 s for one 6 x 96 run under
heavier load, had predicted ~2 h, hence the cut default).

    python benchmarks/multisize.py --threads 1       # runs (finished ones reused) + the report
    python benchmarks/multisize.py --estimate        # one descendant run, timed: the grid's cost
    python benchmarks/multisize.py --report          # .md and .png again from multisize.json

Runs live in `--work` (default benchmarks/.work/multisize): finished runs are reused, so a stopped
benchmark continues. Results: benchmarks/results/multisize.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lgframe.apps.compare import (
    ancestor_overrides,
    build_ancestors,
    descendant_overrides,
    finished_run,
    fit_or_reuse,
    size_tag,
)
from lgframe.apps.report import markdown_table, save_figure, source_commit
from lgframe.apps.stats import ratio_interval, summarize, verdict
from lgframe.formats.files import write_json, write_text
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import extract_learngene_file, read_curve

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
MULTISIZE = ["multisize.depths=[2,3,4]", "multisize.widths=[32,64]"]
INSIDE = ["DiT-Pico/4 depth=2 width=32 heads=1", "DiT-Pico/4 depth=3 width=32 heads=1"]
OUTSIDE = ["DiT-Pico/4 depth=3 width=32 heads=2", "DiT-Pico/4 depth=6 width=96 heads=3"]
# variant -> (constraint, learngene, extra overrides of the descendant)
VARIANTS: dict[str, tuple[str, str | None, list[str]]] = {
    "select": ("select", "select", []),
    "scratch": ("scratch", None, []),
    "plain": ("kronecker", "kronecker", []),
    "multisize": ("kronecker", "kronecker_multisize", []),
    "plain_frozen": ("kronecker", "kronecker", ["init.unfreeze_at=-1"]),
    "multisize_frozen": ("kronecker", "kronecker_multisize", ["init.unfreeze_at=-1"]),
}
PAIRS = [("multisize", "plain"), ("multisize_frozen", "plain_frozen")]
# The default grid, cut to fit ~45 min on one shared core (estimated 2026-12-03: the ancestors 449 s
# together, one 6 x 96 descendant 117 s; the full grid, 4 sizes x 6 variants x 3 seeds = 72 runs, ~2 h):
# one size inside the list (the exact sub-network) and one outside (compare's larger size), and the
# recipe's protocol only. `--sizes all --variants all` runs the rest (finished runs are reused).
DEFAULT_SIZES = [INSIDE[0], OUTSIDE[1]]
DEFAULT_VARIANTS = ["select", "scratch", "plain", "multisize"]


def compare_cfg(work: Path, seeds: int, sizes: list[str], progress: bool):
    return load_recipe("compare_animals", [f"out_dir={work}", "name=compare_animals",
                                           "compare.constraints=[kronecker,select]",
                                           f"compare.seeds=[{','.join(map(str, range(seeds)))}]",
                                           "compare.sizes=[" + ",".join(f'"{s}"' for s in sizes) + "]",
                                           f"trainer.progress={str(progress).lower()}"])


def ancestors(cfg) -> tuple[dict[str, Path], dict[str, dict]]:
    """Learngenes of the plain kronecker, dense (select) and multi-size kronecker ancestors, and
    each ancestor's validation curve (the full model: validation never nests)."""
    out = Path(cfg.out_dir) / cfg.name
    base = ancestor_overrides(cfg, out)
    learngenes, _ = build_ancestors(cfg, out, base)
    run = fit_or_reuse(load_recipe(cfg.compare.ancestor_recipe, base + [
        "name=ancestor_kronecker_multisize", "constraint=kronecker", *MULTISIZE,
        f"trainer.max_steps={cfg.compare.ancestor_steps}"]), load=False)
    lg = out / "learngenes" / "kronecker_multisize.safetensors"
    if not lg.exists():
        extract_learngene_file(run.checkpoint, lg)
    learngenes["kronecker_multisize"] = lg
    curves = {name: read_curve(out / name, "val/loss") for name in
              ("ancestor_kronecker", "ancestor_kronecker_multisize", "ancestor_dense")}
    return learngenes, {n: {"final": c[-1][1], "curve": c} for n, c in curves.items()}


GRID = [(d, w) for d in (2, 3, 4) for w in (32, 64)]


@torch.no_grad()
def nested_losses(cfg) -> dict[str, dict[str, float]]:
    """Validation loss of each ancestor's nested sub-network at every (depth, width) of the list,
    before any descent (the validation step's fixed noise per batch; the weights a learngene is
    extracted from). (4, 64) is the full model: it matches the logged final val/loss."""
    from lgframe.data.datamodule import build_datamodule
    from lgframe.models.nested import nested_subnetwork
    from lgframe.training.stages import load_task

    out = Path(cfg.out_dir) / cfg.name
    dm = build_datamodule(load_recipe(cfg.compare.ancestor_recipe, ancestor_overrides(cfg, out)).data)
    result = {}
    for name in ("ancestor_kronecker", "ancestor_kronecker_multisize"):
        task = load_task(out / name / "checkpoints" / "last.ckpt")
        task.model.eval()
        cell = {}
        for depth, width in GRID:
            losses, weights = [], []
            with nested_subnetwork(task.model, depth, width / 64):
                for i, batch in enumerate(dm.val_dataloader()):
                    g = torch.Generator().manual_seed(1000 + i)
                    losses.append(float(task.diffusion_loss(batch, generator=g, dropout=0.0)))
                    weights.append(len(batch[0]))
            cell[f"{depth}x{width}"] = sum(v * n for v, n in zip(losses, weights)) / sum(weights)
        result[name] = cell
    return result


def descendant(cfg, variant: str, size: str, seed: int, learngenes: dict[str, Path]):
    constraint, lg, extra = VARIANTS[variant]
    out = Path(cfg.out_dir) / cfg.name
    over = [f"name={size_tag(size)}_{variant}_s{seed}", f"constraint={constraint}"]
    if lg is not None:
        over.append(f"init.source={learngenes[lg]}")
    run_cfg = load_recipe(cfg.compare.descendant_recipe, descendant_overrides(cfg, size, seed, out / "runs") + over + extra)
    reused = finished_run(run_cfg) is not None
    return fit_or_reuse(run_cfg, load=False), reused


def paired(rows: dict[str, list[dict]], a: str, b: str, key: str) -> dict:
    """a / b of `key` per seed (geometric mean, 95% t-interval on the logs) and its verdict."""
    iv = ratio_interval([r[key] for r in rows[a]], [r[key] for r in rows[b]])
    return {"ratio": iv, "verdict": verdict(iv) if len(rows[a]) > 1 else "n/a (1 seed)"}


def invocation(i: dict) -> str:
    trained = i.get("descendant_runs_trained")
    return f"`{i['command']}` at {i['commit']}, {i['wall_seconds']:.0f} s" + (
        f", {trained} descendant runs trained" if trained is not None else "")


def iv(v, spec=".3f") -> str:
    return "—" if v is None else f"{v[0]:{spec}} [{v[1]:{spec}}, {v[2]:{spec}}]"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = ["# WeiT multi-size pre-training vs plain WeiT (kronecker)", "",
             f"Generated by `{m['command']}` on {m['date']} at commit {m['commit']} ({m['wall_seconds']:.0f} s wall, "
             f"torch threads {m['threads']}; runs it reused were trained by the invocations listed in "
             f"multisize.json: {'; '.join(invocation(i) for i in m['invocations'])}). Setting: recipes/compare_animals.yaml (DiT ancestors 4 x 64, 2 heads of "
             f"32, animals 16x16, {m['ancestor_steps']} steps, seed 0); descendants {m['steps']} steps, validated every "
             f"{m['val_every']}, seeds {m['seeds']}. Multi-size ancestor: `{' '.join(m['multisize'])}` (width 48 is "
             "not a whole number of heads of this model and is refused). AUC = mean validation loss over the "
             "descendant's curve (lower is better); ratios are paired per seed (geometric mean, 95% t-interval); "
             "win / loss only where the interval excludes 1.", "",
             "Protocols: `plain`, `multisize` train every parameter from step 0 (compare_animals' "
             "`unfreeze_at: 0`); `*_frozen` keep the templates frozen throughout (`init.unfreeze_at=-1`, WeiT's "
             "transfer protocol). All runs of a row share the seeds; everything below was measured in this run.", "",
             f"Grid: {m['grid']}", "",
             "Caveat: each ancestor is one training run (seed 0); the intervals cover the descendants' seeds "
             "(data order, noise, fresh parameters), not the spread between ancestor runs, which is why they are "
             "narrow.", "",
             "## Ancestors (full model, validation loss)", ""]
    lines += markdown_table(["ancestor", "final val loss"],
                            [[n, f"{a['final']:.4f}"] for n, a in doc["ancestors"].items()]) + [""]
    nested = doc["ancestor_nested_val_loss"]
    lines += ["## Ancestors' nested sub-networks before any descent (validation loss, depth x width)", "",
              "The sub-network a multi-size step trains (depth_layers of 4, the first heads), evaluated on the "
              "validation subset with the validation step's fixed noise; 4x64 is the full model.", ""]
    grid = list(next(iter(nested.values())))
    lines += markdown_table(["ancestor", *grid], [[n, *[f"{c[k]:.4f}" for k in grid]] for n, c in nested.items()])
    lines += [""]
    lines += ["## Multi-size / plain (paired AUC and final-loss ratios)", ""]
    table = []
    for size, cell in doc["sizes"].items():
        for a, b in PAIRS:
            if f"{a}/{b}" not in cell["pairs"]:
                continue
            p = cell["pairs"][f"{a}/{b}"]
            table.append([size, cell["where"], f"{a} / {b}", iv(p["auc"]["ratio"]), p["auc"]["verdict"],
                          iv(p["final"]["ratio"]), p["final"]["verdict"],
                          f"{cell['summary'][a]['step0'][0]:.3f} vs {cell['summary'][b]['step0'][0]:.3f}"])
    lines += markdown_table(["size", "list", "pair", "AUC ratio", "AUC verdict", "final ratio", "final verdict",
                             "step-0 loss"], table) + [""]
    for size, cell in doc["sizes"].items():
        lines += [f"## {size} ({cell['where']} the list)", ""]
        rows = []
        for v, e in cell["summary"].items():
            rows.append([v, iv(e["step0"], ".4f"), iv(e["final"], ".4f"), iv(e["auc"], ".4f"),
                         iv(e.get("auc_ratio_to_select"), ".2f"), e.get("auc_verdict_vs_select", "—"),
                         iv(e.get("auc_ratio_to_scratch"), ".2f"), e.get("auc_verdict_vs_scratch", "—")])
        lines += markdown_table(["variant", "step 0", "final", "AUC", "AUC / select", "vs select", "AUC / scratch",
                                 "vs scratch"], rows) + [""]
    lines += ["![AUC ratios](multisize.png)", ""]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(doc["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.6 * len(sizes), 3.2), squeeze=False, sharex=True)
    for ax, size in zip(axes[0], sizes):
        cell = doc["sizes"][size]
        items = [(f"{a} / {b}", cell["pairs"][f"{a}/{b}"]["auc"]["ratio"]) for a, b in PAIRS if f"{a}/{b}" in cell["pairs"]]
        items += [(f"{v} / select", cell["summary"][v]["auc_ratio_to_select"])
                  for v in ("plain", "multisize", "plain_frozen", "multisize_frozen") if v in cell["summary"]]
        for i, (_, (m, lo, hi)) in enumerate(items):
            color = "tab:green" if hi < 1 else "tab:red" if lo > 1 else "tab:gray"
            ax.errorbar([m], [i], xerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=2)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("AUC ratio (95% interval)", fontsize=8)
        ax.set_title(f"{size.replace('DiT-Pico/4 ', '')}\n({cell['where']} the list)", fontsize=8)
    fig.suptitle("WeiT multi-size vs plain kronecker ancestors, compare_animals: green < 1 (better), red > 1",
                 fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="default",
                    help="default (one inside, one outside) | all | inside | outside | size strings, separated by ';'")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"all, or comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--work", default=str(HERE / ".work" / "multisize"), help="folder of the runs (kept: resumable)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--estimate", action="store_true", help="time the ancestors and one descendant, then stop")
    ap.add_argument("--report", action="store_true", help="only rebuild multisize.md and .png from multisize.json")
    args = ap.parse_args(argv)
    if args.report:
        doc = json.loads((Path(args.out) / "multisize.json").read_text())
        write_text(Path(args.out) / "multisize.md", markdown(doc))
        plot(doc, Path(args.out) / "multisize.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"default": DEFAULT_SIZES, "all": INSIDE + OUTSIDE, "inside": INSIDE,
             "outside": OUTSIDE}.get(args.sizes) or args.sizes.split(";")
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    for v in ("select", "scratch"):  # every ratio is paired with them
        if v not in variants:
            variants.insert(0, v)
    t0 = time.time()
    cfg = compare_cfg(Path(args.work), args.seeds, sizes, args.progress)
    learngenes, ancestor_info = ancestors(cfg)
    t_anc = time.time() - t0
    print(f"ancestors ready in {t_anc:.0f} s", flush=True)
    nested = nested_losses(cfg)
    if args.estimate:
        t1 = time.time()
        descendant(cfg, "multisize", OUTSIDE[1], 0, learngenes)  # (reused when it exists: then ~0 s)
        one = time.time() - t1
        n = len(sizes) * len(variants) * args.seeds
        print(f"one descendant ({OUTSIDE[1]}, the largest) {one:.0f} s; the grid is {n} runs: at most "
              f"{n * one / 60:.0f} min", flush=True)
        return
    rows: dict[str, dict[str, list[dict]]] = {}
    new = 0
    for size in sizes:
        for seed in cfg.compare.seeds:
            for v in variants:
                r, reused = descendant(cfg, v, size, seed, learngenes)
                new += not reused
                rows.setdefault(size, {}).setdefault(v, []).append({"seed": seed, "curve": r.curve})
            print(f"{size} seed {seed}: done at {time.time() - t0:.0f} s", flush=True)
    doc_sizes = {}
    for size, cell in rows.items():
        summary = summarize(cell, {}, metrics=(), ratio_metrics=())
        pairs = {f"{a}/{b}": {k: paired(cell, a, b, k) for k in ("auc", "final")}
                 for a, b in PAIRS if a in cell and b in cell}
        for e in summary.values():
            for r in e["runs"]:
                r["curve"] = [[s, round(v, 6)] for s, v in r["curve"]]
        doc_sizes[size] = {"where": "inside" if size in INSIDE else "outside", "summary": summary, "pairs": pairs}
    command = "python benchmarks/multisize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    this = {"command": command, "date": time.strftime("%Y-%m-%d"), "commit": source_commit(ROOT),
            "wall_seconds": round(time.time() - t0, 1), "descendant_runs_trained": new,
            "descendant_runs_reused": sum(len(rs) for cell in rows.values() for rs in cell.values()) - new}
    before = out / "multisize.json"  # earlier invocations on the same work folder trained the reused runs
    earlier = []
    if before.exists():
        m = json.loads(before.read_text())["meta"]
        earlier = m.get("invocations") or [{k: m.get(k) for k in ("command", "date", "commit", "wall_seconds")}
                                           | {"descendant_runs_trained": None}]
    doc = {"meta": {"command": command, "invocations": [*earlier, this],
                    "date": this["date"], "commit": this["commit"], "wall_seconds": this["wall_seconds"],
                    "threads": torch.get_num_threads(), "recipe": "compare_animals", "seeds": list(cfg.compare.seeds),
                    "steps": cfg.compare.steps, "val_every": max(1, cfg.compare.steps // cfg.compare.points),
                    "ancestor_steps": cfg.compare.ancestor_steps, "multisize": MULTISIZE,
                    "descendant_unfreeze_at": cfg.compare.unfreeze_at,
                    "variants": {v: VARIANTS[v][2] for v in variants},
                    "grid": f"sizes {sizes}, variants {variants}"
                            + (" (the default grid, cut from 4 sizes x 6 variants to fit ~45 min on one shared core: "
                               "one size inside the list, one outside, the recipe's protocol only)"
                               if sizes == DEFAULT_SIZES and variants == DEFAULT_VARIANTS else "")},
           "ancestors": ancestor_info, "ancestor_nested_val_loss": nested, "sizes": doc_sizes}
    write_json(out / "multisize.json", doc)
    write_text(out / "multisize.md", markdown(doc))
    plot(doc, out / "multisize.png")
    print(out / "multisize.md")


if __name__ == "__main__":
    main()
