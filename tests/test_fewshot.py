"""FAD few-shot (lgframe/apps/fewshot.py, lgframe/apps/episodes.py): identity at step 0,
the band masks partition the spectrum, seeded episodes, the baselines, bad input."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgframe.apps import episodes as E
from lgframe.apps import fewshot as fs
from lgframe.errors import LgframeError
from lgframe.models.registry import model_from_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def pico(seed: int = 0):
    torch.manual_seed(seed)
    return model_from_config(resolve_config("ViT-Pico/2", image_size=8, in_channels=1, num_classes=10))


@pytest.fixture(scope="module")
def shapes():
    return E.load_domain("shapes")


# ------------------------------------------------------------------ the adapter
@pytest.mark.parametrize("frequency", [True, False], ids=["fad", "spatial"])
def test_adapted_model_equals_backbone_at_step_0_then_moves(frequency):
    base = pico()
    model = copy.deepcopy(base)
    params = fs.add_adapters(model, frequency=frequency)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # exact: the scale is zero
    assert all(not p.requires_grad for n, p in model.named_parameters() if "adapter" not in n)
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-4


def test_fad_and_spatial_have_the_same_parameter_count():
    counts = []
    for frequency in (True, False):
        counts.append(sum(p.numel() for p in fs.add_adapters(pico(), frequency=frequency)))
    # 4 blocks x 64 channels x (5*5 + 3*3 + 1*1 kernel taps + 1 scale)
    assert counts == [4 * 64 * 36, 4 * 64 * 36]


def test_band_masks_partition_the_spectrum_and_bands_sum_back():
    m = fs.radial_masks(4, 4)
    assert torch.equal(m.sum(0), torch.ones(4, 4))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert m.sum((1, 2)).tolist() == [5.0, 6.0, 5.0]  # low, mid, high frequencies of a 4x4 grid
    assert m[0, 0, 0] == 1 and m[2, 2, 2] == 1  # DC is low, the corner (1/2, 1/2) is high
    for shape in ((3, 8, 4, 4), (2, 5, 8, 8)):
        x = torch.randn(shape)
        masks = fs.radial_masks(shape[-2], shape[-1], (0.3, 0.6))
        bands = fs.split_bands(x, masks)
        assert (bands.sum(0) - x).abs().max() < 1e-5
        assert all(b.pow(2).sum() > 1e-3 for b in bands)  # every band carries some of a noise map
    # the projectors the adapter uses are the same linear map
    x = torch.randn(2, 3, 4, 4)
    P = fs.band_projectors(4, 4)
    via = (x.reshape(1, 6, 16) @ P.transpose(1, 2)).reshape(3, 2, 3, 4, 4)
    assert (via - fs.split_bands(x, m)).abs().max() < 1e-5


def test_bands_split_by_scale():
    const = torch.full((1, 1, 4, 4), 2.0)
    bands = fs.split_bands(const, fs.radial_masks(4, 4))
    assert (bands[0] - const).abs().max() < 1e-6 and bands[1:].abs().max() < 1e-6  # constant: all low
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1
    bands = fs.split_bands(checker.view(1, 1, 4, 4), fs.radial_masks(4, 4))
    assert (bands[2] - checker).abs().max() < 1e-6 and bands[:2].abs().max() < 1e-6  # checkerboard: all high


# ------------------------------------------------------------------ episodes
def test_episodes_are_deterministic_by_seed(shapes):
    a = list(E.episodes(shapes, 5, 3, 4, 3, seed=7))
    b = list(E.episodes(shapes, 5, 3, 4, 3, seed=7))
    c = list(E.episodes(shapes, 5, 3, 4, 3, seed=8))
    for x, y in zip(a, b):
        assert x.classes == y.classes and torch.equal(x.support_index, y.support_index)
        assert torch.equal(x.query_index, y.query_index) and torch.equal(x.support_x, y.support_x)
    assert any(not torch.equal(x.support_index, z.support_index) for x, z in zip(a, c))
    # episode 2 alone is episode 2 of the run
    (late,) = E.episodes(shapes, 5, 3, 4, 1, seed=7, start=2)
    assert torch.equal(late.query_index, a[2].query_index)
    for ep in a:
        assert len(set(ep.support_index.tolist()) & set(ep.query_index.tolist())) == 0
        assert ep.support_y.tolist() == [j for j in range(5) for _ in range(3)]
        assert ep.query_y.bincount().tolist() == [4] * 5
        assert torch.equal(shapes.y[ep.support_index], torch.tensor(ep.classes).repeat_interleave(3))


def test_run_episode_is_deterministic_and_proto_is_the_untrained_classifier(shapes):
    base = pico()
    (ep,) = E.episodes(shapes, 5, 2, 5, 1, seed=0)
    r1 = fs.run_episode(base, ep, "fad", steps=3)
    r2 = fs.run_episode(base, ep, "fad", steps=3)
    assert r1.accuracy == r2.accuracy and r1.trainable == 4 * 64 * 36 + 5 * 64  # adapters + the 5 prototypes
    proto = fs.run_episode(base, ep, "proto")
    for method in ("linear", "fad", "spatial", "full"):
        assert fs.run_episode(base, ep, method, steps=0).accuracy == proto.accuracy
    assert proto.trainable == 0
    assert fs.run_episode(base, ep, "linear", steps=3).trainable == 5 * 64
    assert fs.run_episode(base, ep, "full", steps=1).trainable == sum(p.numel() for p in base.parameters()) + 5 * 64


# ------------------------------------------------------------------ bad input
def test_episode_settings_the_data_cannot_supply(shapes):
    with pytest.raises(LgframeError, match="ways=11, but domain 'shapes' has 10 classes.*valid ways are 2..10"):
        E.sample_episode(shapes, 11, 1, 1, 0)
    with pytest.raises(LgframeError, match="shots=150 \\+ queries=60.*has only 200: shots \\+ queries must be <= 200"):
        E.sample_episode(shapes, 5, 150, 60, 0)
    with pytest.raises(LgframeError, match="at least 2 classes"):
        E.sample_episode(shapes, 1, 1, 1, 0)
    with pytest.raises(LgframeError, match="unknown few-shot domain 'mnist'; valid: digits, shapes, animals"):
        E.load_domain("mnist")
    with pytest.raises(LgframeError, match="classes \\[3, 12\\] asked; valid labels: \\[0, 1, .*\\[12\\] missing"):
        E.load_domain("shapes", classes=[3, 12])


@pytest.mark.parametrize("edges", [(0.75, 0.4), (0.4, 0.4), (0.0, 0.5), (0.5, 1.2), (0.5,)])
def test_band_edges_out_of_order_or_outside_the_spectrum(edges):
    with pytest.raises(LgframeError, match="need two radii 0 < e1 < e2 < 1"):
        fs.radial_masks(4, 4, edges)


def test_bad_adapter_settings():
    with pytest.raises(LgframeError, match="three odd sizes >= 1"):
        fs.add_adapters(pico(), kernels=(4, 3, 1))
    with pytest.raises(LgframeError, match="adapter blocks \\[0, 4\\]: the backbone has blocks 0..3"):
        fs.add_adapters(pico(), blocks=[0, 4])
    with pytest.raises(LgframeError, match="unknown few-shot method 'fda'; valid: fad, spatial, proto"):
        fs.run_episode(pico(), E.sample_episode(E.load_domain("shapes"), 2, 1, 1, 0), "fda")
    with pytest.raises(LgframeError, match="valid keys: method, backbone"):
        fs.load_cfg("fewshot_digits_fad", ["shotz=3"])
    with pytest.raises(LgframeError, match="method='fda'; valid: fad, spatial"):
        fs.check_cfg(fs.load_cfg("fewshot_digits_fad", ["method=fda"]))
    with pytest.raises(LgframeError, match="fewshot recipe 'nope' not found .*fewshot_digits_fad"):
        fs.load_cfg("nope")


def test_shipped_recipe_loads_and_names_its_command():
    path = fs.RECIPE_DIR / "fewshot_digits_fad.yaml"
    assert path.read_text().splitlines()[0] == "# lgframe fewshot fewshot_digits_fad"
    c = fs.load_cfg("fewshot_digits_fad", ["method=spatial", "shots=1"])
    fs.check_cfg(c)
    assert (c.method, c.shots, c.targets) == ("spatial", 1, ["shapes", "animals"])


# ------------------------------------------------------------------ slow: a fit backbone, LoRA, the CLI
@pytest.fixture(scope="session")
def fit_backbone(tmp_path_factory):
    """A ViT-Pico/2 pre-trained briefly on digits with lgframe.fit (vit_digits_pretrain)."""
    from lgframe.models.files import read_model
    from lgframe.training.recipes import load_recipe
    from lgframe.training.stages import fit

    cfg = load_recipe("vit_digits_pretrain", ["model.name=ViT-Pico/2", "constraint=scratch", "trainer.max_steps=60",
                                              "trainer.val_every=30", "trainer.progress=false",
                                              f"out_dir={tmp_path_factory.mktemp('fs_backbone')}"])
    res = fit(cfg, extract_learngene=False)
    return res.checkpoint, fs.plain_vit(read_model(res.checkpoint)[0])


@pytest.mark.slow
def test_lora_baseline_trains_only_lora_and_starts_at_the_backbone(fit_backbone, shapes):
    _, base = fit_backbone
    model = copy.deepcopy(base)
    params = fs.add_lora(model, 2, 4.0)
    assert sum(p.numel() for p in params) == 4 * 2 * ((64 + 192) + (64 + 64))  # blocks x rank x (qkv A+B, proj A+B)
    x = shapes.x[:4]
    with torch.no_grad():
        assert torch.allclose(model(x), base(x), atol=1e-6)  # B = 0
    (ep,) = E.episodes(shapes, 5, 5, 10, 1, seed=3)
    assert fs.run_episode(base, ep, "lora", steps=0).accuracy == fs.run_episode(base, ep, "proto").accuracy


@pytest.mark.slow
def test_cli_fewshot_writes_results(fit_backbone, tmp_path, capsys):
    from lgframe.cli import main

    ckpt, _ = fit_backbone
    rc = main(["fewshot", "fewshot_digits_fad", f"backbone={ckpt}", "episodes=3", "steps=2", "targets=[shapes]",
               f"out={tmp_path / 'fs'}"])
    assert rc == 0
    res = json.loads((tmp_path / "fs" / "results.json").read_text())
    r = res["results"]["shapes"]
    assert r["n"] == 3 and len(r["accuracies"]) == 3 and 0 <= r["low"] <= r["mean"] <= r["high"] <= 1.5
    assert "fad on shapes, 5-way 5-shot: accuracy" in capsys.readouterr().out
    rc = main(["fewshot", "fewshot_digits_fad", f"backbone={ckpt}", "ways=12", f"out={tmp_path / 'bad'}"])
    assert rc == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--quick", "--out", str(tmp_path),
                        "--targets", "shapes"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "fewshot_quick.json").read_text())
    for cell in ("5way_1shot", "5way_5shot"):
        assert set(d["cells"][cell]) == set(fs.METHODS)
        for m in fs.METHODS:
            t = d["cells"][cell][m]["targets"]["shapes"]
            assert t["n"] == 2 and 0 <= t["mean"] <= 1
        assert d["cells"][cell]["fad"]["targets"]["shapes"]["fad_minus_this"]["mean"] == 0
    assert (tmp_path / "fewshot_quick.png").stat().st_size > 1000
