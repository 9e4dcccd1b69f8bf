"""Training-step time of the DiT under the `svd` constraint relative to the same dense model.

One training step is forward + MSE loss + backward + AdamW step on a fixed
random batch: x (B, 1, 8, 8), integer timesteps t in [0, 1000), labels y in
[0, 10] (10 is the null class). The dense model (`scratch`) and the svd model
(FINE form W^l = U diag(sigma^l) V^T, built from the same seeded dense init)
are timed side by side in one process, interleaved: after warmup, each repeat
times `--steps` steps of dense, then `--steps` steps of svd, so machine noise
hits both alike. The reported ratio is the median over repeats of
svd ms/step / dense ms/step (the range over repeats is kept as well).

Grid: DiT-Pico/2, DiT-Nano/2, DiT-Micro/2 at batch 8 and 128 with full rank,
plus svd rank 16 for DiT-Nano/2 at batch 128. Column `factored` counts the
constrained layers for which SVDBank.linear applies U, sigma, V to the
activations instead of building W (its own cost rule, mirrored here).

    python benchmarks/svd_overhead.py            # ~2 min on 2 CPU cores, 1 thread
    python benchmarks/svd_overhead.py --quick    # ~20 s smoke run

Writes benchmarks/results/svd_overhead.json and svd_overhead.png
(--quick: svd_overhead_quick.*).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lgframe.core.constraint import BANK, ConstrainedLinear
from lgframe.core.registry import get_constraint
from lgframe.formats.files import atomic_path, write_json
from lgframe.models.registry import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_step, timed  # noqa: E402  (shared with the all-constraint benchmark)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = ("DiT-Pico/2", "DiT-Nano/2", "DiT-Micro/2")
BATCHES = (8, 128)
FULL = {"name": "svd"}
# (model, batch, svd spec): the full-rank grid, then one low-rank setting.
GRID = [(m, b, FULL) for m in SIZES for b in BATCHES] + [("DiT-Nano/2", 128, {"name": "svd", "rank": 16})]
MODEL_KW = {"image_size": 8, "in_channels": 1, "num_classes": 10}


def label(spec: dict) -> str:
    return f"svd rank {spec['rank']}" if "rank" in spec else "svd full"


def build(name: str, spec, seed: int = 0):
    """A model with `spec` attached and its AdamW optimizer; same dense init for every spec."""
    torch.manual_seed(seed)
    model = create_model(name, **MODEL_KW)
    get_constraint(spec).attach(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def factored_layers(model, batch: int) -> tuple[int, int]:
    """(layers on the factor path, constrained layers), by SVDBank.linear's cost rule."""
    bank = getattr(model, BANK, None)
    mods = [m for m in model.modules() if isinstance(m, ConstrainedLinear)]
    if bank is None:
        return 0, 0
    tokens = batch * (model.config.image_size // model.config.patch_size) ** 2
    n_fact = 0
    for mod in mods:
        (m, r), n = bank.of(mod)["U"].shape, bank.of(mod)["V"].shape[0]
        n_fact += tokens * (n * r + r * m) < m * r * n + tokens * m * n
    return n_fact, len(mods)


def measure(name: str, batch: int, spec: dict, warmup: int, steps: int, repeats: int) -> dict:
    dense_model, dense_opt = build(name, "scratch")
    svd_model, svd_opt = build(name, spec)
    dense, svd = make_step(dense_model, dense_opt, batch), make_step(svd_model, svd_opt, batch)
    for _ in range(warmup):
        dense()
        svd()
    dense_ms, svd_ms, ratios = [], [], []
    for _ in range(repeats):  # interleaved: dense, svd, dense, svd, ...
        d = timed(dense, steps)
        s = timed(svd, steps)
        dense_ms.append(d)
        svd_ms.append(s)
        ratios.append(s / d)
    n_fact, n_layers = factored_layers(svd_model, batch)
    return {
        "model": name, "batch": batch, "svd": dict(spec), "label": label(spec),
        "dense_params": sum(p.numel() for p in dense_model.parameters()),
        "svd_params": sum(p.numel() for p in svd_model.parameters()),
        "factored_layers": n_fact, "constrained_layers": n_layers,
        "dense_ms": statistics.median(dense_ms), "svd_ms": statistics.median(svd_ms),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "dense_ms_repeats": dense_ms, "svd_ms_repeats": svd_ms, "ratio_repeats": ratios,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict], title: str):
    from rich import box
    from rich.table import Table

    tab = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("model", "svd", "batch", "dense ms", "svd ms", "ratio", "min-max", "factored"):
        tab.add_column(col, justify="left" if col in ("model", "svd") else "right", no_wrap=True)
    for r in rows:
        tab.add_row(r["model"], r["label"].removeprefix("svd "), str(r["batch"]), f"{r['dense_ms']:.2f}",
                    f"{r['svd_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
                    f"{r['factored_layers']}/{r['constrained_layers']}")
    return tab


def plot(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m, "svd full") for m in SIZES] + sorted({(r["model"], r["label"]) for r in rows if r["label"] != "svd full"})
    batches = sorted({r["batch"] for r in rows})
    by_key = {(r["model"], r["label"], r["batch"]): r for r in rows}
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    span = max(r["ratio_max"] for r in rows) - min(r["ratio_min"] for r in rows)
    pad = 0.02 * max(span, 0.1)
    for j, g in enumerate(groups):
        present = [b for b in batches if (*g, b) in by_key]
        for k, b in enumerate(present):
            r = by_key[(*g, b)]
            i = batches.index(b)
            x = j + width * (k - (len(present) - 1) / 2)
            # Bars grow from the dense baseline 1.0: up = svd slower, down = svd faster.
            ax.bar(x, r["ratio"] - 1, width, bottom=1, color=f"C{i}", label=f"batch {b}" if j == 0 else None,
                   yerr=[[r["ratio"] - r["ratio_min"]], [r["ratio_max"] - r["ratio"]]], capsize=3, ecolor="0.3")
            up = r["ratio"] >= 1
            ax.text(x, (r["ratio_max"] + pad) if up else (r["ratio_min"] - pad), f"{r['ratio']:.2f}",
                    ha="center", va="bottom" if up else "top", fontsize=8)
    ax.axhline(1.0, ls="--", c="gray", lw=1, label="dense (1.0)")
    ax.set_xticks(range(len(groups)), [m if lab == "svd full" else f"{m}\n{lab}" for m, lab in groups])
    ax.set_ylabel("training step time, svd / dense")
    lo = min(1.0, min(r["ratio_min"] for r in rows)) - 6 * pad
    hi = max(1.0, max(r["ratio_max"] for r in rows)) + 6 * pad
    ax.set_ylim(lo, hi)
    ax.set_title(f"svd overhead per training step (median over repeats, whiskers min-max)\n{subtitle}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 10; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; quick 3)")
    ap.add_argument("--quick", action="store_true", help="few steps, ~20 s; writes svd_overhead_quick.*")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    q = args.quick
    warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    steps = args.steps if args.steps is not None else (2 if q else 10)
    repeats = args.repeats if args.repeats is not None else (3 if q else 5)
    torch.set_num_threads(args.threads)

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 100)
    start = time.perf_counter()
    rows = []
    for name, batch, spec in GRID:
        rows.append(measure(name, batch, spec, warmup, steps, repeats))
        r = rows[-1]
        console.print(f"{name:<11} {r['label']:<11} batch {batch:>3}  dense {r['dense_ms']:7.2f} ms  "
                      f"svd {r['svd_ms']:7.2f} ms  ratio {r['ratio']:.3f}", highlight=False)
    wall = time.perf_counter() - start
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu_model()}
    settings = {"warmup": warmup, "steps": steps, "repeats": repeats, "quick": q,
                "step": "forward + MSE + backward + AdamW step", "order": "interleaved dense, svd per repeat"}
    threads = f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}"
    console.print(table(rows, f"training step, ratio = svd / dense ms (median)\n"
                              f"({steps} steps x {repeats} repeats, {threads}, {wall:.0f} s)"))
    out = Path(args.out)
    stem = "svd_overhead_quick" if q else "svd_overhead"
    write_json(out / f"{stem}.json", {"machine": machine, "settings": settings, "wall_seconds": wall, "configs": rows})
    plot(rows, out / f"{stem}.png",
         f"torch {machine['torch']}, {threads} of {machine['cpu_count']} CPUs, {steps} steps x {repeats} repeats")
    console.print(f"wrote {out / (stem + '.json')}\nwrote {out / (stem + '.png')}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
