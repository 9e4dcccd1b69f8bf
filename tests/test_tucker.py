"""tucker (SWEET): round trips, factored forward, descent, groups, errors,
training, and width-wise stochastic scaling (nested widths)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import activate

from lgframe.core.constraint import BANK, attached_constraint
from lgframe.core.layout import Layout, model_dims, select_width
from lgframe.core.registry import constraint_class, get_constraint
from lgframe.errors import LgframeError
from lgframe.models.registry import create_model
from lgframe.strategies.tucker import nested_rows, nested_width, sample_width_ratio, tucker_decompose


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine
    the spinning threads made these tests 10-70x slower (30 Adam steps: 0.4 s -> 30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dit_inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)


def selected_dense(model, name="DiT-Nano/2", **size):
    """The dense model of `size` whose every tensor is the consistent width
    selection of `model` (materialized), the sub-network a nested width runs."""
    dense = copy.deepcopy(model)
    get_constraint("tucker").materialize(dense)
    small = create_model(name, **size)
    a, b, sd = model_dims(dense), model_dims(small), dense.state_dict()
    with torch.no_grad():
        for n, p in small.named_parameters():
            p.copy_(select_width(sd[n], p.detach(), a, b, n))
    return small


# ------------------------------------------------------------------ round trips
def test_full_rank_dense_round_trip(caplog):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    lay = Layout(model)
    dense = {r.name: lay.stack(model, r).clone() for r in lay.select_roles(None)}
    x, t, y = dit_inputs()
    ref = model(x, t, y).detach()
    c = get_constraint({"name": "tucker", "ranks": "full"})
    with caplog.at_level(logging.INFO, logger="lgframe"):
        c.attach(model, init="dense")
    assert "attn.qkv.weight (L=4, 192x64, ranks [4, 192, 64]) dense relative error" in caplog.text
    assert attached_constraint(model).options["ranks"]["mlp.fc2.weight"] == [4, 64, 256]  # resolved on the model
    assert rel(model(x, t, y), ref) < 1e-4
    c.materialize(model)
    for name, W in dense.items():
        assert rel(Layout(model).stack(model, Layout(model).roles[name]), W) < 1e-4, name


def test_reduced_ranks_error_falls_with_rank():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 96, 32, generator=g)
    errs = [tucker_decompose(stack, (4, q, s))[2] for q, s in ((8, 4), (16, 8), (32, 16), (64, 24))]
    assert all(0.05 < e < 1 for e in errs), errs
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert tucker_decompose(stack, (4, 96, 32))[2] < 1e-10
    # fractions of each mode's bound resolve to ints; a rank above the product of the others is capped
    model = create_model("DiT-Pico/2")
    c = get_constraint({"name": "tucker", "ranks": {"attn.qkv.weight": [1.0, 0.5, 0.5], "mlp.fc1.weight": [1, "full", 1.0]}})
    c.attach(model, init="dense")
    ranks = attached_constraint(model).options["ranks"]  # resolved on the model; the options stay as given
    assert ranks["attn.qkv.weight"] == [4, 96, 32]
    assert ranks["mlp.fc1.weight"] == [1, 64, 64]  # q <= p * s
    assert ranks["attn.proj.weight"] == [4, 64, 64]  # default "layer"
    assert tuple(getattr(model, BANK).factors["attn__qkv"]["G"].shape) == (4, 96, 32)


def test_factored_forward_matches_built_weight():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint("tucker")
    c.attach(model)
    bank = getattr(model, BANK)
    mod = model.blocks[1].attn.qkv
    # 1 token applies the factors to the activations, 4096 tokens build W first
    for x in (torch.randn(1, 1, 64), torch.randn(64, 64, 64)):
        assert rel(bank.linear(mod, x), F.linear(x, bank.weight(mod), mod.bias)) < 1e-5
    x, t, y = dit_inputs()
    out = model(x, t, y).detach()
    c.materialize(model)
    assert rel(model(x, t, y), out) < 1e-5
    # a materialized tucker stack shares its row and column spaces: default ranks re-attach it exactly
    get_constraint("tucker").attach(model, init="dense")
    assert rel(model(x, t, y), out) < 1e-4


def test_no_dense_copy_and_default_ranks_cost_less_than_dense():
    model = create_model("DiT-Nano/2")
    dense = sum(p.numel() for p in model.parameters())
    get_constraint("tucker").attach(model)
    sd = model.state_dict()
    assert not any(k.endswith(".weight") and ("attn.qkv" in k or "mlp.fc" in k) for k in sd)
    d, L = 128, 6
    # "layer" ranks (L, d, d): per role G L*d*d, B m*d, C n*d, A L*L (one row per layer)
    expect_roles = 4 * L * d * d + (3 + 1 + 4 + 1) * d * d + (1 + 1 + 1 + 4) * d * d + 4 * L * L
    dense_roles = 12 * d * d * L
    assert sum(v.numel() for v in sd.values()) == dense - dense_roles + expect_roles
    assert expect_roles < 0.6 * dense_roles


# ------------------------------------------------------------------ descent
@pytest.fixture(scope="module")
def ancestor():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))
    c = get_constraint("tucker")
    c.attach(model)
    return model, c.learngene(model)


def descend(lg, **size):
    return constraint_class("tucker")().descend(lg, create_model("DiT-Nano/2", **size))


def test_same_size_descent_is_exact(ancestor):
    model, lg = ancestor
    child = descend(lg)
    x, t, y = dit_inputs()
    assert rel(child(x, t, y), model(x, t, y)) < 1e-5
    assert torch.equal(getattr(child, BANK).factors["mlp__fc1"]["G"], getattr(model, BANK).factors["mlp__fc1"]["G"])


@pytest.mark.parametrize(
    "size",
    [dict(depth=3), dict(depth=9), dict(width=64, heads=2), dict(width=192, heads=6), dict(depth=2, width=96, heads=3)],
    ids=["shallower", "deeper", "narrower", "wider", "shallower-narrower"],
)
def test_descend_to_other_sizes(ancestor, size):
    model, lg = ancestor
    child = descend(lg, **size)
    cfg = child.config
    x, t, y = dit_inputs()
    out = child(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    bank = getattr(child, BANK)
    G, B, C = (bank.factors["attn__qkv"][k] for k in "GBC")
    # ranks capped by the target: p <= L', q <= 3 width', s <= width'
    assert tuple(G.shape) == (min(6, cfg.depth), 128, min(128, cfg.width))
    assert B.shape == (3 * cfg.width, 128) and C.shape == (cfg.width, min(128, cfg.width))
    assert not G.requires_grad and B.requires_grad and C.requires_grad
    assert child.blocks[0].attn.qkv.A.shape == (min(6, cfg.depth),)


def test_deeper_descent_interpolates_depth_scalers_and_copies_the_core(ancestor):
    model, lg = ancestor
    child = descend(lg, depth=11)  # positions 0, 0.5, 1, ... over the ancestor's 6 layers
    a0, a1 = model.blocks[0].attn.proj.A, model.blocks[1].attn.proj.A
    assert torch.allclose(child.blocks[0].attn.proj.A, a0)
    assert torch.allclose(child.blocks[1].attn.proj.A, (a0 + a1) / 2, atol=1e-6)
    assert torch.allclose(child.blocks[-1].attn.proj.A, model.blocks[-1].attn.proj.A)
    assert torch.equal(getattr(child, BANK).factors["attn__proj"]["G"], getattr(model, BANK).factors["attn__proj"]["G"])


def test_wider_descent_keeps_the_ancestor_block_and_zero_new_inputs(ancestor):
    model, lg = ancestor
    child = descend(lg, width=192, heads=6)
    W_a = getattr(model, BANK).weight(model.blocks[2].mlp.fc2).detach()  # (128, 512)
    W_c = getattr(child, BANK).weight(child.blocks[2].mlp.fc2).detach()  # (192, 768)
    rows = torch.arange(128)  # heads 0..3 of the residual width
    cols = torch.cat([torch.arange(128) + c * 192 for c in range(4)])  # hidden 512 -> 768, 4 chunks of the width
    assert rel(W_c[rows][:, cols], W_a) < 1e-5
    new_cols = torch.ones(768, dtype=torch.bool)
    new_cols[cols] = False
    assert W_c[:, new_cols].abs().max() == 0  # new input features start unread
    assert W_c[128:].abs().sum() > 0  # new output features are alive


def test_narrower_descent_equals_the_nested_ancestor(ancestor):
    """Same depth, width 64: the descendant's weights are exactly the ancestor's
    consistent selection although ranks shrink (s 128 -> 64, folded into the core),
    and the ancestor under nested_width(0.5) computes that same narrower model."""
    model, lg = ancestor
    child = descend(lg, width=64, heads=2)
    small = selected_dense(model, width=64, heads=2)
    for i in (0, 5):
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            W = getattr(child, BANK).weight(child.blocks[i].get_submodule(path))
            assert rel(W, small.blocks[i].get_submodule(path).weight) < 1e-5, path
    x, t, y = dit_inputs()
    with nested_width(model, 0.5) as dims:
        nested = model(x, t, y)
    assert (dims.width, dims.heads, dims.hidden) == (64, 2, 256)
    assert rel(nested, small(x, t, y)) < 1e-5
    with torch.no_grad():  # a descendant keeps its own fixed sin-cos table; give it the ancestor's slice
        child.pos_embed.copy_(small.pos_embed)
    assert rel(child(x, t, y), nested) < 1e-5
    assert rel(model(x, t, y), nested) > 0.1  # outside the context the full width runs again


def test_nested_width_on_a_vit_with_affine_norms_and_class_token():
    torch.manual_seed(0)
    model = create_model("ViT-Nano/2")
    get_constraint("tucker").attach(model)
    with torch.no_grad():  # trained-looking norms: affine weights and biases off their init
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    small = selected_dense(model, "ViT-Nano/2", width=96, heads=3)
    x = torch.randn(4, 1, 8, 8)
    with nested_width(model, 0.75):
        nested = model(x)
    assert rel(nested, small(x)) < 1e-5


# ------------------------------------------------------------------ groups and files
def test_param_groups_and_learngene_file_groups(tmp_path):
    model = create_model("ViT-Pico/2")
    c = get_constraint("tucker")
    c.attach(model)
    groups = c.param_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    bank = getattr(model, BANK)
    G = {id(f["G"]) for f in bank.factors.values()}
    BC = {id(f[k]) for f in bank.factors.values() for k in "BC"}
    assert {id(p) for p in groups["learngene"]} == G  # 4 roles
    assert BC <= {id(p) for p in groups["scalers"]}
    assert len(groups["scalers"]) == 4 * 2 + 4 * 4  # B, C of 4 roles + A of 4 roles x 4 layers
    lg = c.learngene(model)
    assert set(lg.group("learngene")) == {f"{r}/G" for r in lg.roles}
    assert set(lg.group("scalers")) == {f"{r}/{k}" for r in lg.roles for k in "ABC"}
    assert lg.group("scalers")["attn.qkv.weight/A"].shape == (4, 4)


def test_cores_train_at_core_lr_times_the_rate():
    from lgframe.training.recipes import load_recipe, to_plain
    from lgframe.training.tasks import ClassificationTask

    def lrs(*over):
        r = to_plain(load_recipe("vit_digits_pretrain", ["model.name=ViT-Pico/2", *over]))
        task = ClassificationTask(r, create_model("ViT-Pico/2"))
        task.configure_model()
        opt = task.configure_optimizers()["optimizer"]
        return {g["name"]: g["initial_lr"] if "initial_lr" in g else g["lr"] for g in opt.param_groups}

    assert lrs("constraint=tucker") == {"learngene": pytest.approx(3e-4), "scalers": 3e-3, "free": 3e-3}
    assert lrs("constraint={name: tucker, core_lr: 1}")["learngene"] == 3e-3
    assert lrs("constraint=tucker", "optim.learngene_lr=1e-3")["learngene"] == 1e-3  # an explicit rate wins
    assert lrs("constraint=svd")["learngene"] == 3e-3  # other constraints: one rate
    with pytest.raises(LgframeError, match="core_lr=0; valid: a number > 0"):
        get_constraint({"name": "tucker", "core_lr": 0})


@pytest.mark.slow  # two 200-step ViT-Pico ancestors: about 2 minutes
def test_vit_ancestor_leaves_the_plateau_with_the_core_rate(tmp_path):
    """Measured: validation accuracy after 200 steps (ViT recipe, lr 3e-3)
    0.15 with core_lr 1 (the cores at the full rate), 0.50 with the default 0.1."""
    from lgframe.training.recipes import load_recipe
    from lgframe.training.stages import fit

    acc = {}
    for core_lr in (1.0, 0.1):
        res = fit(load_recipe("vit_digits_pretrain", [
            f"out_dir={tmp_path}", f"name=c{core_lr}", "model.name=ViT-Pico/2", f"constraint={{name: tucker, core_lr: {core_lr}}}",
            "trainer.max_steps=200", "trainer.val_every=200", "trainer.progress=false", "ema.enabled=false"]))
        acc[core_lr] = res.acc_curve[-1][1]
    print(f"tucker ViT-Pico accuracy after 200 steps: core_lr 1 {acc[1.0]:.3f}, core_lr 0.1 {acc[0.1]:.3f}")
    assert acc[0.1] > 0.35 and acc[0.1] > acc[1.0] + 0.15


# ------------------------------------------------------------------ errors
def test_rank_too_large_names_the_valid_range():
    with pytest.raises(LgframeError, match=r"valid ranks are p in 1\.\.4, q in 1\.\.192, s in 1\.\.64"):
        get_constraint({"name": "tucker", "ranks": [4, 500, 64]}).attach(create_model("DiT-Pico/2"))
    with pytest.raises(LgframeError, match=r"p in 1\.\.4"):
        get_constraint({"name": "tucker", "ranks": {"attn.proj.weight": [5, 8, 8]}}).attach(create_model("DiT-Pico/2"))
    with pytest.raises(LgframeError, match=r"valid: 'layer' \(default\), 'full'"):
        get_constraint({"name": "tucker", "ranks": [4, 8]})
    with pytest.raises(LgframeError, match=r"valid: 'layer' \(default\), 'full'"):
        get_constraint({"name": "tucker", "ranks": [4, 1.5, 8]})


def test_widths_that_break_heads_fail_before_training():
    model = create_model("DiT-Nano/2")  # 4 heads of 32
    with pytest.raises(LgframeError, match=r"keeps whole attention heads; valid ratios for this model: 0\.25, 0\.5, 0\.75, 1"):
        get_constraint({"name": "tucker", "width_ratios": [0.5, 0.3, 1.0]}).attach(model)
    assert not hasattr(model, BANK)  # refused before anything changed
    with pytest.raises(LgframeError, match="gives 80 features"):
        with nested_width(model, 0.625):
            pass
    with pytest.raises(LgframeError, match="width_ratios"):
        get_constraint({"name": "tucker", "width_ratios": [0.0, 1.0]})


def test_nested_rows_keep_whole_heads():
    model = create_model("DiT-Nano/2")
    lay, dims = Layout(model), model_dims(model)
    rows, cols = nested_rows(lay.roles["attn.qkv.weight"], dims, 0.5)
    assert torch.equal(rows, torch.cat([torch.arange(64) + c * 128 for c in range(3)]))  # heads 0, 1 of q, k, v
    assert torch.equal(cols, torch.arange(64))
    rows, cols = nested_rows(lay.roles["mlp.fc2.weight"], dims, 0.75)
    assert torch.equal(rows, torch.arange(96)) and cols.numel() == 384


# ------------------------------------------------------------------ training
def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint("tucker")
    c.attach(model)
    x, t, y = dit_inputs(8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    G0 = getattr(model, BANK).factors["mlp__fc1"]["G"].detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert (getattr(model, BANK).factors["mlp__fc1"]["G"] - G0).abs().max() > 1e-3  # the core trains


def test_stochastic_width_steps_train_the_nested_rows_only():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))
    c = get_constraint({"name": "tucker", "width_ratios": [0.5, 1.0]})
    c.attach(model)
    # step_context seeds its draw with the step, so every rank draws the same ratio
    draws = [sample_width_ratio([0.5, 1.0], torch.Generator().manual_seed(s)) for s in range(20)]
    assert 0 < draws.count(0.5) < 20
    step = draws.index(0.5)
    x, t, y = dit_inputs()
    full = model(x, t, y).detach()
    model.eval()
    with c.step_context(model, step):  # evaluation always runs the full width
        assert torch.equal(model(x, t, y), full)
    model.train()
    with c.step_context(model, step) as dims:
        assert dims.width == 64
        model(x, t, y).pow(2).mean().backward()
    bank = getattr(model, BANK)
    B, C = bank.factors["attn__qkv"]["B"], bank.factors["attn__qkv"]["C"]
    rows, _ = nested_rows(Layout(model).roles["attn.qkv.weight"], model_dims(model), 0.5)
    outside = torch.ones(384, dtype=torch.bool)
    outside[rows] = False
    assert B.grad[outside].abs().max() == 0 and B.grad[rows].abs().sum() > 0
    assert C.grad[64:].abs().max() == 0 and C.grad[:64].abs().sum() > 0
    assert bank.factors["attn__qkv"]["G"].grad.abs().sum() > 0
