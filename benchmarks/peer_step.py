"""lgframe's dense DiT training step against diffusers' `DiTTransformer2DModel`, the
reference implementation a user would otherwise pick (#25 item 8).

Both models have the same depth, width, heads, patch, image size and classes, and the
same weights (`lgframe.models.convert.to_diffusers`, tested to match outputs within
1e-4), the same batch, the same AdamW and the same precision (float32 here). One
training step (forward, MSE to a fixed noise target, backward, AdamW step) of each is
timed interleaved in one process (lgframe, diffusers, lgframe, ...), so machine noise
hits both alike; the ratio is lgframe / diffusers per repeat, reported as the median
with its range. Memory is counted as in overhead.py: parameters + gradients + AdamW
state + the bytes autograd saves for the backward (each storage once).

    python benchmarks/peer_step.py --threads 1            # tiny and DiT-B sizes, ~5 min on one core
    python benchmarks/peer_step.py --threads 1 --quick    # DiT-Pico/2, seconds (the test's)

Writes benchmarks/results/peer_step.json (--quick: peer_step_quick.json). Target: lgframe <= 1.0x.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.apps.report import source_commit
from lgframe.formats.files import write_json
from lgframe.models.convert import to_diffusers
from lgframe.models.registry import create_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import batch_of, memory_bytes, timed  # noqa: E402  (the same step, batch and memory count)

RESULTS = HERE / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
MODEL_KW = {"image_size": 8, "in_channels": 1, "num_classes": 10, "freq_shift": 1}  # diffusers hard-wires shift 1


class Peer(nn.Module):
    """diffusers' DiT behind lgframe's call signature, model(x, t, y) -> eps."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x, t, y):
        return self.m(x, timestep=t, class_labels=y).sample


def pair(model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    ours = create_model(model_name, **MODEL_KW)
    for block in ours.blocks:  # adaLN-Zero starts every block as the identity: give the step real work
        nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    nn.init.normal_(ours.final_layer.linear.weight, std=0.02)
    theirs = Peer(to_diffusers(ours))
    for mod in theirs.modules():  # diffusers drops labels inside the model in train mode; lgframe's task does it
        if type(mod).__name__ == "LabelEmbedding":  # outside the model, so neither step here drops labels
            mod.dropout_prob = 0.0
    ours.train(), theirs.train()
    return ours, theirs


def make_step(model, opt, batch: int):
    x, t, y, noise = batch_of(batch)
    y = y % 10  # diffusers' label embedding has num_classes + 1 rows too; keep labels in the real classes

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, y), noise).backward()
        opt.step()

    return step


def measure(model_name: str, batch: int, warmup: int, steps: int, repeats: int) -> dict:
    ours, theirs = pair(model_name)
    x, t, y, _ = batch_of(4)
    with torch.no_grad():
        gap = (ours(x, t, y % 10) - theirs(x, t, y % 10)).abs().max().item()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)]
    a, b = make_step(ours, opts[0], batch), make_step(theirs, opts[1], batch)
    for _ in range(warmup):
        a()
        b()
    a_ms, b_ms = [], []
    for _ in range(repeats):
        a_ms.append(timed(a, steps))
        b_ms.append(timed(b, steps))
    ratios = [p / q for p, q in zip(a_ms, b_ms)]
    mem_a, mem_b = memory_bytes(ours, opts[0], batch), memory_bytes(theirs, opts[1], batch)
    c = ours.config
    return {
        "model": model_name, "depth": c.depth, "width": c.width, "heads": c.heads, "patch": c.patch_size,
        "batch": batch, "output_gap": gap, "lgframe_ms": statistics.median(a_ms), "diffusers_ms": statistics.median(b_ms),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "repeats": repeats,
        "memory_lgframe": mem_a, "memory_diffusers": mem_b, "memory_ratio": mem_a["total"] / mem_b["total"],
        "params_lgframe": sum(p.numel() for p in ours.parameters()),
        "params_diffusers": sum(p.numel() for p in theirs.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny size only; writes peer_step_quick.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = [("DiT-Pico/2", 16, 1, 2, 3)] if args.quick else [("DiT-Nano/2", 64, 2, 5, 9), ("DiT-B/2", 8, 1, 2, 7)]
    rows = []
    for model_name, batch, warmup, steps, repeats in grid:
        r = measure(model_name, batch, warmup, steps, repeats)
        rows.append(r)
        print(f"{model_name:<10} batch {batch:<3} lgframe {r['lgframe_ms']:8.2f} ms  diffusers {r['diffusers_ms']:8.2f} ms  "
              f"ratio {r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})  memory ratio {r['memory_ratio']:.3f}  "
              f"output gap {r['output_gap']:.1e}", flush=True)
    commit = source_commit(ROOT)
    import diffusers

    write_json(Path(args.out) / ("peer_step_quick.json" if args.quick else "peer_step.json"), {
        "date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "threads": args.threads, "device": "cpu", "precision": "32-true",
        "rows": rows})


if __name__ == "__main__":
    main()
