"""Statistics of a benchmark cell: means with 95% intervals over seeds, ratios of two
methods with their intervals, and a verdict that calls a win only where the interval
excludes 1.

Seeds are shared by every method of a cell (the same data order, noise and init
seed), so a ratio is taken per seed and its interval is a t-interval on the log of
the per-seed ratios (paired; with 3-5 seeds a bootstrap of the means has too few
distinct resamples to be trusted). An interval is (mean, low, high).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as sps

Interval = tuple[float, float, float]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of `values` and its t-interval (a single value: the interval is that point)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("t_interval of no values")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = sps.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def ratio_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Geometric-mean ratio a/b over paired seeds and its interval (all values > 0)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"ratio_interval needs paired values, got {len(a)} and {len(b)}")
    if any(x <= 0 for x in (*a, *b)):
        raise ValueError("ratio_interval needs positive values (steps, losses, areas)")
    logs = [math.log(x / y) for x, y in zip(a, b)]
    m, lo, hi = t_interval(logs, confidence)
    return math.exp(m), math.exp(lo), math.exp(hi)


def verdict(interval: Interval, lower_is_better: bool = True) -> str:
    """'win' / 'loss' where the ratio's interval lies wholly on one side of 1, else 'tie'."""
    _, lo, hi = interval
    if hi < 1:
        return "win" if lower_is_better else "loss"
    if lo > 1:
        return "loss" if lower_is_better else "win"
    return "tie"


def area_under_curve(curve: Sequence[tuple[int, float]]) -> float:
    """Trapezoidal area under a validation curve [(step, value)], divided by its span of
    steps: the mean value over training (lower is better for a loss)."""
    if len(curve) < 2:
        raise ValueError("area_under_curve needs at least two points")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:]))
    return area / (curve[-1][0] - curve[0][0])


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float, higher: bool = False) -> int | None:
    """First step whose value is at or below `target` (at or above it with `higher`,
    e.g. accuracy); None: never."""
    for step, v in curve:
        if (v >= target) if higher else (v <= target):
            return step
    return None


SAMPLE_METRICS = ("fid_g1", "fid_best", "class_acc_g1", "class_acc_best")


def summarize(rows: dict[str, list[dict]], ancestor_final: dict[str, float], floor: float = 0.0,
              metrics: Sequence[str] = SAMPLE_METRICS, ratio_metrics: Sequence[str] = ("fid_best",)) -> dict:
    """One benchmark cell. `rows[method]` holds one dict per seed (the same seeds, in the
    same order, for every method; "scratch" is required, "select" optional) with its
    validation "curve" [(step, value)], lower is better (a loss, or an error 1 - accuracy),
    and any of `metrics` (e.g. FID of samples).

    Per method: per-seed step 0, final, area under the curve and steps to reach scratch's,
    select's and the ancestor's (`ancestor_final[method]`) final; their means with 95%
    t-intervals; and the paired ratios to select and to scratch of the AUC, the final value
    and each of `ratio_metrics` present, with intervals and a verdict (win / tie / loss;
    "n/a (1 seed)" without an interval). Ratios take max(value, `floor`): an error of 0 on
    N validation images is "under one image" (floor 0.5 / N), not a ratio of 0 or infinity."""
    scratch, select = rows["scratch"], rows.get("select")
    out = {}
    for method, rs in rows.items():
        for i, r in enumerate(rs):  # seeds in the same order in every method
            c = r["curve"]
            r["step0"], r["final"], r["auc"] = c[0][1], c[-1][1], area_under_curve(c)
            r["steps_to_scratch_final"] = steps_to_reach(c, scratch[i]["curve"][-1][1])
            if select:
                r["steps_to_select_final"] = steps_to_reach(c, select[i]["curve"][-1][1])
            if method in ancestor_final:
                r["steps_to_ancestor_final"] = steps_to_reach(c, ancestor_final[method])
    for method, rs in rows.items():
        e: dict = {"seeds": [r["seed"] for r in rs], "runs": rs}
        for k in ("step0", "final", "auc", *metrics):
            if k in rs[0]:
                e[k] = t_interval([r[k] for r in rs])
        for k in ("steps_to_scratch_final", "steps_to_select_final", "steps_to_ancestor_final"):
            if k in rs[0]:
                vals = [r[k] for r in rs]
                e[k] = t_interval(vals) if None not in vals else None  # None: some seed never got there
        if "best_guidance" in rs[0]:
            e["best_guidance"] = [r["best_guidance"] for r in rs]
        for ref_name, ref in (("select", select), ("scratch", scratch)):
            if ref is None or method == ref_name:
                continue
            for k in ("auc", "final", *[m for m in ratio_metrics if m in rs[0]]):
                iv = ratio_interval([max(r[k], floor) for r in rs], [max(r[k], floor) for r in ref])
                e[f"{k}_ratio_to_{ref_name}"] = iv
                # one seed has no interval: no verdict
                e[f"{k}_verdict_vs_{ref_name}"] = verdict(iv) if len(rs) > 1 else "n/a (1 seed)"
        if method in ancestor_final:
            e["ancestor_final"] = ancestor_final[method]
        out[method] = e
    return out
