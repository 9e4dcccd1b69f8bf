"""DisTok and the creative token against their baselines, on held-out distributions and pairs.

One frozen base DiT (pre-trained once with recipes/dit_digits_pretrain.yaml at
DiT-Pico/2, or `--base`). Per seed (3 by default; a seed sets DisTok's and the
creative token's init and training draws, and the sampling noise):
  - DisTok trained twice, rendering by a differentiable 4-step DDIM chain (`distok`)
    and by one re-noised x0 prediction (`distok_x0`): held-out alignment KL per
    second of training says which render is better per compute;
  - the creative token trained over every class pair but the held-out ones.
Evaluated at guidance 3 (the base recipe's sampler: DDPM, 50 steps), all methods at
the same noise per target:
  - held-out distributions (2-class at 0.5/0.5 and 0.3/0.7, 3-class at 0.4/0.3/0.3,
    over class pairs whose support DisTok never trained on): distok, distok_x0,
    mixture (sum_k p_k E_k), guidance_mix (eps_u + g sum_k p_k (eps_k - eps_u));
  - held-out pairs at 50/50: cretok (E_A + E_B + t_c), sum (E_A + E_B), mean.
Metrics per target: KL(target || classifier's mean prediction), per-sample entropy,
mass on the target's classes, FID against the real training images of the classes
involved (digits-classifier features), diversity (mean pairwise pixel distance).
Per method the mean over targets per seed, then mean and 95% t-interval over
seeds, and paired ratios (distok / mixture, distok / guidance_mix, cretok / sum)
with a verdict where the interval excludes 1.

  python benchmarks/creative.py                 # full: about 30 minutes on one core
  python benchmarks/creative.py --base runs/x/checkpoints/last.ckpt
  python benchmarks/creative.py --quick --out /tmp/c   # seconds: a random base, a pipeline check only
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lgframe.apps import creative as cr  # noqa: E402
from lgframe.apps.report import source_commit
from lgframe.apps.stats import ratio_interval, t_interval, verdict  # noqa: E402
from lgframe.formats.files import write_json  # noqa: E402
from lgframe.models.registry import create_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
CODE = ("lgframe/apps/creative.py", "lgframe/models/dit.py", "benchmarks/creative.py")  # the code a result depends on
METRICS = ("kl", "entropy", "mass", "fid", "diversity")
DIST_METHODS = ("distok", "distok_x0", "mixture", "guidance_mix")


def random_base() -> cr.Base:
    torch.manual_seed(0)
    model = create_model("DiT-Pico/2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.y_embedder.embedding_table.weight.normal_(0, 0.3, generator=g)
    return cr.load_base(model=model, recipe={"data": {"name": "digits"}})


def pretrained_base(steps: int, where: Path) -> tuple[cr.Base, dict]:
    import lgframe  # noqa: PLC0415  (the public API: a benchmark is a client)

    t = time.perf_counter()
    res = lgframe.fit("dit_digits_pretrain", {"model.name": "DiT-Pico/2", "trainer.max_steps": steps,
                                              "out_dir": str(where), "name": "base", "trainer.val_every": 250},
                      extract_learngene=False)
    return cr.load_base(res.checkpoint), {"recipe": "dit_digits_pretrain", "model": "DiT-Pico/2", "steps": steps,
                                          "seconds": round(time.perf_counter() - t, 1), "val_curve": res.curve}


def class_accuracy(base: cr.Base, n: int, guidance: float) -> float:
    from lgframe.training.metrics import class_accuracy as acc

    y = torch.arange(n) % base.num_classes
    return acc(base.task.sample(y, guidance=guidance, seed=9), y, base.data)


def evaluate(base, targets, methods, n, seed, c, distoks, cretok, steps):
    """{method: [metrics per target]} and {target index: {method: images}}."""
    out, images = {m: [] for m in methods}, {}
    for i, p in enumerate(targets):
        classes = torch.nonzero(p > 0).flatten().tolist()
        real = cr.real_images(base, classes)
        images[i] = {}
        for m in methods:
            kind = "distok" if m.startswith("distok") else m
            x = cr.generate(base, kind, p, n, seed * 1000 + i, c.guidance, steps, distok=distoks.get(m), cretok=cretok)
            r = cr.metrics(base, x, p, real) | {"target": cr.format_dist(p)}
            out[m].append(r)
            images[i][m] = x[:8]
    return out, images


def per_seed_means(rows: dict) -> dict:
    return {m: {k: sum(r[k] for r in rs) / len(rs) for k in METRICS} for m, rs in rows.items()}


def summarize(seeds: list[dict], group: str, ratios: list[tuple[str, str]]) -> dict:
    methods = list(seeds[0][group])
    out = {"methods": {}}
    for m in methods:
        out["methods"][m] = {k: t_interval([s[group][m][k] for s in seeds]) for k in METRICS}
    out["ratios"] = {}
    for a, b in ratios:
        for k in ("kl", "fid"):
            iv = ratio_interval([s[group][a][k] for s in seeds], [s[group][b][k] for s in seeds])
            out["ratios"][f"{k}: {a} / {b}"] = {"ratio": iv, "verdict": verdict(iv) if len(seeds) > 1 else "n/a (1 seed)"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds: a random base, tiny budgets (a pipeline check)")
    ap.add_argument("--base", default=None, help="a pre-trained DiT checkpoint (default: pre-train DiT-Pico/2)")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=100, help="samples per target and method")
    ap.add_argument("--out", default=None, help="folder for creative.json and the PNGs (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.quick:
        c = cr.load_cfg(None, ["steps=4", "warmup=2", "eval_every=2", "batch=4", "prior_batch=2", "cretok_steps=2",
                               "cretok_batch=4"])
        seeds, n, steps, full_targets = args.seeds[:1], 4, 3, False
        base, base_info = random_base(), {"random": True}
    else:
        c = cr.load_cfg("creative_digits")
        seeds, n, steps, full_targets = args.seeds, args.n, None, True
        if args.base:
            base, base_info = cr.load_base(args.base), {"file": args.base}
        else:
            base, base_info = pretrained_base(args.base_steps, Path(tempfile.mkdtemp(prefix="creative_base_")))
        base_info["class_accuracy_g3"] = class_accuracy(base, 200, c.guidance)
    K = base.num_classes
    targets = cr.heldout_targets(c.heldout_pairs, K, full=full_targets)
    pairs = cr.heldout_targets(c.heldout_pairs, K, full=False)  # the 50/50 held-out pairs
    if args.quick:
        targets, pairs = targets[:2], pairs[:2]
    per_seed, training = [], []
    for s in seeds:
        t0 = time.perf_counter()
        dt = cr.train_distok(base, c, seed=s)
        c_x0 = cr.load_cfg(asdict(c), ["render=x0"])
        dx = cr.train_distok(base, c_x0, seed=s)
        ct = cr.train_cretok(base, c, seed=s)
        training.append({"seed": s, "distok_curve": dt.curve, "distok_seconds": dt.seconds, "distok_pool": dt.pool_size,
                         "distok_accepted": dt.accepted, "distok_x0_curve": dx.curve, "distok_x0_seconds": dx.seconds,
                         "cretok_curve": ct.curve, "cretok_seconds": ct.seconds})
        distoks = {"distok": dt.distok, "distok_x0": dx.distok}
        d_rows, d_imgs = evaluate(base, targets, DIST_METHODS, n, s, c, distoks, None, steps)
        p_rows, p_imgs = evaluate(base, pairs, ("cretok", "sum", "mean", "distok"), n, s, c, distoks, ct.cretok, steps)
        per_seed.append({"seed": s, "distributions": per_seed_means(d_rows), "pairs": per_seed_means(p_rows),
                         "per_target": {"distributions": d_rows, "pairs": p_rows}})
        if s == seeds[0]:
            cr.save_grid([(targets[i], d_imgs[i]) for i in range(min(8, len(targets)))],
                         out / "creative_distributions.png",
                         f"held-out distributions, seed {s}, guidance {c.guidance}: samples per method at the same noise")
            cr.save_grid([(pairs[i], p_imgs[i]) for i in range(len(pairs))], out / "creative_pairs.png",
                         f"held-out pairs, seed {s}, guidance {c.guidance}: creative token vs plain sum, same noise")
        print(f"seed {s}: {time.perf_counter() - t0:.0f} s; held-out KL "
              + ", ".join(f"{m} {v['kl']:.3f}" for m, v in per_seed[-1]["distributions"].items())
              + "; pairs " + ", ".join(f"{m} {v['kl']:.3f}" for m, v in per_seed[-1]["pairs"].items()), flush=True)
    result = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "commit": source_commit(ROOT, CODE, missing=None, timeout=10),
                 "command": "python benchmarks/creative.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "threads": args.threads, "quick": args.quick, "seeds": seeds, "samples_per_target": n,
                 "guidance": c.guidance, "sampler": "base recipe's (ddpm, 50 steps)" if steps is None else f"{steps} steps",
                 "sizing": "full mode sized to about 30 minutes on one core (pre-training the base included)",
                 "wall_seconds": None, "cfg": asdict(c), "base": base_info,
                 "targets": [cr.format_dist(p) for p in targets], "pairs": [cr.format_dist(p) for p in pairs],
                 "note": "quick mode: a random base, numbers are meaningless" if args.quick else
                         "metrics: mean over targets per seed, then mean and 95% t-interval over seeds; ratios paired by seed"},
        "distributions": summarize(per_seed, "distributions", [("distok", "mixture"), ("distok", "guidance_mix"),
                                                                ("distok_x0", "distok")]),
        "pairs": summarize(per_seed, "pairs", [("cretok", "sum"), ("cretok", "mean")]),
        "render_per_compute": {
            "distok (ddim chain) seconds": t_interval([t["distok_seconds"] for t in training]),
            "distok_x0 seconds": t_interval([t["distok_x0_seconds"] for t in training]),
            "distok held-out alignment KL at end": t_interval([t["distok_curve"][-1][2] for t in training]),
            "distok_x0 held-out alignment KL at end": t_interval([t["distok_x0_curve"][-1][2] for t in training]),
        },
        "training": training,
        "per_seed": per_seed,
    }
    result["meta"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / ("creative_quick.json" if args.quick and args.out is None else "creative.json"), result)
    print(f"wrote {out / 'creative.json'} in {result['meta']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
