"""Init quality of every learngene method against scratch and Weight Selection.

Runs `lgframe compare` (lgframe/compare.py) for the DiT (validation loss) and
the ViT (validation loss; accuracy in the per-run curves) on digits, one size
smaller and one larger than the ancestor, over several seeds, and reports per
method: validation loss at step 0 and at the end (mean, spread), steps to reach
scratch's final loss, and that as a ratio to scratch's steps and to select's.

    python benchmarks/init_quality.py            # full: ~1 h on 2 CPU cores
    python benchmarks/init_quality.py --quick    # ~3 min smoke run

Writes benchmarks/results/init_quality.json and init_quality.png (the
per-run reports stay under the output folder).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lgframe.compare import run_compare
from lgframe.constraint import constraint_names
from lgframe.io import atomic_path, write_json
from lgframe.recipes import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per descendant (default 3)")
    ap.add_argument("--families", default="dit,vit", help="comma-separated: dit, vit")
    args = ap.parse_args()
    methods = [n for n in constraint_names() if n != "scratch"]
    q = args.quick
    setups = {
        "dit": ("dit_digits_pretrain", "dit_digits_descend", "DiT-Nano/2" if not q else "DiT-Pico/2",
                ["DiT-Pico/2", "DiT-Micro/2"] if not q else ["DiT-Pico/2 depth=3 width=96 heads=3"]),
        "vit": ("vit_digits_pretrain", "vit_digits_descend", "ViT-Nano/2" if not q else "ViT-Pico/2",
                ["ViT-Pico/2", "ViT-Micro/2"] if not q else ["ViT-Pico/2 depth=3 width=96 heads=3"]),
    }
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for family, (anc, desc, model, sizes) in setups.items():
            if family not in args.families.split(","):
                continue
            cfg = load_recipe("compare_digits", [
                f"task={'diffusion' if family == 'dit' else 'classification'}", f"model.name={model}",
                f"out_dir={work}", f"name=init_quality_{family}", "trainer.progress=false",
                f"compare.constraints=[{','.join(methods)}]", f"compare.sizes=[{','.join(sizes)}]",
                f"compare.seeds={[0] if q else list(range(args.seeds))}", f"compare.steps={20 if q else 300}",
                f"compare.ancestor_steps={60 if q else 800}", f"compare.ancestor_recipe={anc}",
                f"compare.descendant_recipe={desc}",
            ])
            report = run_compare(cfg, samples=0 if q else 300)
            import json

            table = json.loads((report.parent / "compare.json").read_text())["summary"]
            for size, rows in table.items():
                sel = rows.get("select", {}).get("steps_to_scratch_final")
                for name, e in rows.items():
                    e["ratio_to_select"] = (e["steps_to_scratch_final"] / sel) if sel and e["steps_to_scratch_final"] is not None else None
            summary[family] = table
    out = Path(args.out)
    stem = "init_quality_quick" if q else "init_quality"
    path = out / f"{stem}.json"
    if path.exists():  # a run of some families keeps the others' results
        import json

        summary = json.loads(path.read_text()).get("summary", {}) | summary
    write_json(path, {"summary": summary, "methods": methods, "quick": q, "seeds": 1 if q else args.seeds})
    plot(summary, out / f"{stem}.png")
    for family, table in summary.items():
        for size, rows in table.items():
            for name, e in rows.items():
                print(f"{family} {size:<12} {name:<8} step0 {e['initial']:.4f} final {e['final']:.4f} "
                      f"ratio/scratch {e['ratio_to_scratch']} ratio/select {e['ratio_to_select']}")


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, s) for f, t in summary.items() for s in t]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (family, size) in zip(axes[0], panels):
        rows = summary[family][size]
        names = list(rows)
        ax.bar(names, [rows[n]["initial"] for n in names], alpha=0.5, label="step 0")
        ax.bar(names, [rows[n]["final"] for n in names], alpha=0.9, label="final")
        ax.set_title(f"{family}: {size}", fontsize=9)
        ax.set_ylabel("validation loss")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


if __name__ == "__main__":
    main()
