"""GTL genetic transfer of learngenes: evolved learngenes against the first generation's,
a random fragment, scratch and one network trained on all training classes, on held-out domains.

For each seed, `lgframe.apps.evolve.run_evolve`: a population of ViT-Pico/2 (depth 5)
networks evolves a one-block learngene (19.8% of the parameters) on 5-way 10-shot tasks
of the digits (tournaments, Gaussian + structural mutation, Lamarckian inheritance);
then 5-way 5-shot tasks of the held-out domains (generated shapes, Animal-Shape
silhouettes at 8x8; never used in evolution) train descendants of each learngene, every
method with the same fresh rest and steps in a task. Means over seeds with 95%
t-intervals, the paired difference evolved - each method (per seed, t-interval), and the
same pooled over every held-out task of every seed.

    python benchmarks/gtl.py --threads 1              # ~7 min on one core (420 s on 2026-12-03)
    python benchmarks/gtl.py --quick --out /tmp/x     # ~1 min (run by the tests)

Writes benchmarks/results/gtl.json and gtl.png (gtl_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lgframe.apps.evolve import EVAL_METHODS, EvolveCfg, run_evolve
from lgframe.apps.report import save_figure, source_commit
from lgframe.apps.stats import t_interval
from lgframe.formats.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
CODE = ("lgframe/apps", "benchmarks/gtl.py")  # the code a result depends on


def interval(values) -> dict:
    m, lo, hi = t_interval(values)
    return {"mean": m, "low": lo, "high": hi, "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--population", type=int, default=None)
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--inner-steps", type=int, default=None)
    ap.add_argument("--heldout-tasks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    seeds = args.seeds or ([0, 1] if q else [0, 1, 2])
    base = dict(population=args.population or (3 if q else 8), generations=args.generations or (2 if q else 5),
                tournament=2 if q else 3, inner_steps=args.inner_steps or (3 if q else 20),
                heldout_tasks=args.heldout_tasks or (2 if q else 10))
    if q:
        base.update(depth=2, ways=2, shots=2, queries=2, heldout_shots=2, heldout=["shapes"])
    out = Path(args.out)
    name = "gtl_quick" if q else "gtl"
    t0 = time.time()
    code = source_commit(ROOT, CODE)  # the code this run loads (a commit made while it runs is not in it)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            c = EvolveCfg(**base, seed=s, out=str(Path(tmp) / f"seed{s}"))
            print(f"seed {s}: {asdict(c)}", flush=True)
            runs[s] = run_evolve(c, progress=lambda m, s=s: print(f"  seed {s} {m}", flush=True))
    cfg = runs[seeds[0]]["config"]
    summary = {}
    for dom in cfg["heldout"]:
        cell = {}
        for m in EVAL_METHODS:
            per_seed = [runs[s]["heldout"][dom][m]["mean"] for s in seeds]
            diffs = [runs[s]["heldout"][dom]["evolved"]["mean"] - x for s, x in zip(seeds, per_seed)]
            pooled = [a - b for s in seeds for a, b in zip(runs[s]["heldout"][dom]["evolved"]["accuracies"],
                                                          runs[s]["heldout"][dom][m]["accuracies"])]
            cell[m] = {**interval(per_seed), "per_seed": per_seed, "evolved_minus_this": interval(diffs),
                       "evolved_minus_this_pooled_tasks": interval(pooled)}
        summary[dom] = cell
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": code, "torch": torch.__version__, "threads": args.threads, "quick": q, "seeds": seeds,
            "config": {k: v for k, v in cfg.items() if k not in ("seed", "out")},
            "learngene_fraction": {m: runs[seeds[0]]["learngene"][m]["fraction"] for m in runs[seeds[0]]["learngene"]},
            "evolved_learngene_blocks": {str(s): runs[s]["learngene"]["evolved"]["positions"] for s in seeds},
            "single_network_steps": runs[seeds[0]]["single_network_steps"],
            "note": "a small population and few generations, tasks and seeds, sized to the shared 2-core machine",
            "seconds": time.time() - t0,
        },
        "seeds": {str(s): {"history": runs[s]["history"], "heldout": runs[s]["heldout"], "learngene": runs[s]["learngene"]}
                  for s in seeds},
        "summary": summary,
    }
    write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and .png ({time.time() - t0:.0f} s)")
    for dom, cell in summary.items():
        print(dom + ": " + ", ".join(f"{m} {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for m, v in cell.items()))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(result["summary"])
    fig, axes = plt.subplots(1, 1 + len(doms), figsize=(4.2 * (1 + len(doms)), 3.6), squeeze=False)
    ax = axes[0, 0]
    for i, (s, run) in enumerate(result["seeds"].items()):
        gens = [h["generation"] + 1 for h in run["history"]]
        ax.plot(gens, [h["best"] for h in run["history"]], color=f"C{i}", label=f"seed {s} best")
        ax.plot(gens, [h["mean"] for h in run["history"]], color=f"C{i}", ls="--", label=f"seed {s} mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (training-task query accuracy)")
    ax.legend(fontsize=7)
    for j, dom in enumerate(doms):
        ax = axes[0, 1 + j]
        cell = result["summary"][dom]
        means = [cell[m]["mean"] for m in EVAL_METHODS]
        errs = [[means[k] - cell[m]["low"] for k, m in enumerate(EVAL_METHODS)],
                [cell[m]["high"] - means[k] for k, m in enumerate(EVAL_METHODS)]]
        ax.bar(EVAL_METHODS, means, yerr=errs, capsize=3,
               color=["tab:red" if m == "evolved" else "tab:gray" for m in EVAL_METHODS])
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out {dom} (95% CI over {len(result['seeds'])} seeds)", fontsize=9)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
