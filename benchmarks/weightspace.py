"""Weight-space learning: mLoRA (with and without the asymmetric mask) against
additive LoRA (with and without it) and full-weight fitting, on digits.

One base field (fitted once on all items) serves every representation. For
each: reconstruction PSNR of the per-item fits; test accuracy of an MLP
classifier on the weight vectors (80/20 split); generation by a DiT over the
weight tokens (20 samples per class, the recipe's tokens: whitened principal
components), rendered and scored with the digits FID and class accuracy
(lgframe.training.metrics, at 8x8) and the RMS distance to the nearest training image.
Two references per representation: the training items themselves (rendered
fits, the ceiling) and a class-conditional diagonal Gaussian over the same
tokens (what knowing only each class's mean and spread gives; a generator that
learned nothing beyond that does not beat it). Writes results/weightspace.json
and a PNG grid: originals, reconstructions, and generated samples per
representation. `--work DIR` keeps each representation's fitted weight dataset
there and reuses it on the next run with the same settings.

    python benchmarks/weightspace.py            # 1000 digits, ~25 min on 1 thread
    python benchmarks/weightspace.py --quick    # ~40 s (run by the tests)
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from lgframe.apps.weightspace import (
    Adapter,
    Base,
    WeightDataset,
    WeightspaceCfg,
    class_gaussian,
    classify,
    field_images,
    fit_base,
    fit_items,
    render_vectors,
    sample_weights,
    score_digits,
    train_generator,
)
from lgframe.formats.files import atomic_path, write_json

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "mlora+mask": dict(repr="mlora", mask=True),
    "mlora": dict(repr="mlora", mask=False),
    "lora+mask": dict(repr="lora", mask=True),
    "lora": dict(repr="lora", mask=False),
    "full": dict(repr="full", mask=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=1000, help="digits (items)")
    ap.add_argument("--steps", type=int, default=300, help="fitting steps per item")
    ap.add_argument("--dit-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="keep and reuse the fitted weight datasets here")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    n, steps, dit_steps, per_class = (64, 40, 40, 2) if args.quick else (args.n, args.steps, args.dit_steps, 20)
    base_cfg = WeightspaceCfg(n=n, steps=steps, dit_steps=dit_steps, base_steps=100 if args.quick else 1000)
    x, y = field_images(base_cfg)
    t0 = time.time()
    base = Base(base_cfg.field, x.shape[1])
    fit_base(base, x, base_cfg.base_steps)
    print(f"base field: {base_cfg.base_steps} steps on {n} digits ({time.time() - t0:.0f} s)", flush=True)
    rows, recon, gen = [], {}, {}
    labels = torch.arange(10 * per_class) % 10
    for name, over in CONFIGS.items():
        c = replace(base_cfg, **over)
        cached = Path(args.work) / f"{name}_{n}_{steps}.safetensors" if args.work else None
        t0 = time.time()
        ds = WeightDataset.load(cached) if cached and cached.is_file() else None
        if ds is not None and ds.cfg == c:
            v, s = ds.weights, ds.psnr
        else:
            v, s = fit_items(Adapter(base, c), x, c.steps, c.lr, c.batch_items, progress=False, pixels=c.pixels)
            ds = WeightDataset(c, base, v, y, s)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                ds.save(cached)
        fit_s = time.time() - t0
        acc = classify(v, y, steps=100 if args.quick else 500)
        task, stats = train_generator(ds, progress=False)
        fake = render_vectors(ds.adapter, sample_weights(ds, task, stats, labels), c.size)
        scores = score_digits(fake, labels, x)
        sel = torch.cat([(y == k).nonzero().flatten()[:per_class] for k in range(10)]).reshape(10, -1).T.flatten()
        real_scores = score_digits(render_vectors(ds.adapter, v[sel], c.size), y[sel], x)
        gauss_scores = score_digits(render_vectors(ds.adapter, class_gaussian(ds, labels), c.size), labels, x)
        recon[name] = render_vectors(ds.adapter, v[:10], c.size)
        gen[name] = fake[:20]
        rows.append({"config": name, **over, "rank": c.rank, "numbers_per_item": v.shape[1],
                     "psnr_mean": s.mean().item(), "psnr_min": s.min().item(), "classification_accuracy": acc,
                     **scores, "tokens": c.tokens, "components": stats.get("components"),
                     "real": real_scores, "class_gaussian": gauss_scores, "fit_seconds": fit_s})
        print(f"{name:<11} PSNR {s.mean():6.2f} dB  accuracy {acc:.3f}  FID {scores['fid_digits']:8.2f}  "
              f"class acc {scores['class_accuracy']:.3f}  NN {scores['nn_distance']:.3f}  ({v.shape[1]} numbers, "
              f"fit {fit_s:.0f} s) | items FID {real_scores['fid_digits']:.1f} acc {real_scores['class_accuracy']:.3f}"
              f" | class Gaussian FID {gauss_scores['fid_digits']:.1f} acc {gauss_scores['class_accuracy']:.3f}",
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "weightspace_quick" if args.quick else "weightspace"
    write_json(out / f"{stem}.json", {
        "torch": torch.__version__, "threads": args.threads, "items": n, "size": base_cfg.size,
        "field": vars(base_cfg.field), "fit_steps": steps, "pixels_per_step": base_cfg.pixels, "lr": base_cfg.lr,
        "mask_fraction": base_cfg.mask_fraction, "dit": base_cfg.dit, "dit_steps": dit_steps,
        "tokens": base_cfg.tokens, "components": base_cfg.components, "token_channels": base_cfg.token_channels,
        "dit_lr": base_cfg.dit_lr, "guidance": base_cfg.guidance,
        "samples": len(labels), "rows": rows,
    })
    grid(x[:10], recon, gen, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")


def grid(real, recon, gen, path: Path) -> None:
    """Rows: originals; then per representation its reconstructions and two rows of samples."""
    from torchvision.utils import save_image

    rows = [real] + [recon[k] for k in recon] + [g for k in gen for g in gen[k].chunk(2)]
    imgs = torch.cat([r[:10] for r in rows])
    with atomic_path(path) as tmp:
        save_image((imgs + 1) / 2, tmp, nrow=10, padding=1, pad_value=0.5, format="png")


if __name__ == "__main__":
    main()
