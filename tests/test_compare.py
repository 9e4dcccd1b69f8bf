"""`lgframe compare` end to end on a tiny budget, over every registered constraint."""

import json

import pytest

from lgframe.cli import main
from lgframe.core.registry import constraint_names


@pytest.mark.slow  # 65 s; the compare app is exercised by the init_quality benchmark runs
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
    assert table["scratch"]["ratio_to_scratch"] == 1.0
    for name in methods:  # every learngene starts below scratch's untrained loss
        assert table[name]["initial"] < table["scratch"]["initial"], name
    assert "| svd |" in (out / "report.md").read_text()
    assert list(out.glob("loss_*.png"))
    grid = out / "samples_DiT-Pico_2_depth3_width96_heads3.png"
    from PIL import Image

    assert Image.open(grid).size[1] > 40 * (len(methods) + 1) / 2  # one row per method and scratch
    assert "samples_DiT-Pico_2_depth3_width96_heads3.png" in (out / "report.md").read_text()
