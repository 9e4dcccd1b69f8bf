"""svd (FINE): round trips, storage, descent to every direction, groups, errors."""

import pytest
import torch
from helpers import activate

from lgframe.core.constraint import BANK
from lgframe.core.layout import Layout
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.models.registry import create_model
from lgframe.strategies.svd import random_orthonormal


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dit_inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)


def fine_form(model, seed=0):
    """Overwrite every default role with a stack in FINE form (shared U, V; per-layer sigma)."""
    g = torch.Generator().manual_seed(seed)
    lay = Layout(model)
    with torch.no_grad():
        for role in lay.select_roles(None):
            L, m, n = role.shape
            r = min(m, n)
            U, V = random_orthonormal(m, r), random_orthonormal(n, r)
            for _layer, mod in enumerate(lay.role_modules(model, role)):
                sigma = torch.rand(r, generator=g) + 0.1
                mod.weight.copy_((U * sigma) @ V.T * 0.1)
    return model


def test_full_rank_round_trip_fine_form_stack():
    torch.manual_seed(0)
    model = activate(fine_form(create_model("DiT-Pico/2")))
    lay = Layout(model)
    dense = {r.name: lay.stack(model, r).clone() for r in lay.select_roles(None)}
    x, t, y = dit_inputs()
    ref = model(x, t, y)
    c = get_constraint("svd")
    c.attach(model, init="dense")
    assert rel(model(x, t, y), ref) < 1e-4
    c.materialize(model)
    for name, W in dense.items():
        assert rel(Layout(model).stack(model, Layout(model).roles[name]), W) < 1e-4, name


def test_single_layer_round_trip_of_arbitrary_dense_weights():
    model = activate(create_model("DiT-Pico/2", depth=1))
    lay = Layout(model)
    dense = {r.name: lay.stack(model, r).clone() for r in lay.select_roles(None)}
    c = get_constraint("svd")
    c.attach(model, init="dense")
    c.materialize(model)
    for name, W in dense.items():
        assert rel(Layout(model).stack(model, Layout(model).roles[name]), W) < 1e-4


def test_materialized_svd_model_reattaches_exactly():
    torch.manual_seed(1)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint("svd")
    c.attach(model, init="random")
    x, t, y = dit_inputs()
    ref = model(x, t, y).detach()
    c.materialize(model)
    assert not any("sigma" in k or BANK in k for k in model.state_dict())
    assert rel(model(x, t, y), ref) < 1e-5
    c2 = get_constraint("svd")
    c2.attach(model, init="dense")
    assert rel(model(x, t, y), ref) < 1e-4


def test_shared_factors_stored_once():
    model = create_model("DiT-Nano/2")
    dense_numel = sum(p.numel() for p in model.parameters())
    get_constraint("svd").attach(model)
    sd = model.state_dict()
    assert not any(k.endswith(("attn.qkv.weight", "mlp.fc1.weight")) for k in sd)
    d, L = 128, 6
    # U, V per role once: qkv (3d+d)d, proj 2d*d, fc1 (4d+d)d, fc2 (d+4d)d; sigma d per role per layer.
    factors = (4 * d + 2 * d + 5 * d + 5 * d) * d
    sigmas = 4 * d * L
    dense_roles = (3 + 1 + 4 + 4) * d * d * L
    assert sum(v.numel() for v in sd.values()) == dense_numel - dense_roles + factors + sigmas
    assert sum(v.numel() for k, v in sd.items() if k.startswith(BANK)) == factors


def test_activation_path_matches_built_weight():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint("svd", )
    c.attach(model)
    mod = next(m for m in model.modules() if getattr(m, "is_constrained_linear", False))
    bank = getattr(model, BANK)
    x_few, x_many = torch.randn(1, 1, mod.in_features), torch.randn(64, 64, mod.in_features)
    for x in (x_few, x_many):
        dense = torch.nn.functional.linear(x, bank.weight(mod), mod.bias)
        assert rel(bank.linear(mod, x), dense) < 1e-5


def test_param_groups_partition_every_parameter():
    model = create_model("ViT-Pico/2")
    c = get_constraint("svd")
    c.attach(model)
    groups = c.param_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups["learngene"]) == 8  # U, V of 4 roles
    assert len(groups["scalers"]) == 4 * 4  # sigma of 4 roles x 4 layers


@pytest.fixture(scope="module")
def ancestor():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))
    c = get_constraint({"name": "svd", "sigma_init": "copy"})
    c.attach(model)
    return model, c.learngene(model)


def descend(lg, **size):
    model = create_model("DiT-Nano/2", **size)
    return get_constraint({"name": "svd", "sigma_init": "copy"}).descend(lg, model)


def test_same_size_descent_reproduces_ancestor(ancestor):
    model, lg = ancestor
    child = descend(lg)
    x, t, y = dit_inputs()
    assert rel(child(x, t, y), model(x, t, y)) < 1e-5


@pytest.mark.parametrize(
    "size",
    [dict(depth=3), dict(depth=9), dict(width=64, heads=2), dict(width=192, heads=6), dict(depth=1, width=96, heads=3)],
    ids=["shallower", "deeper", "narrower", "wider", "depth1-narrower"],
)
def test_descend_to_other_sizes(ancestor, size):
    model, lg = ancestor
    child = descend(lg, **size)
    cfg = child.config
    x, t, y = dit_inputs()
    out = child(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    bank = getattr(child, BANK)
    assert all(not p.requires_grad for p in bank.parameters())
    lay = Layout(child)
    assert lay.depth == cfg.depth
    qkv = lay.roles["attn.qkv.weight"]
    assert qkv.shape == (cfg.depth, 3 * cfg.width, cfg.width)
    assert bank.factors["attn__qkv"]["U"].shape[1] == min(128, cfg.width)


def test_narrower_descendant_is_a_consistent_selection(ancestor):
    """Same depth, width 64 with head_dim 32: each descendant W is the ancestor's
    W at the selected rows/columns (whole heads of q, k and v), restricted to the
    kept rank-64 components."""
    model, lg = ancestor
    child = descend(lg, width=64, heads=2)
    anc_bank, ch_bank = getattr(model, BANK), getattr(child, BANK)
    qkv_a = model.blocks[2].attn.qkv
    qkv_c = child.blocks[2].attn.qkv
    Ua, Va = anc_bank.factors["attn__qkv"]["U"], anc_bank.factors["attn__qkv"]["V"]
    keep = torch.stack([m.attn.qkv.sigma.detach().abs() for m in model.blocks]).mean(0).argsort(descending=True)[:64].sort().values
    rows = torch.cat([torch.arange(64) + c * 128 for c in range(3)])  # heads 0, 1 of q, k, v
    expect = (Ua[rows][:, keep] * qkv_a.sigma[keep]) @ Va[:64][:, keep].T
    assert rel(ch_bank.weight(qkv_c), expect.detach()) < 1e-5
    # coupled free tensors use the same selection: the qkv bias rows
    assert torch.equal(qkv_c.bias.detach(), qkv_a.bias.detach()[rows])


def test_interpolated_sigma_spans_ancestor_layers(ancestor):
    model, lg = ancestor
    child = get_constraint({"name": "svd", "sigma_init": "interpolate"}).descend(lg, create_model("DiT-Nano/2", depth=11))
    first, last = child.blocks[0].attn.proj.sigma, child.blocks[-1].attn.proj.sigma
    assert torch.allclose(first, model.blocks[0].attn.proj.sigma)
    assert torch.allclose(last, model.blocks[-1].attn.proj.sigma)
    mid = child.blocks[1].attn.proj.sigma  # position 0.5 between ancestor layers 0 and 1
    assert torch.allclose(mid, (model.blocks[0].attn.proj.sigma + model.blocks[1].attn.proj.sigma) / 2, atol=1e-6)


def test_orthogonality_regularizer():
    model = create_model("DiT-Pico/2")
    c = get_constraint({"name": "svd", "orthogonality": 1.0})
    c.attach(model)
    assert c.regularizer(model).item() < 1e-8  # random orthonormal factors
    with torch.no_grad():
        getattr(model, BANK).factors["attn__qkv"]["U"].mul_(2)
    assert c.regularizer(model).item() > 1.0
    assert get_constraint("svd").regularizer(model) is None


def test_invalid_rank_and_options_fail_before_training():
    with pytest.raises(LgframeError, match=r"valid ranks are 1\.\.64"):
        get_constraint({"name": "svd", "rank": 65}).attach(create_model("DiT-Pico/2"))
    with pytest.raises(LgframeError, match="sigma_init"):
        get_constraint({"name": "svd", "sigma_init": "magic"})
    with pytest.raises(LgframeError, match="this model's roles are"):
        get_constraint({"name": "svd", "roles": ["attn.qkvv.weight"]}).attach(create_model("DiT-Pico/2"))


def test_attach_is_idempotent_and_refuses_a_second_constraint():
    model = create_model("DiT-Pico/2")
    c = get_constraint("svd")
    c.attach(model)
    n = len(model.state_dict())
    c.attach(model)
    assert len(model.state_dict()) == n


def test_an_int_rank_applies_to_every_role():
    model = create_model("DiT-Pico/2")
    get_constraint({"name": "svd", "rank": 16}).attach(model)
    ranks = {k: f["U"].shape[1] for k, f in getattr(model, BANK).factors.items()}
    assert len(ranks) == 4 and set(ranks.values()) == {16}, ranks
