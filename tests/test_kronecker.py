"""kronecker (WeiT / WAVE): templates, scalers, Van Loan-Pitsianis, both forward paths, descent, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import activate

from lgframe.core.constraint import BANK, ConstrainedLinear, attached_constraint
from lgframe.core.layout import Layout, model_dims, select_width
from lgframe.core.registry import constraint_class, get_constraint
from lgframe.errors import LgframeError
from lgframe.models.registry import create_model
from lgframe.strategies.kronecker import factored_linear, kron_weight, use_factored
from lgframe.training.recipes import load_recipe


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and spares a shared, busy machine (2 threads
    stalled ~2.6 s per step here when the cores were taken by other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)


def kron_stack(L, m, n, a, b, k, g):
    T = torch.randn(k, a, b, generator=g, dtype=torch.float64)
    S = torch.randn(L, k, m // a, n // b, generator=g, dtype=torch.float64)
    return torch.stack([sum(torch.kron(S[l, i], T[i]) for i in range(k)) for l in range(L)])


def stacks(model):
    lay = Layout(model)
    return {r.name: lay.stack(model, r).clone() for r in lay.select_roles(None)}


def constrained_stack(c, model, role):
    bank = getattr(model, BANK)
    mods = sorted((m for m in c.constrained_layers(model) if m.role == role), key=lambda m: m.layer)
    return torch.stack([bank.weight(m) for m in mods]).detach()


def test_an_exact_kronecker_sum_stack_round_trips():
    """Weights that are exactly sums of k Kronecker products with shared templates
    (here 3 per role, all 4 layers) come back from attach(init="dense") within 1e-5."""
    g = torch.Generator().manual_seed(0)
    model = create_model("DiT-Pico/2")  # width 64, head dim 32
    lay = Layout(model)
    want = {}
    with torch.no_grad():
        for role in lay.select_roles(None):
            L, m, n = role.shape
            want[role.name] = kron_stack(L, m, n, 32, 32, 3, g)
            for l, mod in enumerate(lay.role_modules(model, role)):
                mod.weight.copy_(want[role.name][l])
    c = get_constraint({"name": "kronecker", "k": 3})
    c.attach(model, init="dense")
    for name, W in want.items():
        assert getattr(model, BANK).factors[name[:-7].replace(".", "__")]["T"].shape == (3, 32, 32)
        assert rel(constrained_stack(c, model, name).double(), W) < 1e-5, name


def test_truncation_error_falls_with_k_and_full_is_lossless():
    """Eckart-Young on the stacked rearrangement: more templates, smaller weight error; 'full' is exact."""
    model = activate(create_model("DiT-Pico/2"))
    dense = stacks(model)
    errs = []
    for k in (2, 8, 32, "full"):
        m = copy.deepcopy(model)
        c = get_constraint({"name": "kronecker", "k": k})
        c.attach(m, init="dense")
        errs.append(rel(constrained_stack(c, m, "mlp.fc1.weight"), dense["mlp.fc1.weight"]))
    assert errs[0] > errs[1] > errs[2] > 0.05 and errs[3] < 1e-5, errs


def test_dense_attach_at_depth_one_with_lossless_options_reproduces_the_model():
    model = activate(create_model("DiT-Pico/2", depth=1))
    x, t, y = inputs()
    ref = model(x, t, y).detach()
    cls = constraint_class("kronecker")
    assert cls.lossless_options == {"k": "full"}
    c = cls(**cls.lossless_options)
    c.attach(model, init="dense")
    assert rel(model(x, t, y), ref) < 1e-5
    assert getattr(model, BANK).factors["attn__qkv"]["T"].shape == (12, 32, 32)  # k = L*(192/32)*(64/32)
    c.materialize(model)
    assert attached_constraint(model) is None and rel(model(x, t, y), ref) < 1e-5


def test_random_init_matches_the_dense_init_norms_and_keeps_zero_roles_zero():
    torch.manual_seed(0)
    model = create_model("DiT-Nano/2")
    dense = stacks(model)
    roles = [*dense, "adaLN_modulation.1.weight"]  # adaLN-Zero: zero at init
    c = get_constraint({"name": "kronecker", "roles": roles})
    c.attach(model)
    for name, W in dense.items():
        got = constrained_stack(c, model, name).flatten(1).norm(dim=1)
        assert torch.allclose(got, W.flatten(1).norm(dim=1), rtol=1e-4), name
    assert constrained_stack(c, model, "adaLN_modulation.1.weight").abs().max() == 0
    T = getattr(model, BANK).factors["attn__qkv"]["T"].flatten(1)
    assert torch.allclose(T @ T.T, torch.eye(8), atol=1e-5)  # orthonormal templates


@pytest.mark.parametrize("order", ["templates", "scalers"])
def test_factored_contraction_equals_the_dense_weight(order):
    g = torch.Generator().manual_seed(0)
    S, T = torch.randn(5, 6, 4, generator=g), torch.randn(5, 3, 7, generator=g)
    x = torch.randn(11, 4 * 7, generator=g)
    W = sum(torch.kron(S[i], T[i]) for i in range(5))
    assert torch.allclose(kron_weight(S, T), W, atol=1e-5)
    assert torch.allclose(factored_linear(x, S, T, order), x @ W.T, atol=1e-5)


def test_bank_linear_takes_both_paths_and_both_equal_the_dense_weight():
    model = activate(create_model("DiT-Pico/2"))
    get_constraint("kronecker").attach(model, init="dense")
    bank = getattr(model, BANK)
    mod = next(m for m in model.modules() if isinstance(m, ConstrainedLinear) and m.role == "mlp.fc2.weight")
    k, a, b = bank.of(mod)["T"].shape
    P, Q = mod.S.shape[1:]
    paths = {}
    for tokens in (1, 512):  # few tokens: building W costs more than applying the factors
        paths[tokens] = use_factored(tokens, k, P, Q, a, b)[0]
        x = torch.randn(tokens, mod.in_features)
        ref = F.linear(x, bank.weight(mod), mod.bias)
        assert (bank.linear(mod, x) - ref).abs().max() < 1e-5 * ref.abs().max().clamp_min(1)
    assert paths == {1: True, 512: False}
    # the factored path through the whole model (batched 3-d activations) and its gradient
    x = torch.randn(2, 16, mod.in_features, requires_grad=True)
    assert use_factored(32, k, P, Q, a, b)[0] is False
    y = factored_linear(x.reshape(-1, mod.in_features), mod.S, bank.of(mod)["T"], "scalers").reshape(2, 16, -1)
    y.sum().backward()
    g_fact = x.grad.clone()
    x.grad = None
    F.linear(x, bank.weight(mod)).sum().backward()
    assert torch.allclose(g_fact, x.grad, atol=1e-5)


def test_same_size_descent_is_exact():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint("kronecker")  # default k = 8: same-size descent is exact for any k
    c.attach(model)
    x, t, y = inputs()
    ref = model(x, t, y).detach()
    child = get_constraint("kronecker").descend(c.learngene(model), create_model("DiT-Pico/2"))
    assert rel(child(x, t, y), ref) < 1e-5


def test_narrower_descendant_is_the_ancestor_restricted_to_its_first_heads():
    """width_rule select: whole blocks follow the same whole-head selection as the free
    parameters (rest: select), so at equal depth the descendant is the ancestor with
    every parameter selected by the layout (first heads, first hidden units)."""
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))  # depth 6, width 128, 4 heads of 32
    c = get_constraint("kronecker")
    c.attach(model)
    lg = c.learngene(model)
    anc = get_constraint("kronecker").materialize(copy.deepcopy(model))
    child = get_constraint("kronecker").descend(lg, create_model("DiT-Nano/2", width=96, heads=3))
    T = getattr(child, BANK).factors["attn__qkv"]["T"]
    assert torch.equal(T, lg.tensors["learngene/attn.qkv.weight/T"]) and not T.requires_grad
    mat = get_constraint("kronecker").materialize(copy.deepcopy(child))
    la, lb = Layout(anc), Layout(mat)
    for role in la.select_roles(None):
        A, B = la.stack(anc, role), lb.stack(mat, lb.roles[role.name])
        assert torch.allclose(select_width(A, B, model_dims(anc), model_dims(mat)), B, atol=1e-6), role.name
    ref = create_model("DiT-Nano/2", width=96, heads=3)  # every parameter by the layout's selection
    src = dict(anc.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(select_width(src[name], p.detach(), model_dims(anc), model_dims(ref), name))
    x, t, y = inputs()
    assert rel(child(x, t, y), ref(x, t, y)) < 1e-5


@pytest.mark.parametrize("rule", ["select", "interpolate"])
def test_descendants_of_other_depth_and_width_run(rule):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))
    c = get_constraint("kronecker")
    c.attach(model)
    lg = c.learngene(model)
    x, t, y = inputs()
    # shrink, grow, grow with a head dim (48) the 32x32 template does not divide (interpolation fallback)
    for size, qkv in ((dict(depth=3, width=96, heads=3), (8, 9, 3)), (dict(depth=9, width=192, heads=6), (8, 18, 6)),
                      (dict(depth=4, width=192, heads=4), (8, 18, 6))):
        child = get_constraint({"name": "kronecker", "width_rule": rule}).descend(lg, create_model("DiT-Nano/2", **size))
        S = [m.S for m in get_constraint("kronecker").constrained_layers(child) if m.role == "attn.qkv.weight"]
        assert len(S) == size["depth"] and S[0].shape == qkv
        out = child(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all(), size
        assert all(torch.isfinite(m.S).all() and m.S.abs().sum() > 0 for m in child.modules() if isinstance(m, ConstrainedLinear))


def test_growing_by_selection_keeps_new_inputs_silent():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))  # width 64, 2 heads
    c = get_constraint("kronecker")
    c.attach(model)
    child = get_constraint("kronecker").descend(c.learngene(model), create_model("DiT-Pico/2", width=128, heads=4))
    S_anc = [m.S.detach() for m in c.constrained_layers(model) if m.role == "attn.proj.weight"]
    for m in get_constraint("kronecker").constrained_layers(child):
        if m.role == "attn.proj.weight":  # (k, 4, 4): rows/cols 0-1 inherited, new rows alive, new cols zero
            assert torch.equal(m.S[:, :2, :2], S_anc[m.layer])
            assert m.S[:, :, 2:].abs().max() == 0 and m.S[:, 2:, :2].abs().min() > 0


def test_invalid_width_names_the_nearest_valid_widths_before_training():
    model = create_model("DiT-Pico/2")  # head dim 32 -> 32x32 templates
    c = get_constraint("kronecker")
    c.attach(model)
    lg = c.learngene(model)
    with pytest.raises(LgframeError, match=r"width 100 is not a multiple of the learngene's template 32x32 for role "
                                           r"attn\.qkv\.weight \(300x100\); nearest valid widths with 4 heads: 96, 128"):
        get_constraint("kronecker").descend(lg, create_model("DiT-Pico/2", width=100, heads=4))
    with pytest.raises(LgframeError, match=r"nearest valid widths with 3 heads: 96$"):
        get_constraint("kronecker").descend(lg, create_model("DiT-Pico/2", width=72, heads=3))
    with pytest.raises(LgframeError, match="template 24x24 does not tile role"):
        get_constraint({"name": "kronecker", "template": [24, 24]}).attach(create_model("DiT-Pico/2"))


def test_bad_options_name_the_valid_values():
    for opts, msg in (({"template": [0, 4]}, r"valid: 'head' or \[a, b\]"), ({"k": 0}, "valid: a positive int or 'full'"),
                      ({"k": "all"}, "'full'"), ({"width_rule": "crop"}, "valid: select, interpolate")):
        with pytest.raises(LgframeError, match=msg):
            get_constraint({"name": "kronecker", **opts})


def test_training_under_the_constraint_lowers_the_loss():
    """30 Adam steps regressing a DiT-Pico's output on a fixed batch to a fixed target."""
    torch.manual_seed(0)
    model = create_model("DiT-Pico/2")
    get_constraint("kronecker").attach(model)
    x, t, y = inputs(8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert getattr(model, BANK).factors["mlp__fc1"]["T"].grad.abs().sum() > 0  # the templates train too


def test_recipe_loads_with_the_kronecker_constraint():
    cfg = load_recipe("dit_digits_pretrain_kronecker")
    base = load_recipe("dit_digits_pretrain")
    assert cfg.constraint.name == "kronecker" and cfg.constraint.k == 8 and cfg.constraint.template == "head"
    assert cfg.model == base.model and cfg.optim == base.optim and cfg.trainer == base.trainer
    c = get_constraint(dict(cfg.constraint))
    assert c.options.k == 8
