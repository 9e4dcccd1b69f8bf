"""benchmarks/divcontrol.py --quick runs end to end and writes its JSON and PNGs with sane numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "divcontrol.py"


@pytest.mark.slow
def test_divcontrol_quick(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "divcontrol_quick.json").read_text())
    s = d["summary"]
    assert set(s["fidelity"]) == {"divcontrol", "divcontrol_noalign", "dense_shared", "per_condition", "no_control"}
    for m in ("divcontrol", "dense_shared", "no_control"):
        assert set(s["fidelity"][m]) == set(d["meta"]["train_settings"]) | set(d["meta"]["zero_shot_settings"])
        assert all(0 <= v["mse"][0] <= 4 for v in s["fidelity"][m].values())
    c = s["cost"]["divcontrol"]
    assert c["per_condition_params_trained"] == 4 * s["params_trained"]["dense_shared"]
    assert c["params_ratio"] > 4  # the factorized branch is smaller than one dense branch, and it serves every family
    fs = s["few_shot"]
    assert fs["tailors+gate K=10"]["params_trained"] < fs["dense fine-tune K=10"]["params_trained"] / 10
    for stem in ("curves", "samples", "fewshot"):
        assert (tmp_path / f"divcontrol_quick_{stem}.png").stat().st_size > 1000
