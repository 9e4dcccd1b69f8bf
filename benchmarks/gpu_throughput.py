"""Training throughput and peak memory on one CUDA GPU (#25 item 9): DiT-B/2 and DiT-XL/2 on
32x32x4 latents (256x256 images through the SD VAE), bf16 autocast, fused AdamW, for

- dense, svd and kronecker (lgframe's DiT with the constraint attached, as in pre-training),
- each with and without `torch.compile` of the blocks and with and without activation
  checkpointing (`lgframe.training.speed`, the switches `trainer.compile` and
  `trainer.activation_checkpointing` turn on),
- and diffusers' `DiTTransformer2DModel` of the same size beside them (dense only, its own
  `enable_gradient_checkpointing` for the checkpointed rows; same weights as the dense lgframe DiT).

One training step is forward + MSE to a noise target + backward + AdamW step on a fixed
batch; steps/s is measured over `--steps` steps after `--warmup` (compile happens in the
warm-up), synchronized; peak memory is `torch.cuda.max_memory_allocated` over the timed steps.

    python benchmarks/gpu_throughput.py                       # all rows, ~10 min on an H100-class GPU
    python benchmarks/gpu_throughput.py --models DiT-B/2 --constraints scratch,svd --no-compile

Without CUDA it prints one line saying so and exits 0. Output: one line per row on stdout and
benchmarks/results/gpu_throughput.json, in the format benchmarks/README.md documents
("GPU throughput"): {"date", "commit", "device", "torch", "rows": [{"model", "impl", "constraint",
"compile", "checkpointing", "batch", "steps_per_s", "images_per_s", "peak_gib", "error"}]}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LATENT = {"image_size": 32, "in_channels": 4, "num_classes": 1000, "freq_shift": 1}


def build(model_name: str, impl: str, constraint: str, compile_: bool, checkpointing: bool, device: str = "cuda") -> nn.Module:
    from lgframe.core.registry import get_constraint
    from lgframe.models.convert import to_diffusers
    from lgframe.models.registry import create_model
    from lgframe.training.speed import compile_blocks, set_activation_checkpointing

    torch.manual_seed(0)
    model = create_model(model_name, **LATENT)
    if impl == "diffusers":
        inner = to_diffusers(model)

        class Peer(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = inner

            def forward(self, x, t, y):
                return self.m(x, timestep=t, class_labels=y).sample

        model = Peer()
        if checkpointing:
            inner.enable_gradient_checkpointing()
        if compile_:
            for b in inner.transformer_blocks:
                b.compile()
        return model.to(device).train()
    get_constraint(constraint).attach(model, init="random")
    if checkpointing:
        set_activation_checkpointing(model)
    if compile_:
        compile_blocks(model)
    return model.to(device).train()


def run_row(model_name, impl, constraint, compile_, checkpointing, batch, warmup, steps, device: str = "cuda") -> dict:
    """One row; `device="cpu"` runs the same code on the CPU (tests/test_benchmarks_scripts.py), without memory figures."""
    cuda = device == "cuda"
    row = {"model": model_name, "impl": impl, "constraint": constraint, "compile": compile_,
           "checkpointing": checkpointing, "batch": batch}
    try:
        model = build(model_name, impl, constraint, compile_, checkpointing, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda or None)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(batch, 4, 32, 32, device=device, generator=g)
        noise = torch.randn(batch, 4, 32, 32, device=device, generator=g)
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        y = torch.randint(0, 1000, (batch,), device=device, generator=g)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.mse_loss(model(x, t, y).float(), noise)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row |= {"steps_per_s": steps / dt, "images_per_s": steps * batch / dt,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "error": None}
    except Exception as e:  # an out-of-memory or a compiler failure is a result too
        row |= {"steps_per_s": None, "images_per_s": None, "peak_gib": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="DiT-B/2,DiT-XL/2")
    ap.add_argument("--constraints", default="scratch,svd,kronecker", help="lgframe rows (scratch = dense)")
    ap.add_argument("--batch", type=int, default=32, help="per step (DiT's global 256 over 8 GPUs)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "gpu_throughput.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    from lgframe.apps.report import source_commit
    from lgframe.formats.files import write_json

    rows = []
    for model_name in args.models.split(","):
        impls = [("lgframe", c) for c in args.constraints.split(",")] + ([] if args.no_diffusers else [("diffusers", "scratch")])
        for impl, constraint in impls:
            for compile_ in ([False] if args.no_compile else [False, True]):
                for checkpointing in (False, True):
                    r = run_row(model_name, impl, constraint, compile_, checkpointing, args.batch, args.warmup, args.steps)
                    rows.append(r)
                    what = f"{model_name:<9} {impl:<9} {constraint:<9} compile={int(compile_)} ckpt={int(checkpointing)}"
                    if r["error"]:
                        print(f"{what}  failed: {r['error']}", flush=True)
                    else:
                        print(f"{what}  {r['steps_per_s']:7.2f} steps/s  {r['images_per_s']:8.1f} img/s  "
                              f"peak {r['peak_gib']:6.2f} GiB", flush=True)
    commit = source_commit(HERE.parent)
    write_json(Path(args.out), {"date": datetime.date.today().isoformat(), "commit": commit,
                                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
