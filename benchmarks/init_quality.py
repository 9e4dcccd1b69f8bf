"""Init quality of every learngene method against scratch and Weight Selection.

Runs `lgframe compare` (lgframe/apps/compare.py) for the DiT (quality: validation
loss) and the ViT (quality: validation accuracy) on digits, descendants one
size smaller and one larger than the ancestor, and reports per method: quality
at step 0 and at the end (mean, spread over seeds), steps to reach scratch's
final quality, that as a ratio to scratch's steps and to select's, steps to
reach the ancestor's own final quality, and for the DiT the digits FID and
class accuracy of samples after the fixed budget.

Variants (DESIGN.md's benchmark protocol): `base` (descendants on the
ancestor's data), `shift` (ancestor on digits, descendants on the generated
shapes: knowledge must transfer rather than copy), `limited` (descendants see
10% of the training split). The ancestors are trained once per family and
shared by the variants. Seeds: the smaller descendant 3 (`--seeds`), the
larger 1 (`--large-seeds`: it costs ~6x the smaller one on a CPU); shift and
limited run the smaller size with 1 seed (`--variant-seeds`).

    python benchmarks/init_quality.py            # full (~1 h per family on one core)
    python benchmarks/init_quality.py --quick    # svd and select only, ~2 min smoke run (run by the tests)
    # --families dit|vit (one process per family on two cores: --threads 1 each),
    # --variants base,shift,limited, --seeds N, --variant-seeds N

Writes benchmarks/results/init_quality.json and init_quality.png (a run of
some families or variants keeps the others' results; the per-run reports stay
under the work folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from lgframe.apps.compare import run_compare, size_tag
from lgframe.core.registry import constraint_names
from lgframe.formats.files import atomic_path, write_json
from lgframe.training.recipes import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"base": [], "shift": ["compare.descendant_data=shapes"], "limited": ["compare.train_fraction=0.1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the smaller descendant in the base variant (default 3)")
    ap.add_argument("--large-seeds", type=int, default=1, help="seeds of the larger descendant in the base variant (default 1)")
    ap.add_argument("--variant-seeds", type=int, default=1, help="seeds in the shift and limited variants (default 1)")
    ap.add_argument("--families", default="dit,vit", help="comma-separated: dit, vit")
    ap.add_argument("--variants", default="base,shift,limited", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--smaller-only", action="store_true", help="the smaller descendant only, in every variant")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; valid: {', '.join(VARIANTS)}")
    if args.quick:
        variants = ["base"]
    q = args.quick
    # --quick: the code path only (two methods); the full run takes every registered one
    methods = ["svd", "select"] if q else [n for n in constraint_names() if n != "scratch"]
    setups = {
        "dit": ("diffusion", "dit_digits_pretrain", "dit_digits_descend", "DiT-Nano/2" if not q else "DiT-Pico/2",
                ["DiT-Pico/2", "DiT-Micro/2"] if not q else ["DiT-Pico/2 depth=3 width=96 heads=3"]),
        "vit": ("classification", "vit_digits_pretrain", "vit_digits_descend", "ViT-Nano/2" if not q else "ViT-Pico/2",
                ["ViT-Pico/2", "ViT-Micro/2"] if not q else ["ViT-Pico/2 depth=3 width=96 heads=3"]),
    }
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for family, (task, anc, desc, model, sizes) in setups.items():
            if family not in args.families.split(","):
                continue
            for variant in variants:
                # (sizes, seeds) per compare call: the larger descendant costs ~6x the smaller one on a CPU,
                # so it gets --large-seeds; shift and limited run the smaller size only
                if q:
                    calls = [(sizes, [0])]
                elif variant == "base":
                    calls = [(sizes[:1], list(range(args.seeds)))]
                    calls += [] if args.smaller_only else [(sizes[1:], list(range(args.large_seeds)))]
                else:
                    calls = [(sizes[:1], list(range(args.variant_seeds)))]
                table, seeds_of, wall = {}, {}, 0.0
                for call_sizes, seeds in calls:
                    # one output folder per family: every call reuses its ancestors, learngenes and finished runs
                    cfg = load_recipe("compare_digits", [
                        f"task={task}", f"model.name={model}", f"out_dir={work}", f"name=init_quality_{family}",
                        "trainer.progress=false", f"compare.constraints=[{','.join(methods)}]",
                        f"compare.sizes=[{','.join(call_sizes)}]", f"compare.seeds={seeds}",
                        f"compare.steps={10 if q else 300}", f"compare.ancestor_steps={30 if q else 800}",
                        f"compare.ancestor_recipe={anc}", f"compare.descendant_recipe={desc}", *VARIANTS[variant],
                    ])
                    report = run_compare(cfg, samples=0 if q else 300)
                    result = json.loads((report.parent / "compare.json").read_text())
                    tag = f"{variant}_{size_tag(call_sizes[0])}"
                    for f in ("compare.json", "report.md"):  # the next call writes the same folder
                        (report.parent / f.replace(".", f"_{tag}.")).write_bytes((report.parent / f).read_bytes())
                    table |= result["summary"]
                    seeds_of |= {size: seeds for size in call_sizes}
                    wall += result["wall_seconds"]
                for rows in table.values():
                    sel = rows.get("select", {}).get("steps_to_scratch_final")
                    for e in rows.values():
                        s = e["steps_to_scratch_final"]
                        e["ratio_to_select"] = (s / sel) if sel and s is not None else None
                summary.setdefault(family, {})[variant] = {"quality": result["quality"], "seeds": seeds_of,
                                                           "wall_seconds": round(wall, 1), "sizes": table}
    out = Path(args.out)
    stem = "init_quality_quick" if q else "init_quality"
    path = out / f"{stem}.json"
    if path.exists():  # a run of some families or variants keeps the others' results
        old = json.loads(path.read_text()).get("summary", {})
        for family, by_variant in summary.items():
            old.setdefault(family, {}).update(by_variant)
        summary = old
    write_json(path, {"summary": summary, "methods": methods, "quick": q})
    plot(summary, out / f"{stem}.png")
    for family, by_variant in summary.items():
        for variant, v in by_variant.items():
            for size, rows in v["sizes"].items():
                for name, e in rows.items():
                    acc = f" acc {e['initial_acc']:.3f} -> {e['final_acc']:.3f}" if "final_acc" in e else ""
                    print(f"{family} {variant:<7} {size:<12} {name:<9} loss {e['initial']:.4f} -> {e['final']:.4f}{acc} "
                          f"ratio/scratch {_r(e['ratio_to_scratch'])} ratio/select {_r(e['ratio_to_select'])}")


def _r(v):
    return "—" if v is None else f"{v:.2f}"


def plot(summary, path: Path) -> None:
    """One panel per family, variant and size: step-0 and final quality per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, v, s) for f, bv in summary.items() for v, t in bv.items() for s in t["sizes"]]
    cols = min(4, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), dpi=110, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (family, variant, size) in zip(axes.flat, panels):
        rows = summary[family][variant]["sizes"][size]
        acc = summary[family][variant]["quality"] == "val/acc"
        names = list(rows)
        ax.bar(names, [rows[n]["initial_acc" if acc else "initial"] for n in names], alpha=0.5, label="step 0")
        ax.bar(names, [rows[n]["final_acc" if acc else "final"] for n in names], alpha=0.9, width=0.5, label="final")
        ax.set_title(f"{family} {variant}: {size}", fontsize=9)
        ax.set_ylabel("validation accuracy" if acc else "validation loss")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
