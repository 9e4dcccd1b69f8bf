"""The proof benchmark (benchmarks/proof.py): its --quick run, and its statistics on
seeded toy cells where the answer is known."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lgframe.apps.stats import area_under_curve, summarize

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import proof  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.parametrize("family", ["dit", pytest.param("vit", marks=pytest.mark.slow)])
def test_quick_run_writes_cells_with_the_protocol(tmp_path, family):
    """One family per run (the ViT's is `slow`: the DiT's covers the shared protocol, plus FID
    and samples; the ViT adds only its error-rate curves)."""
    r = subprocess.run([sys.executable, str(BENCH / "proof.py"), "--quick", "--families", family, "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--threads", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p = proof.protocol(quick=True)
    d = json.loads((tmp_path / "out" / f"proof_quick_{family}.json").read_text())
    assert d["meta"]["methods"] == ["svd", "select"] and d["meta"]["seeds"] == [0]
    assert set(d["ancestors"]["animals"]) == {"svd", "select"}
    cells = d["settings"]["base"]
    assert set(cells) == {"smaller", "larger"}
    for cell in cells.values():
        assert set(cell) == {"scratch", "svd", "select"}
        for name, e in cell.items():
            (run,) = e["runs"]
            steps = [s for s, _ in run["curve"]]
            # validated every steps/points steps, from step 0 to the last
            assert steps == list(range(0, p["steps"] + 1, p["steps"] // p["points"]))
            assert e["auc"][0] == pytest.approx(area_under_curve(run["curve"]))
            assert e["auc"][1] == e["auc"][2] == e["auc"][0]  # one seed: the interval is the point
            if family == "vit":
                assert all(0 <= v <= 1 for _, v in run["curve"])  # an error rate
            else:
                assert {"fid_g1", "fid_best", "class_acc_best"} <= set(e)
                assert run["best_guidance"] in proof.GUIDANCES
            if name != "select":
                ratio = e["auc_ratio_to_select"][0]
                assert ratio == pytest.approx(e["auc"][0] / cell["select"]["auc"][0])
                assert e["auc_verdict_vs_select"] == "n/a (1 seed)"  # no interval from one seed
        # the copied and the learngene model start from their ancestor, not from a fresh init
        if family == "dit":
            assert cell["svd"]["step0"][0] < cell["scratch"]["step0"][0]
    if family == "dit":
        assert (tmp_path / "out" / "proof_quick_samples_base_smaller.png").stat().st_size > 1000


def _curves(scale: float, seed: int, noise: float = 0.01) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(s, scale * math.exp(-s / 50) + 0.3 + rng.gauss(0, noise)) for s in range(0, 201, 10)]


def _cell(factor_a: float, seeds=range(4)) -> dict:
    """scratch, select and one method whose curve is select's times `factor_a` (seeded noise)."""
    rows = {"scratch": [], "select": [], "a": []}
    for s in seeds:
        rows["scratch"].append({"seed": s, "curve": _curves(1.0, 100 + s)})
        sel = _curves(0.8, 200 + s)
        rows["select"].append({"seed": s, "curve": sel})
        rows["a"].append({"seed": s, "curve": [(st, v * factor_a) for st, v in sel]})
    return summarize(rows, {})


def test_a_method_twice_as_good_wins_and_an_identical_one_ties():
    better = _cell(0.5)["a"]
    assert better["auc_verdict_vs_select"] == "win"
    m, lo, hi = better["auc_ratio_to_select"]
    assert m == pytest.approx(0.5) and hi < 1
    same = _cell(1.0)["a"]
    assert same["auc_verdict_vs_select"] == "tie" and same["auc_ratio_to_select"][0] == pytest.approx(1.0)
    worse = _cell(1.3)["a"]
    assert worse["auc_verdict_vs_select"] == "loss"
    # scratch starts higher and stays higher than select: a loss for scratch against select
    assert _cell(1.0)["scratch"]["auc_verdict_vs_select"] == "loss"


def test_noise_alone_is_rarely_a_win():
    """Same curve, independent noise per run: a 95% interval calls about 5% of cells
    a win or a loss, not more (200 seeded cells of 3 seeds each)."""
    calls = 0
    for trial in range(200):
        rows = {"scratch": [], "select": [], "a": []}
        for s in range(3):
            for j, name in enumerate(rows):
                rows[name].append({"seed": s, "curve": _curves(1.0, 10_000 * trial + 100 * j + s, noise=0.05)})
        calls += summarize(rows, {})["a"]["auc_verdict_vs_select"] != "tie"
    assert calls <= 20, calls  # 10%: twice the nominal rate


def test_steps_to_targets_are_per_seed():
    cell = _cell(0.5)
    for r, sel in zip(cell["a"]["runs"], cell["select"]["runs"]):
        assert r["steps_to_select_final"] < sel["curve"][-1][0]  # half the loss: reaches select's final early
    assert 100 < cell["select"]["steps_to_select_final"][0] <= 200  # itself: late (noise can put its last point above an earlier one)
    assert cell["scratch"]["steps_to_select_final"] is None  # never gets there in some seed
