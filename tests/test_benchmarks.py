"""The benchmarks' --quick modes run and write sane results (the full runs are by hand)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lgframe.core.constraint import TransformConstraint
from lgframe.core.registry import constraint_class, constraint_names

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def test_overhead_quick(tmp_path):
    run("overhead.py", tmp_path)
    rows = json.loads((tmp_path / "overhead_quick.json").read_text())["rows"]
    assert {r["constraint"] for r in rows} == set(constraint_names()) - {"scratch"}
    for r in rows:
        assert r["dense_ms"] > 0 and r["constraint_ms"] > 0
        if issubclass(constraint_class(r["constraint"]), TransformConstraint):
            assert r["memory_ratio"] == pytest.approx(1.0)  # training stays dense: same bytes
        else:
            assert 0.3 < r["memory_ratio"] < 1.5, r
    assert (tmp_path / "overhead_quick.png").stat().st_size > 1000


def test_descent_quick(tmp_path):
    run("descent.py", tmp_path)
    data = json.loads((tmp_path / "descent_quick.json").read_text())
    assert {r["constraint"] for r in data["rows"]} == set(constraint_names()) - {"scratch"}
    for r in data["rows"]:
        assert r["descend_smaller_seconds"] > 0 and r["descend_larger_seconds"] > 0
        assert 0 < r["learngene_bytes"] <= r["file_bytes"]


@pytest.mark.slow  # 20 s
def test_personalize_memory_quick(tmp_path):
    run("personalize_memory.py", tmp_path)
    data = json.loads((tmp_path / "personalize_memory_quick.json").read_text())
    mem = {r["config"]: r for r in data["memory"]}
    assert set(mem) == {"full", "patch", "skip", "both"}
    # fewer tokens and fewer blocks with saved activations: counted bytes fall in that order
    assert mem["both"]["activations"] < mem["patch"]["activations"] < mem["full"]["activations"]
    assert mem["skip"]["activations"] < mem["full"]["activations"] and mem["both"]["total_ratio"] < 0.8
    assert [r["config"] for r in data["quality"]] == ["full", "patch", "skip", "both"]
    assert all(r["val_loss"] > 0 and (tmp_path / r["samples"]).is_file() for r in data["quality"])
    assert (tmp_path / "personalize_memory_quick.png").stat().st_size > 1000


@pytest.mark.slow  # 27 s
def test_weightspace_quick(tmp_path):
    run("weightspace.py", tmp_path)
    d = json.loads((tmp_path / "weightspace_quick.json").read_text())
    rows = {r["config"]: r for r in d["rows"]}
    assert set(rows) == {"mlora+mask", "mlora", "lora+mask", "lora", "full"}
    for r in rows.values():
        assert r["psnr_mean"] > 10 and 0 <= r["classification_accuracy"] <= 1 and r["fid_digits"] > 0
    assert rows["full"]["numbers_per_item"] > rows["mlora"]["numbers_per_item"]
    assert (tmp_path / "weightspace_quick.png").stat().st_size > 1000


@pytest.mark.slow
def test_kind_transfer_quick(tmp_path):
    run("kind_transfer.py", tmp_path)
    d = json.loads((tmp_path / "kind_transfer_quick.json").read_text())
    p = d["parameters"]
    assert p["learngene only"] < p["classes 0,3,7"] < p["full"]
    g = d["generation_classes_0_3_7"]  # the kept classes compute exactly what the full model does
    assert g["classes 0,3,7"] == g["full"]
    assert set(d["shift"]) == {"learngene only (fresh tailors)", "full-model transfer", "scratch"}
    for r in d["shift"].values():
        assert r["final"] < r["initial"]  # every run learns the shapes
    assert (tmp_path / "kind_transfer_quick.png").stat().st_size > 1000


def test_peer_step_quick(tmp_path):
    run("peer_step.py", tmp_path)
    (row,) = json.loads((tmp_path / "peer_step_quick.json").read_text())["rows"]
    assert row["output_gap"] < 1e-4  # the same model: the comparison is of implementations, not of models
    # diffusers' DiT keeps a timestep and label embedder in every block (copies, from DiT checkpoints): more weights
    assert row["params_lgframe"] < row["params_diffusers"]
    assert row["lgframe_ms"] > 0 and row["diffusers_ms"] > 0 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert row["memory_lgframe"]["params"] <= row["memory_diffusers"]["params"]


def test_gpu_throughput_rows_run_on_cpu(tmp_path):
    """The GPU script's rows, on the CPU at a tiny size: every combination builds and steps
    (the CUDA run itself is by hand); without CUDA the script says so and exits 0."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_throughput as g
    finally:
        sys.path.remove(str(BENCH))
    for impl, constraint in (("lgframe", "scratch"), ("lgframe", "svd"), ("lgframe", "kronecker"), ("diffusers", "scratch")):
        for ckpt in (False, True):
            r = g.run_row("DiT-Pico/2", impl, constraint, False, ckpt, batch=2, warmup=0, steps=1, device="cpu")
            assert r["error"] is None and r["steps_per_s"] > 0, r
    import torch

    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, str(BENCH / "gpu_throughput.py"), "--out", str(tmp_path / "g.json")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "no CUDA" in out.stdout and not (tmp_path / "g.json").exists()
