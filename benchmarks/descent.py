"""Wall time of `descend` and learngene bytes vs ancestor bytes, per constraint.

For every registered constraint with a learngene, at a tiny ancestor
(DiT-Nano/2: depth 6, width 128) and a DiT-B/2-sized one (depth 12, width 768,
random weights: timing does not depend on training): attach (random init),
extract the learngene, then time `descend` to a smaller and a larger model
(median of repeats). Bytes: the learngene group (size-agnostic tensors) and the
whole file (with scalers and free parameters) against the ancestor's parameters.

    python benchmarks/descent.py           # ~2 min on 2 CPU cores
    python benchmarks/descent.py --quick   # tiny size only

Writes benchmarks/results/descent.json and descent.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lgframe.core.registry import constraint_class, constraint_names, get_constraint
from lgframe.formats.files import atomic_path, write_json
from lgframe.models.registry import create_model

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "DiT-Nano/2": ({"depth": 4, "width": 64, "heads": 2}, {"depth": 8, "width": 192, "heads": 6}),
    "DiT-B/2": ({"depth": 8, "width": 512, "heads": 8}, {"depth": 16, "width": 1024, "heads": 16}),
}


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(name: str, ancestor: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model(ancestor)
    anc_bytes = param_bytes(model)
    c = get_constraint(name)
    c.attach(model)
    t = time.perf_counter()
    lg = c.learngene(model)
    extract_s = time.perf_counter() - t
    row = {"constraint": name, "ancestor": ancestor, "ancestor_bytes": anc_bytes,
           "learngene_bytes": lg.bytes("learngene"), "file_bytes": lg.bytes(),
           "learngene_ratio": lg.bytes("learngene") / anc_bytes, "extract_seconds": extract_s}
    for label, size in zip(("smaller", "larger"), SIZES[ancestor]):
        times = []
        for _ in range(repeats):
            target = create_model(ancestor, **size)
            t = time.perf_counter()
            constraint_class(name)().descend(lg, target)
            times.append(time.perf_counter() - t)
        row[f"descend_{label}_seconds"] = statistics.median(times)
        row[f"{label}_size"] = size
    return row


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """Existing rows of `path` with those of the re-measured constraints replaced (order kept)."""
    import json

    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {r["constraint"] for r in rows}
    keep = [r for r in old if r["constraint"] not in new]
    return sorted(keep + rows, key=lambda r: tuple(str(r[k]) for k in ('ancestor',)) + (r["constraint"],))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", default=None, help="comma-separated constraints to (re)measure; their rows replace "
                                                 "those in the existing results, the others are kept")
    args = ap.parse_args()
    ancestors = ["DiT-Nano/2"] if args.quick else list(SIZES)
    names = [n for n in constraint_names() if n != "scratch"]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            sys.exit(f"--only: unknown constraint(s) {unknown}; registered: {', '.join(names)}")
        names = args.only.split(",")
    rows = []
    for anc in ancestors:
        for name in names:
            rows.append(measure(name, anc, 1 if args.quick else args.repeats))
            r = rows[-1]
            print(f"{anc:<11} {name:<8} learngene {r['learngene_bytes'] / 1e6:8.2f} MB ({r['learngene_ratio']:.1%} of "
                  f"ancestor)  descend smaller {r['descend_smaller_seconds']:.3f} s  larger {r['descend_larger_seconds']:.3f} s")
    out = Path(args.out)
    stem = "descent_quick" if args.quick else "descent"
    rows = merged(Path(args.out) / f"{stem}.json", rows) if args.only else rows
    write_json(out / f"{stem}.json", {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()})
    plot(rows, out / f"{stem}.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ancestors = sorted({r["ancestor"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    width = 0.8 / max(1, len(ancestors))
    names = sorted({r["constraint"] for r in rows})
    for i, anc in enumerate(ancestors):
        sub = {r["constraint"]: r for r in rows if r["ancestor"] == anc}
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [sub[n]["learngene_ratio"] for n in names], width, label=anc)
        axes[1].bar(xs, [max(sub[n]["descend_smaller_seconds"], sub[n]["descend_larger_seconds"]) for n in names], width, label=anc)
    for ax, title in ((axes[0], "learngene bytes / ancestor bytes"), (axes[1], "descend wall time, s (slower direction)")):
        ax.set_xticks([j + width * (len(ancestors) - 1) / 2 for j in range(len(names))], names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    axes[0].axhline(0.2, ls="--", c="gray")
    axes[1].axhline(1.0, ls="--", c="gray")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


if __name__ == "__main__":
    main()
