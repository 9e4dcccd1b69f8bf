"""KIND: decomposition for deployment and learngene transfer under a domain shift.

1. Pretrains a DiT-Nano/2 ancestor on the embedded digits under `kind`
   (recipes/dit_digits_pretrain_kind.yaml: learngene components + per-class
   tailors behind a hard class gate).
2. Decomposes it to classes {0, 3, 7} (`lgframe decompose --classes 0,3,7`)
   and to the learngene alone: parameter counts against the full model, and
   the digits-classifier accuracy and digits FID of samples of those classes
   from the full and the decomposed model (same noise, same guidance).
3. Shifted domain (the generated shapes, a new label set), the three runs KIND
   compares, same steps and seed (recipes/dit_shapes_transfer_kind.yaml):
   learngene-only transfer with fresh tailors and class embedding, full-model
   transfer (the whole ancestor checkpoint, tailors included), and scratch.
   Reports the validation loss curves.

    python benchmarks/kind_transfer.py           # ~10 min on 2 CPU cores
    python benchmarks/kind_transfer.py --quick   # ~1 min (run by the tests)

Writes benchmarks/results/kind_transfer.json and kind_transfer.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lgframe.data.datamodule import ImageDataModule
from lgframe.formats.files import write_json
from lgframe.strategies.kind import decompose
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, plot_curves
from lgframe.training.tasks import make_task

RESULTS = Path(__file__).resolve().parent / "results"
KEEP = [0, 3, 7]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--ancestor-steps", type=int, default=None, help="default: the recipe's (1500)")
    ap.add_argument("--steps", type=int, default=None, help="shapes runs (default: the recipe's, 400)")
    ap.add_argument("--samples", type=int, default=None, help="samples per kept class (default 100)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    anc_steps = args.ancestor_steps or (40 if q else 1500)
    steps = args.steps or (20 if q else 400)
    per_class = args.samples or (10 if q else 100)
    size = ["model.name=DiT-Pico/2"] if q else []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"out_dir={tmp}", "trainer.progress=false", *size]
        anc = fit(load_recipe("dit_digits_pretrain_kind", common + [f"trainer.max_steps={anc_steps}",
                                                                    f"trainer.val_every={max(1, anc_steps // 5)}"]))
        model = anc.task.model.eval()
        parts = {"full": model, "classes 0,3,7": decompose(model, KEEP), "learngene only": decompose(model, [])}
        params = {k: n_params(m) for k, m in parts.items()}

        labels = torch.tensor(KEEP).repeat_interleave(per_class)
        real_dm = ImageDataModule("digits", classes=KEEP)
        real_dm.setup("fit")
        real = real_dm.train_set.tensors[0]
        generation = {}
        for name in ("full", "classes 0,3,7"):
            task = make_task(anc.task.recipe, parts[name])
            fake = task.sample(labels, steps=10 if q else 50, seed=0)
            generation[name] = {"class_accuracy": class_accuracy(fake, labels), "fid_digits": digits_fid(real, fake)}

        shift = ["data.name=shapes", f"trainer.max_steps={steps}", f"trainer.val_every={max(1, steps // 8)}", "seed=0"]
        ckpt = anc.checkpoint
        runs = {
            "learngene only (fresh tailors)": fit(load_recipe("dit_shapes_transfer_kind", common + shift + [
                "name=lg_only", f"init.source={anc.learngene}"]), extract_learngene=False),
            "full-model transfer": fit(load_recipe("dit_shapes_transfer_kind", common + shift + [
                "name=full", f"init.source={ckpt}", "constraint={name: kind, freeze_learngene: false}"]),
                extract_learngene=False),
            "scratch": fit(load_recipe("dit_shapes_transfer_kind", common + shift + [
                "name=scratch", "constraint=scratch"]), extract_learngene=False),
        }
        out = Path(args.out)
        stem = "kind_transfer_quick" if q else "kind_transfer"
        plot_curves({k: r.curve for k, r in runs.items()}, out / f"{stem}.png", "validation loss (shapes)",
                    f"KIND transfer digits -> shapes, {steps} steps")
        result = {
            "quick": q, "ancestor_steps": anc_steps, "steps": steps, "samples_per_class": per_class,
            "ancestor": {"final_val_loss": anc.final_loss, "options": dict(anc.task.recipe["constraint"])},
            "parameters": params | {"ratio classes 0,3,7": params["classes 0,3,7"] / params["full"],
                                    "ratio learngene only": params["learngene only"] / params["full"]},
            "generation_classes_0_3_7": generation,
            "shift": {k: {"initial": r.initial_loss, "final": r.final_loss, "curve": r.curve} for k, r in runs.items()},
            "wall_seconds": round(time.time() - t0, 1),
        }
        write_json(out / f"{stem}.json", result)
    print(f"parameters: {params}")
    for k, v in generation.items():
        print(f"{k:<16} samples of 0,3,7: class accuracy {v['class_accuracy']:.3f}  FID {v['fid_digits']:.1f}")
    for k, r in result["shift"].items():
        print(f"shapes {k:<32} val loss {r['initial']:.4f} -> {r['final']:.4f}")


if __name__ == "__main__":
    main()
