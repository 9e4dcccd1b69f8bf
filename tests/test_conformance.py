"""The contract every registered constraint meets (PEFT-style conformance suite).

Parametrized over the registry: a new constraint file in strategies/ is tested
here without a line added. Constraint-specific behaviour lives in test_<name>.py.
"""

import pytest
import torch
from helpers import activate

from lgframe.core.constraint import BANK, TransformConstraint, attached_constraint
from lgframe.core.registry import constraint_class, constraint_names, get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene
from lgframe.models.registry import create_model

NAMES = constraint_names()
WITH_LEARNGENE = [n for n in NAMES if n != "scratch"]


def inputs(n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 11, (n,), generator=g)


def lossless(name):
    """The constraint with the options under which its round trips are exact."""
    return constraint_class(name)(**constraint_class(name).lossless_options)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", NAMES)
def test_attach_random_runs_and_trains(name):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = get_constraint(name)
    c.attach(model)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_dense_round_trip_at_depth_one(name):
    """attach(init="dense") -> materialize reproduces a dense model (full rank, one layer)."""
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2", depth=1))
    x, t, y = inputs()
    ref = model(x, t, y).detach()
    c = lossless(name)
    c.attach(model, init="dense")
    assert rel(model(x, t, y), ref) < 1e-4
    c.materialize(model)
    assert attached_constraint(model) is None
    plain = create_model("DiT-Pico/2", depth=1)
    plain.load_state_dict(model.state_dict(), strict=True)  # loads without lgframe's constraint
    assert rel(plain(x, t, y), ref) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_partition_the_model(name):
    model = create_model("ViT-Pico/2")
    c = get_constraint(name)
    c.attach(model)
    groups = c.param_groups(model)
    assert set(groups) == {"learngene", "scalers", "free"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_no_dense_copy_beside_shared_tensors(name):
    model = create_model("DiT-Nano/2")
    dense = sum(p.numel() for p in model.parameters())
    c = get_constraint(name)
    c.attach(model)
    sd = model.state_dict()
    if any(k.startswith(BANK) for k in sd):
        assert not any(k.endswith(("attn.qkv.weight", "mlp.fc1.weight")) for k in sd)
        assert sum(v.numel() for v in sd.values()) < dense * 1.05
    else:
        assert sum(v.numel() for v in sd.values()) == dense


@pytest.mark.parametrize("name", WITH_LEARNGENE)
def test_learngene_file_descends_to_other_depth_and_width(name, tmp_path):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Nano/2"))
    c = get_constraint(name)
    c.attach(model)
    st, js = c.learngene(model).save(tmp_path / "lg.safetensors")
    assert st.read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle
    lg = Learngene.load(st, constraint=name, family="dit")
    x, t, y = inputs()
    for size in (dict(depth=3, width=96, heads=3), dict(depth=9, width=192, heads=6), dict(depth=6)):
        child = constraint_class(name)().descend(lg, create_model("DiT-Nano/2", **size))
        out = child(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all(), size


@pytest.mark.parametrize("name", WITH_LEARNGENE)
def test_same_size_descent_reproduces_the_ancestor(name):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    c = lossless(name)
    c.attach(model)
    x, t, y = inputs()
    ref = model(x, t, y).detach()
    child = lossless(name).descend(c.learngene(model), create_model("DiT-Pico/2"))
    assert rel(child(x, t, y), ref) < 1e-4


@pytest.mark.parametrize("name", WITH_LEARNGENE)
def test_learngene_refuses_the_wrong_family(name):
    model = create_model("DiT-Pico/2")
    c = get_constraint(name)
    c.attach(model)
    lg = c.learngene(model)
    with pytest.raises(LgframeError, match="cannot initialize a 'vit' model"):
        constraint_class(name)().descend(lg, create_model("ViT-Pico/2"))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_names_the_valid_ones(name):
    with pytest.raises(LgframeError, match="valid options: .*roles"):
        get_constraint({"name": name, "no_such_option": 1})


@pytest.mark.parametrize("name", WITH_LEARNGENE)
def test_works_on_a_diffusers_dit(name):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)

    def make(layers):
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                     num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)

    model = make(4)
    c = get_constraint(name)
    c.attach(model)
    lg = c.learngene(model)
    child = constraint_class(name)().descend(lg, make(2))
    out = child(torch.randn(2, 1, 8, 8), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_transform_constraints_leave_training_dense():
    for name in NAMES:
        if issubclass(constraint_class(name), TransformConstraint):
            model = create_model("DiT-Pico/2")
            get_constraint(name).attach(model)
            assert not hasattr(model, BANK)
