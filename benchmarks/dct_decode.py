"""dct's descent on a CPU: the matrix decode (torch, one product per axis; what a
descendant on a GPU uses, `lgframe.strategies.dct.matrix_decode`) against scipy.fft's
crop/pad inverse (the CPU's, `scipy_decode`).

The same learngene (a random DiT-B/2, 12 x 768, default `keep`) descends to
benchmarks/descent.py's larger DiT-B size (16 x 1024) with each decode in turn,
interleaved, `--repeats` times; the paired ratio matrix / scipy has a 95%
t-interval on the log-ratio (lgframe.apps.stats.ratio_interval). The outputs are
compared too (largest relative difference of a parameter).

    python benchmarks/dct_decode.py --threads 2 --repeats 5

Writes benchmarks/results/dct_decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lgframe.apps.report import source_commit
from lgframe.apps.stats import ratio_interval
from lgframe.core.registry import get_constraint
from lgframe.formats.files import write_json
from lgframe.models.registry import create_model
from lgframe.strategies.dct import DCT, matrix_decode, scipy_decode

HERE = Path(__file__).resolve().parent
TARGET = {"depth": 16, "width": 1024, "heads": 16}


def descend_once(learngene, decode) -> tuple[float, dict]:
    target = create_model("DiT-B/2", **TARGET)
    original = DCT.decode
    DCT.decode = decode
    try:
        t = time.perf_counter()
        get_constraint("dct").descend(learngene, target)
        seconds = time.perf_counter() - t
    finally:
        DCT.decode = original
    return seconds, target.state_dict()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (scipy's workers follow the cores)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ancestor = create_model("DiT-B/2")
    c = get_constraint("dct")
    c.attach(ancestor)
    learngene = c.learngene(ancestor)
    paths = {"matrix": matrix_decode, "scipy": scipy_decode}
    times: dict[str, list[float]] = {k: [] for k in paths}
    worst = 0.0
    for r in range(args.repeats):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]  # alternate which runs first
        states = {}
        for name in order:
            seconds, states[name] = descend_once(learngene, paths[name])
            times[name].append(seconds)
            print(f"repeat {r}: {name} {seconds:.2f} s", flush=True)
        for key, w in states["scipy"].items():
            diff = ((states["matrix"][key] - w).norm() / w.norm().clamp_min(1e-30)).item()
            worst = max(worst, diff)
        del states
    ratio = ratio_interval(times["matrix"], times["scipy"])
    result = {"date": time.strftime("%Y-%m-%d"), "commit": source_commit(HERE.parent),
              "command": "python benchmarks/dct_decode.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "ancestor": "DiT-B/2 (12 x 768, random)", "target": TARGET, "threads": torch.get_num_threads(),
              "seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
              "ratio_matrix_to_scipy": ratio, "max_relative_difference": worst}
    write_json(Path(args.out) / "dct_decode.json", result)
    print(f"matrix / scipy: {ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]; medians "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["median_seconds"].items())
          + f"; largest relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
