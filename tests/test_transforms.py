"""dct (FRONT), dwt (BoT) and select (Weight Selection): training-free descent.

Exactness and statistics on synthetic weights; then, on digits, descendants of
a trained dense ancestor (smaller and larger, DiT and ViT) against scratch.
"""


import numpy as np
import pytest
import torch
from helpers import activate

from lgframe.core.layout import Layout
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.models.registry import create_model
from lgframe.strategies.dct import matrix_decode
from lgframe.strategies.select import selection_index
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import extract_learngene_file, fit, read_curve

QUIET = ["trainer.progress=false", "trainer.log_every=1", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)
FC1 = "mlp.fc1.weight"


def descend(name, ancestor, target, **options):
    c = get_constraint({"name": name, **options})
    return get_constraint({"name": name, **options}).descend(c.learngene(ancestor), target)


def stack(model, role=FC1):
    return Layout(model).stack(model, Layout(model).roles[role])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name,options", [("dct", {"keep": [1.0, 1.0, 1.0]}), ("dwt", {}), ("select", {})])
def test_same_size_is_the_identity(name, options):
    anc = activate(create_model("DiT-Nano/2"))
    child = descend(name, anc, create_model("DiT-Nano/2"), **options)
    for (n, p), q in zip(anc.named_parameters(), child.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def smooth_model(depth=8, width=128, heads=4):
    """A DiT whose fc1 stack is a smooth function of (layer, row, column)."""
    model = activate(create_model("DiT-Nano/2", depth=depth, width=width, heads=heads))
    L, m, n = stack(model).shape
    l, i, j = np.meshgrid(np.linspace(0, 1, L), np.linspace(0, 1, m), np.linspace(0, 1, n), indexing="ij")
    W = 0.05 * (np.sin(2.1 * l + 3.0 * i) * np.cos(2.5 * j) + 0.5 * np.cos(4 * i * j + l))
    with torch.no_grad():
        for k, mod in enumerate(Layout(model).role_modules(model, Layout(model).roles[FC1])):
            mod.weight.copy_(torch.from_numpy(W[k]).float())
    return model


@pytest.mark.parametrize("name,bound", [("dct", 0.05), ("dwt", 0.15)])
def test_down_then_up_keeps_a_smooth_tensor(name, bound):
    """Half the depth and width, then back: a smooth fc1 stack comes back
    within `bound` relative error (measured: dct 0.030, dwt Haar 0.128: piecewise constant)."""
    anc = smooth_model()
    opts = {"roles": [FC1], "fan_in_power": 0.0} | ({"keep": [1.0, 1.0, 1.0]} if name == "dct" else {})
    small = descend(name, anc, create_model("DiT-Nano/2", depth=4, width=64, heads=2), **opts)
    back = descend(name, small, create_model("DiT-Nano/2", depth=8, width=128, heads=4), **opts)
    assert rel(stack(back), stack(anc)) < bound


@pytest.mark.parametrize("name", ["dct", "dwt"])
@pytest.mark.parametrize("size", [dict(depth=5, width=96, heads=3), dict(depth=12, width=256, heads=8), dict(depth=1)])
def test_role_statistics_survive_and_odd_sizes_work(name, size):
    """Each role of a descendant keeps its ancestor's mean and std (within 10%)
    once the fan-in factor is off; with it (default), the std scales by exactly
    (fan-in ratio) ** power. Depth 5 / width 96 from depth 8 / width 128 is odd."""
    anc = activate(create_model("DiT-Nano/2", depth=8), std=0.05)
    target = dict(depth=8, width=128, heads=4) | size
    plain = descend(name, anc, create_model("DiT-Nano/2", **target), fan_in_power=0.0)
    auto = descend(name, anc, create_model("DiT-Nano/2", **target))
    for role in Layout(anc).select_roles(None):
        a, p, d = stack(anc, role.name), stack(plain, role.name), stack(auto, role.name)
        assert p.shape == (target["depth"], *Layout(plain).roles[role.name].shape[1:])
        assert abs(p.std() / a.std() - 1) < 0.10, role.name
        assert abs(p.mean() - a.mean()) < 0.1 * a.std()
        n_src, n_tgt = a.shape[2], p.shape[2]
        expect = (n_src / n_tgt) ** (1.0 if n_tgt > n_src else 0.5)
        assert d.std() / p.std() == pytest.approx(expect, rel=1e-4), role.name


def test_dwt_exact_halving_and_doubling():
    """Haar, 2x: the smaller model's fc1 is the mean of each 2x2x2 cell; the
    larger one repeats each value over a 2x2x2 cell (statistics untouched)."""
    anc = activate(create_model("DiT-Nano/2", depth=4, width=128, heads=4))
    opts = {"roles": [FC1], "match_stats": False, "fan_in_power": 0.0}
    W = stack(anc)
    half = stack(descend("dwt", anc, create_model("DiT-Nano/2", depth=2, width=64, heads=2), **opts))
    expect = W.reshape(2, 2, 256, 2, 64, 2).mean(dim=(1, 3, 5))
    assert torch.allclose(half, expect, atol=1e-6)
    double = stack(descend("dwt", anc, create_model("DiT-Nano/2", depth=8, width=256, heads=8), **opts))
    expect = W.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.allclose(double, expect, atol=1e-6)


def test_dct_exact_halving_and_doubling_of_a_band_limited_tensor():
    """A stack made of the lowest 2x2x2 cosines halves and doubles exactly
    (resampled cosines of the new grid, same amplitude)."""
    L, m, n = 4, 512, 128

    def cosines(L, m, n):
        l, i, j = np.meshgrid((np.arange(L) + 0.5) / L, (np.arange(m) + 0.5) / m, (np.arange(n) + 0.5) / n, indexing="ij")
        return 0.03 * (1 + np.cos(np.pi * l) + np.cos(np.pi * i) * np.cos(np.pi * j))

    anc = activate(create_model("DiT-Nano/2", depth=L))
    with torch.no_grad():
        for k, mod in enumerate(Layout(anc).role_modules(anc, Layout(anc).roles[FC1])):
            mod.weight.copy_(torch.from_numpy(cosines(L, m, n)[k]).float())
    opts = {"roles": [FC1], "fan_in_power": 0.0}
    for d, w, h in ((2, 64, 2), (8, 256, 8)):
        got = stack(descend("dct", anc, create_model("DiT-Nano/2", depth=d, width=w, heads=h), **opts))
        assert torch.allclose(got, torch.from_numpy(cosines(d, 4 * w, w)).float(), atol=1e-5), (d, w)


@pytest.mark.parametrize("band", ["low", "high"])
def test_dct_matrix_decode_equals_scipys_inverse(band, monkeypatch):
    """The decode as one matrix product per axis (a GPU's) gives scipy's crop/pad inverse (a
    CPU's), every role (q/k/v and adaLN chunks included), shrinking and growing, either band."""
    anc = activate(create_model("DiT-Nano/2", depth=4))
    dct_cls = type(get_constraint({"name": "dct"}))
    for size in (dict(depth=3, width=96, heads=3), dict(depth=6, width=192, heads=6)):
        want = descend("dct", anc, create_model("DiT-Nano/2", **size), band=band).state_dict()
        with monkeypatch.context() as m:
            m.setattr(dct_cls, "decode", matrix_decode)
            got = descend("dct", anc, create_model("DiT-Nano/2", **size), band=band).state_dict()
        for key, w in want.items():
            assert torch.allclose(got[key], w, rtol=1e-4, atol=1e-6), (size, key)
        assert any(not torch.equal(got[k], v) for k, v in want.items())  # the matrix form did replace decode


def test_non_dyadic_dwt_is_not_weight_selection():
    anc = activate(create_model("DiT-Nano/2", depth=8))
    size = dict(depth=5, width=96, heads=3)
    dwt = stack(descend("dwt", anc, create_model("DiT-Nano/2", **size), fan_in_power=0.0))
    sel = stack(descend("select", anc, create_model("DiT-Nano/2", **size)))
    assert rel(dwt, sel) > 0.3


def test_select_follows_the_papers_rule():
    assert selection_index(128, 64).tolist() == list(range(0, 128, 2))
    assert selection_index(10, 4).tolist() == [0, 3, 6, 9]  # round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert selection_index(7, 4).tolist() == [0, 2, 4, 6]
    anc = activate(create_model("DiT-Nano/2", depth=6))
    child = descend("select", anc, create_model("DiT-Nano/2", depth=3, width=96, heads=3))
    W, C = stack(anc), stack(child)
    rows, cols = selection_index(512, 384), selection_index(128, 96)
    assert torch.equal(C, W[:3][:, rows][:, :, cols])  # first 3 blocks, element selection
    big = descend("select", anc, create_model("DiT-Nano/2", depth=8, width=192, heads=6))
    assert torch.equal(stack(big)[:6, :512, :128], W)  # growth: leading positions (lgframe's extension)


def test_bad_options_name_the_valid_values():
    with pytest.raises(LgframeError, match="keep"):
        get_constraint({"name": "dct", "keep": [0.5, 2.0]})
    with pytest.raises(LgframeError, match="valid: low, high"):
        get_constraint({"name": "dct", "band": "mid"})
    with pytest.raises(LgframeError, match="discrete PyWavelets wavelet, e.g. haar"):
        get_constraint({"name": "dwt", "wavelet": "morlet"})
    with pytest.raises(LgframeError, match="'auto' or a number"):
        get_constraint({"name": "dwt", "fan_in_power": "big"})


def test_dct_regularizer_is_the_energy_outside_the_block():
    model = smooth_model(depth=4)
    c = get_constraint({"name": "dct", "lam": 2.0, "roles": [FC1], "keep": [1.0, 0.5, 0.5]})
    c.attach(model)
    low = c.regularizer(model).item()
    assert 0 <= low < 0.05 * 2.0  # a smooth stack has its energy in the low block
    with torch.no_grad():
        for mod in Layout(model).role_modules(model, Layout(model).roles[FC1]):
            mod.weight.normal_()
    white = c.regularizer(model)
    assert white.item() == pytest.approx(2.0 * (1 - 0.25), abs=0.05)  # white noise: 3/4 of it outside
    white.backward()
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert get_constraint("dct").regularizer(model) is None


def test_learngene_sizes():
    anc = activate(create_model("DiT-Nano/2"))
    role_bytes = sum(stack(anc, r.name).numel() for r in Layout(anc).select_roles(None))
    dct = get_constraint("dct").learngene(anc).group("learngene")
    assert sum(v.numel() for k, v in dct.items() if k.endswith("coef")) == role_bytes // 4  # keep 1, 1/2, 1/2
    dwt = get_constraint({"name": "dwt", "level": 1}).learngene(anc).group("learngene")
    assert sum(v.numel() for k, v in dwt.items() if k.endswith("band")) == role_bytes // 4
    child = get_constraint("dwt").descend(get_constraint({"name": "dwt", "level": 1}).learngene(anc), create_model("DiT-Nano/2"))
    assert rel(stack(child), stack(anc)) < 1.5  # a level-1 band still descends (to a white stack: ~sqrt(2))


# ------------------------------------------------------------------ on digits
def first_epoch_train_loss(res):
    curve = read_curve(res.run_dir, "train/loss")
    return float(np.mean([v for _, v in curve[: 1437 // 128]]))


SIZES = {"smaller": ["model.depth=3", "model.width=32", "model.heads=1"],
         "larger": ["model.depth=6", "model.width=96", "model.heads=3"]}
SAME = {"same": []}


def ancestor_learngenes(out, pretrain, model, steps):
    """A dense ancestor (trained with constraint=dct, which leaves training
    dense), decomposed afterwards from its checkpoint by each constraint."""
    res = fit(load_recipe(pretrain, [f"out_dir={out}", "name=anc", f"model.name={model}", f"trainer.max_steps={steps}",
                                     f"trainer.val_every={steps}", "ema.enabled=false", "constraint=dct", *QUIET]))
    ckpt = res.run_dir / "checkpoints" / "last.ckpt"
    lgs = {c: extract_learngene_file(ckpt, out / f"{c}.safetensors", constraint=c)[0] for c in ("dct", "dwt")}
    lgs["dct-high"] = extract_learngene_file(ckpt, out / "high.safetensors", constraint={"name": "dct", "band": "high"})[0]
    return lgs


def descendants(out, recipe, model, lgs, methods, sizes=SIZES):
    runs = {}
    for size, over in sizes.items():
        common = [f"out_dir={out}", f"model.name={model}", *over, "trainer.max_steps=11", "trainer.val_every=11",
                  "ema.enabled=false", "seed=3", "optim.warmup_steps=5", *QUIET]
        for m in methods:
            init = ["constraint=scratch"] if m == "scratch" else [f"constraint={m.split('-')[0]}", f"init.source={lgs[m]}"]
            runs[size, m] = first_epoch_train_loss(fit(load_recipe(recipe, common + [f"name={size}-{m}", *init])))
    return runs


@pytest.fixture(scope="module")
def dit_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    lgs = ancestor_learngenes(out, "dit_digits_pretrain", "DiT-Pico/2", 200)
    runs = descendants(out, "dit_digits_descend", "DiT-Pico/2", lgs, ["scratch", "dct", "dwt"])
    return runs | descendants(out, "dit_digits_descend", "DiT-Pico/2", lgs, ["dct", "dct-high"], SAME)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["dct", "dwt"])
def test_dit_descendant_beats_scratch(dit_runs, method, size):
    """Measured (first-epoch train loss, 11 steps): scratch 0.96 / 0.90,
    dct 0.55 / 0.53, dwt 0.51 / 0.34 (smaller / larger)."""
    print(f"dit {size} {method}: descendant {dit_runs[size, method]:.4f} scratch {dit_runs[size, 'scratch']:.4f}")
    assert dit_runs[size, method] < dit_runs[size, "scratch"] - 0.1


def test_low_frequencies_beat_high_frequencies(dit_runs):
    """The FRONT claim: at the ancestor's size, keeping the low half of the
    width spectrum initializes better than keeping the high half."""
    print(f"dit same size: dct low block {dit_runs['same', 'dct']:.4f} high block {dit_runs['same', 'dct-high']:.4f}")
    assert dit_runs["same", "dct"] < dit_runs["same", "dct-high"] - 0.02


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    lgs = ancestor_learngenes(out, "vit_digits_pretrain", "ViT-Pico/2", 200)
    return descendants(out, "vit_digits_descend", "ViT-Pico/2", lgs, ["scratch", "dct", "dwt"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["dct", "dwt"])
def test_vit_descendant_beats_scratch(vit_runs, method, size):
    """Measured (first-epoch cross-entropy): scratch 2.31 / 2.34, dct 1.98 / 1.74,
    dwt 1.93 / 1.08 (smaller / larger)."""
    print(f"vit {size} {method}: descendant {vit_runs[size, method]:.4f} scratch {vit_runs[size, 'scratch']:.4f}")
    assert vit_runs[size, method] < vit_runs[size, "scratch"] - 0.2


def test_spectral_refinement_moves_energy_into_the_block(tmp_path):
    """recipes/dit_digits_refine_dct.yaml on a dense checkpoint: the
    regularizer (energy outside the kept block) falls during the phase."""
    from lgframe.models.files import save_model

    torch.manual_seed(0)
    dense = tmp_path / "dense.safetensors"
    save_model(activate(create_model("DiT-Pico/2")), dense)
    res = fit(load_recipe("dit_digits_refine_dct", [f"out_dir={tmp_path}", f"init.source={dense}", "model.name=DiT-Pico/2",
                                                    "trainer.max_steps=30", "trainer.val_every=30", "optim.lr=3e-3", *QUIET]))
    reg = [v for _, v in read_curve(res.run_dir, "train/regularizer")]
    assert reg[-1] < 0.9 * reg[0]
    assert res.learngene is not None and "learngene/mlp.fc1.weight/coef" in get_constraint("dct").learngene(res.task.model).tensors
