"""The benchmark's statistics on toy cases whose answer is known: a faster init is a win
with an interval excluding 1, identical inits are a tie, noise alone is not a win."""

import math

import pytest
import torch

from lgframe.apps.stats import area_under_curve, ratio_interval, steps_to_reach, t_interval, verdict


def curves(rate: float, seeds, noise: float = 0.01, steps: int = 400, every: int = 10):
    """Loss curves exp(-rate * t) + a floor, with seeded noise (20+ points each)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        out.append([(t, math.exp(-rate * t / 100) + 0.1 + noise * float(torch.randn(1, generator=g)))
                    for t in range(0, steps + 1, every)])
    return out


def cell(fast, slow, target=0.4):
    a = [steps_to_reach(c, target) for c in fast]
    b = [steps_to_reach(c, target) for c in slow]
    return ratio_interval(a, b)


def test_an_init_twice_as_fast_is_a_win_with_the_interval_below_one():
    seeds = [0, 1, 2]
    r = cell(curves(2.0, seeds), curves(1.0, [10 + s for s in seeds]))
    assert r[2] < 1 and abs(r[0] - 0.5) < 0.1, r
    assert verdict(r) == "win"
    auc = ratio_interval([area_under_curve(c) for c in curves(2.0, seeds)],
                         [area_under_curve(c) for c in curves(1.0, [10 + s for s in seeds])])
    assert verdict(auc) == "win"


def test_identical_inits_are_a_tie():
    seeds = [0, 1, 2]
    same = curves(1.0, seeds)
    r = cell(same, same)
    assert r == (1.0, 1.0, 1.0) and verdict(r) == "tie"


def test_noise_alone_is_not_a_win():
    wins = 0
    for k in range(20):  # the same process, different seeds: at most ~5% of intervals exclude 1
        r = cell(curves(1.0, [100 * k + s for s in range(3)], noise=0.05),
                 curves(1.0, [100 * k + 50 + s for s in range(3)], noise=0.05))
        wins += verdict(r) != "tie"
    assert wins <= 3, wins


def test_the_t_interval_and_its_edges():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.303 * 1 / math.sqrt(3), abs=1e-3)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0)
    assert verdict((1.3, 1.1, 1.5)) == "loss" and verdict((1.3, 1.1, 1.5), lower_is_better=False) == "win"
    with pytest.raises(ValueError, match="paired"):
        ratio_interval([1.0], [1.0, 2.0])
    assert area_under_curve([(0, 1.0), (10, 0.0)]) == 0.5
