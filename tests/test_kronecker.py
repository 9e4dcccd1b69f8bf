"""kronecker (WeiT / WAVE): templates, scalers, Van Loan-Pitsianis, descent."""

import pytest
import torch
from helpers import activate

from lgframe.constraint import BANK, ConstrainedLinear, get_constraint
from lgframe.errors import LgframeError
from lgframe.layout import Layout
from lgframe.models import create_model
from lgframe.recipes import load_recipe
from lgframe.run import fit

QUIET = ["trainer.progress=false", "trainer.log_every=1", "ema.enabled=false"]


def kron_stack(L, m, n, a, b, k, g):
    T = torch.randn(k, a, b, generator=g, dtype=torch.float64)
    S = torch.randn(L, k, m // a, n // b, generator=g, dtype=torch.float64)
    return torch.stack([sum(torch.kron(S[l, i], T[i]) for i in range(k)) for l in range(L)]).float()


def test_an_exact_kronecker_sum_stack_round_trips():
    """Weights that are exactly sums of k Kronecker products with shared
    templates come back from attach(init="dense") within 1e-5."""
    g = torch.Generator().manual_seed(0)
    model = create_model("DiT-Pico/2")  # width 64, head dim 32
    layout = Layout(model)
    stacks = {}
    with torch.no_grad():
        for role in layout.select_roles(None):
            L, m, n = role.shape
            stacks[role.name] = kron_stack(L, m, n, 32, 32, 3, g)
            for l, mod in enumerate(layout.role_modules(model, role)):
                mod.weight.copy_(stacks[role.name][l])
    c = get_constraint({"name": "kronecker", "k": 3})
    c.attach(model, init="dense")
    bank = getattr(model, BANK)
    for role in layout.select_roles(None):
        mods = [m for m in c.constrained_layers(model) if m.role == role.name]
        back = torch.stack([bank.weight(m) for m in sorted(mods, key=lambda m: m.layer)])
        assert ((back - stacks[role.name]).norm() / stacks[role.name].norm()) < 1e-5, role.name


def test_factored_forward_equals_the_dense_weight():
    model = activate(create_model("DiT-Pico/2"))
    get_constraint("kronecker").attach(model, init="dense")
    bank = getattr(model, BANK)
    mod = next(m for m in model.modules() if isinstance(m, ConstrainedLinear))
    for tokens in (1, 4096):
        x = torch.randn(tokens, mod.in_features)
        assert torch.allclose(bank.linear(mod, x), torch.nn.functional.linear(x, bank.weight(mod), mod.bias), atol=1e-5)


def test_fewer_templates_lose_more():
    model = activate(create_model("DiT-Pico/2"))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 900]), torch.tensor([0, 3, 10])
    ref = model(x, t, y).detach()
    errs = []
    for k in (2, 8, 32):
        m = activate(create_model("DiT-Pico/2"))
        get_constraint({"name": "kronecker", "k": k}).attach(m, init="dense")
        errs.append(((m(x, t, y) - ref).norm() / ref.norm()).item())
    assert errs[0] > errs[1] > errs[2] > 0


def test_width_that_breaks_the_templates_names_the_nearest_valid_widths():
    model = create_model("DiT-Pico/2")
    c = get_constraint("kronecker")
    c.attach(model)
    lg = c.learngene(model)
    with pytest.raises(LgframeError, match=r"nearest valid widths \(multiples of 96 with 3 heads\): 96"):
        get_constraint("kronecker").descend(lg, create_model("DiT-Pico/2", width=72, heads=3))
    with pytest.raises(LgframeError, match="valid: 'head' or \\[a, b\\]"):
        get_constraint({"name": "kronecker", "template": [0, 4]})


def test_descendant_scalers_interpolate_and_templates_are_shared():
    model = activate(create_model("DiT-Nano/2", depth=6))  # width 128, head dim 32
    c = get_constraint("kronecker")
    c.attach(model, init="dense")
    lg = c.learngene(model)
    child = get_constraint("kronecker").descend(lg, create_model("DiT-Nano/2", depth=3, width=96, heads=3))
    T0 = lg.tensors["learngene/attn.qkv.weight/T"]
    T1 = getattr(child, BANK).factors["attn__qkv"]["T"]
    assert torch.equal(T0, T1) and not T1.requires_grad
    S = [m.S for m in c.constrained_layers(child) if m.role == "attn.qkv.weight"]
    assert len(S) == 3 and S[0].shape == (8, 9, 3)  # k, 3*96/32, 96/32


def test_weit_pretraining_loss_falls(tmp_path):
    res = fit(load_recipe("dit_digits_pretrain_kronecker", [f"out_dir={tmp_path}", "model.name=DiT-Pico/2",
                                                            "trainer.max_steps=60", "trainer.val_every=60", *QUIET]))
    assert res.final_loss < 0.8 * res.initial_loss
    assert res.learngene is not None
