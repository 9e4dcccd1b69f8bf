"""`lgframe compare` end to end on a tiny budget, over every registered constraint."""

import csv
import json
import math

import pytest

from lgframe.apps.stats import area_under_curve
from lgframe.cli import main
from lgframe.core.registry import constraint_names


@pytest.mark.slow  # 65 s; test_compare_vit_two_seeds below runs in the default tests
def test_compare_quick(tmp_path):
    methods = [n for n in constraint_names() if n != "scratch"]
    rc = main(["compare", "recipes/compare_digits.yaml", f"compare.constraints=[{','.join(methods)}]",
               "compare.sizes=[DiT-Pico/2 depth=3 width=96 heads=3]", "compare.steps=10", "compare.ancestor_steps=40",
               "model.name=DiT-Pico/2", f"out_dir={tmp_path}", "trainer.progress=false", "--samples", "20"])
    assert rc == 0
    out = tmp_path / "compare_digits"
    result = json.loads((out / "compare.json").read_text())
    table = result["summary"]["DiT-Pico/2 depth=3 width=96 heads=3"]
    assert set(table) == {"scratch", *methods}
    assert "auc_ratio_to_scratch" not in table["scratch"] and table["svd"]["auc_verdict_vs_select"] == "n/a (1 seed)"
    for name in methods:  # every learngene starts below scratch's untrained loss
        assert table[name]["step0"][0] < table["scratch"]["step0"][0], name
    assert "| svd |" in (out / "report.md").read_text()
    assert list(out.glob("loss_*.png"))
    grid = out / "samples_DiT-Pico_2_depth3_width96_heads3.png"
    from PIL import Image

    assert Image.open(grid).size[1] > 40 * (len(methods) + 1) / 2  # one row per method and scratch
    assert "samples_DiT-Pico_2_depth3_width96_heads3.png" in (out / "report.md").read_text()


def test_compare_vit_two_seeds(tmp_path):
    """A ViT compare on digits (the recipe's data settings reach every run) with two seeds:
    per-seed curves of error = 1 - accuracy, ratios to select and scratch with intervals."""
    rc = main(["compare", "recipes/compare_digits.yaml", "task=classification", "model.name=ViT-Pico/2",
               "model.depth=2", "model.width=32", "model.heads=2", "data.val_subset=64",
               "data.batch_size=32", "compare.constraints=[svd,select]", "compare.sizes=[ViT-Pico/2 depth=2 width=16 heads=2]",
               "compare.seeds=[0,1]", "compare.steps=20", "compare.points=4", "compare.ancestor_steps=40",
               "compare.ancestor_recipe=vit_digits_pretrain", "compare.descendant_recipe=vit_digits_descend",
               f"out_dir={tmp_path}", "trainer.progress=false"])
    assert rc == 0
    out = tmp_path / "compare_digits"
    result = json.loads((out / "compare.json").read_text())
    assert result["quality"] == "validation error (1 - accuracy)"
    (cell,) = result["summary"].values()
    assert set(cell) == {"scratch", "svd", "select"}
    run = cell["svd"]["runs"][0]
    assert [s for s, _ in run["curve"]] == [0, 5, 10, 15, 20]  # compare.points=4: every 5 steps
    assert all(0 <= e <= 1 for _, e in run["curve"])
    assert [r["seed"] for r in cell["svd"]["runs"]] == [0, 1]
    m, lo, hi = cell["svd"]["auc_ratio_to_scratch"]
    assert lo < m < hi and cell["svd"]["auc_verdict_vs_scratch"] in ("win", "tie", "loss")
    # the summary is computed from these runs: the ratio is the geometric mean of per-seed AUC ratios
    per_seed = [area_under_curve(a["curve"]) / area_under_curve(b["curve"])
                for a, b in zip(cell["svd"]["runs"], cell["scratch"]["runs"])]
    assert m == pytest.approx(math.exp(sum(map(math.log, per_seed)) / 2))
    # the ancestors' quality is an error too: 1 - the dense ancestor's last validation accuracy
    acc = [row["val/acc"] for row in csv.DictReader(open(out / "ancestor_dense" / "metrics.csv")) if row["val/acc"]]
    assert result["ancestor_final"]["select"] == pytest.approx(1 - float(acc[-1]))
    for d in (out / "ancestor_dense", out / "runs" / "ViT-Pico_2_depth2_width16_heads2_svd_s1"):
        cfg = (d / "config.yaml").read_text()
        assert "batch_size: 32" in cfg and "val_subset: 64" in cfg, d
    assert "| svd |" in (out / "report.md").read_text() and "AUC / select" in (out / "report.md").read_text()
