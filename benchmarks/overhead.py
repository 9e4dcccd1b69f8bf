"""Training-step time and memory of every registered constraint relative to the dense model.

For each constraint in the registry (scratch is the dense baseline itself), a
DiT is built from the same seeded dense init, the constraint is attached
(`init="random"`, as in pre-training) and one training step (forward + MSE
loss + backward + AdamW step on a fixed random batch) is timed side by side
with the dense model's in one process, interleaved (dense, constrained, dense,
...) so machine noise hits both alike. The ratio is the median over repeats.

Memory is counted, not sampled (CPU has no allocator peak counter): parameters
+ gradients + AdamW state + the bytes autograd saves for backward during one
forward (a saved_tensors_hooks count, each storage once). The ratio is that
total for the constrained model over the dense model's.

Sizes: the demo size (DiT-Nano/2, batch 128) and a DiT-B/2-sized model (depth
12, width 768; 8x8 digits-like inputs, batch 8, few steps).

    python benchmarks/overhead.py            # ~10 min on 2 CPU cores
    python benchmarks/overhead.py --quick    # DiT-Pico/2 only, ~30 s

Writes benchmarks/results/overhead.json and overhead.png (--quick: overhead_quick.*).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lgframe.core.registry import constraint_names, get_constraint
from lgframe.formats.files import atomic_path, write_json
from lgframe.models.registry import create_model

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_KW = {"image_size": 8, "in_channels": 1, "num_classes": 10}


def build(model_name: str, constraint: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(model_name, **MODEL_KW)
    c = get_constraint(constraint)
    c.attach(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def batch_of(batch: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 11, (batch,), generator=g), torch.randn(batch, 1, 8, 8, generator=g))


def make_step(model, opt, batch: int):
    x, t, y, noise = batch_of(batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, y), noise).backward()
        opt.step()

    return step


def memory_bytes(model, opt, batch: int) -> dict:
    """Parameters, gradients, AdamW state and saved activations of one step, in bytes."""
    x, t, y, noise = batch_of(batch)
    seen: dict[int, int] = {}

    def pack(tensor):
        try:
            s = tensor.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.mse_loss(model(x, t, y), noise)
    loss.backward()
    opt.step()
    params = [p for p in model.parameters()]
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": p_bytes, "grads": g_bytes, "optimizer": state, "activations": sum(seen.values()),
            "total": p_bytes + g_bytes + state + sum(seen.values())}


def timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n * 1e3


def measure(model_name: str, batch: int, constraint: str, warmup: int, steps: int, repeats: int) -> dict:
    dense_model, dense_opt = build(model_name, "scratch")
    model, opt = build(model_name, constraint)
    dense, con = make_step(dense_model, dense_opt, batch), make_step(model, opt, batch)
    for _ in range(warmup):
        dense()
        con()
    d_ms, c_ms = [], []
    for _ in range(repeats):
        d_ms.append(timed(dense, steps))
        c_ms.append(timed(con, steps))
    ratios = [c / d for c, d in zip(c_ms, d_ms)]
    mem_d, mem_c = memory_bytes(dense_model, dense_opt, batch), memory_bytes(model, opt, batch)
    return {
        "model": model_name, "batch": batch, "constraint": constraint,
        "dense_ms": statistics.median(d_ms), "constraint_ms": statistics.median(c_ms),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "memory_dense": mem_d, "memory_constraint": mem_c, "memory_ratio": mem_c["total"] / mem_d["total"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    names = list(dict.fromkeys(r["constraint"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    width = 0.8 / len(models)
    for ax, key, title in ((axes[0], "ratio", "step time / dense"), (axes[1], "memory_ratio", "memory / dense")):
        for k, m in enumerate(models):
            xs, ys = [], []
            for j, n in enumerate(names):
                r = next((r for r in rows if r["model"] == m and r["constraint"] == n), None)
                if r:
                    xs.append(j + width * (k - (len(models) - 1) / 2))
                    ys.append(r[key])
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=m, color=f"C{k}")
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, ls="--", c="gray", lw=1)
        if key == "ratio":
            ax.axhline(1.10, ls=":", c="C3", lw=1, label="target 1.10")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("constraint overhead per training step (median over interleaved repeats)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """Existing rows of `path` with those of the re-measured constraints replaced (order kept)."""
    import json

    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {r["constraint"] for r in rows}
    keep = [r for r in old if r["constraint"] not in new]
    return sorted(keep + rows, key=lambda r: tuple(str(r[k]) for k in ('model', 'batch')) + (r["constraint"],))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="DiT-Pico/2 only, few steps; writes overhead_quick.*")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", default=None, help="comma-separated constraints to (re)measure; their rows replace "
                                                 "those in the existing results, the others are kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in constraint_names() if n != "scratch"]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            sys.exit(f"--only: unknown constraint(s) {unknown}; registered: {', '.join(names)}")
        names = args.only.split(",")
    if args.quick:
        grid = [("DiT-Pico/2", 32, 1, 2, 3)]
    else:
        grid = [("DiT-Nano/2", 128, 2, 5, 5), ("DiT-B/2", 8, 1, 2, 3)]
    rows = []
    for model_name, batch, warmup, steps, repeats in grid:
        for n in names:
            r = measure(model_name, batch, n, warmup, steps, repeats)
            rows.append(r)
            print(f"{model_name:<11} batch {batch:<4} {n:<9} step {r['constraint_ms']:8.2f} ms vs dense {r['dense_ms']:8.2f} ms"
                  f"  ratio {r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  memory ratio {r['memory_ratio']:.3f}",
                  flush=True)
    stem = "overhead_quick" if args.quick else "overhead"
    rows = merged(Path(args.out) / f"{stem}.json", rows) if args.only else rows
    out = Path(args.out)
    write_json(out / f"{stem}.json", {"torch": torch.__version__, "threads": args.threads, "python": sys.version.split()[0],
                                      "rows": rows})
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .png")


if __name__ == "__main__":
    main()
