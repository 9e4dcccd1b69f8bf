"""kind (KIND): class-gated SVD, learngene + tailors, decompose, learngene-only transfer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import activate

from lgframe.cli import main
from lgframe.core.constraint import BANK, attached_constraint
from lgframe.core.registry import constraint_class, get_constraint
from lgframe.errors import LgframeError
from lgframe.models.files import read_model, save_model
from lgframe.models.registry import create_model
from lgframe.strategies.kind import decompose
from lgframe.training.recipes import load_recipe

NULL = 10  # DiT-Pico/2 on digits: 10 classes, label 10 = the null class


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.tensor(labels)


def kind_model(**options):
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"))
    get_constraint({"name": "kind", **options}).attach(model)
    with torch.no_grad():  # every tailor active (attach from random already does; make it explicit)
        for m in model.modules():
            if hasattr(m, "sT"):
                m.sT.add_(0.05)
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_a_mixed_batch_equals_each_class_alone(gate):
    model = kind_model(gate=gate)
    x, t, y = inputs([0, 3, 7, NULL, 3])
    together = model(x, t, y)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(len(y))])
    assert (together - alone).abs().max() < 1e-5
    # and the class matters: the same input under another label gives another output
    assert (model(x, t, torch.tensor([1, 1, 1, 1, 1])) - together).abs().max() > 1e-3


def test_the_gate_diverts_each_class_to_its_own_tailors():
    model = kind_model(tailor_rank=3)
    bank = getattr(model, BANK)
    x, t, _ = inputs([0, 0])
    loss = model(x, t, torch.tensor([3, 3])).pow(2).mean()
    loss.backward()
    mod = next(m for m in model.modules() if getattr(m, "role", None) == "mlp.fc1.weight")
    grads = mod.sT.grad.view(10, 3).abs().sum(1)  # per class block
    assert grads[3] > 0 and grads[torch.arange(10) != 3].max() == 0
    assert mod.sG.grad.abs().sum() > 0  # the learngene learns from every class
    assert bank.factors["mlp__fc1"]["UG"].shape == (256, 16) and bank.factors["mlp__fc1"]["UT"].shape == (256, 30)


def test_soft_gate_learns_and_hard_gate_has_no_parameters():
    model = kind_model(gate="soft")
    x, t, y = inputs([0, 5])
    model(x, t, y).pow(2).mean().backward()
    logits = getattr(model, BANK).gate_logits
    assert logits.shape == (10, 20) and logits.grad.abs().sum() > 0
    hard = kind_model()
    assert not any("gate" in n for n, _ in hard.named_parameters())
    groups = get_constraint("kind").param_groups(model)
    assert any(p is logits for p in groups["free"])  # tailors and gate are not the learngene


def test_decompose_keeps_the_named_classes_exactly_and_is_smaller(tmp_path):
    model = kind_model()
    small = decompose(model, [0, 3, 7])
    x, t, y = inputs([0, 3, 7, NULL, 7, 0])
    assert torch.equal(small(x, t, y), model(x, t, y))
    x2, t2, y2 = inputs([1, 2, 5, 9])  # classes without tailors now: learngene only
    assert (small(x2, t2, y2) - model(x2, t2, y2)).flatten(1).abs().max(1).values.min() > 1e-4
    only = decompose(model, [])
    full, kept, lg = n_params(model), n_params(small), n_params(only)
    assert lg < kept < full
    print(f"parameters: full {full}, classes 0,3,7 {kept} ({kept / full:.1%}), learngene only {lg} ({lg / full:.1%})")
    # the decomposed model is a plain lgframe model file: saved, loaded, same outputs
    save_model(small, tmp_path / "small.safetensors")
    back, meta = read_model(tmp_path / "small.safetensors")
    assert meta["constraint"]["options"]["classes"] == [0, 3, 7]
    assert torch.allclose(back(x, t, y), small(x, t, y), atol=1e-6)
    with pytest.raises(LgframeError, match=r"class\(es\) \[4\] own no tailors in this model; its classes with tailors: \[0, 3, 7\]"):
        decompose(small, [3, 4])


def test_learngene_only_model_materializes_to_a_plain_dit():
    model = kind_model()
    with pytest.raises(LgframeError, match="decompose CKPT --learngene-only"):
        get_constraint("kind").materialize(copy.deepcopy(model))
    only = decompose(model, [])
    x, t, y = inputs([0, 4, NULL])
    ref = only(x, t, y).detach()
    plain = get_constraint("kind").materialize(only)
    assert attached_constraint(plain) is None and not plain._forward_pre_hooks
    fresh = create_model("DiT-Pico/2")
    fresh.load_state_dict(plain.state_dict())
    assert torch.allclose(fresh(x, t, y), ref, atol=1e-5)


def test_fresh_tailors_transfer_the_learngene_alone_to_a_new_label_set():
    model = kind_model()
    lg = get_constraint("kind").learngene(model)
    torch.manual_seed(1)
    target = create_model("DiT-Pico/2", num_classes=6, depth=3, width=96, heads=3)
    fresh_table = target.y_embedder.embedding_table.weight.detach().clone()
    with pytest.raises(LgframeError, match="use `tailors: fresh`"):
        constraint_class("kind")().descend(lg, copy.deepcopy(target))
    child = get_constraint({"name": "kind", "tailors": "fresh"}).descend(lg, target)
    spec = attached_constraint(child)
    assert spec.options["classes"] == list(range(6))
    bank = getattr(child, BANK)
    f = bank.factors["attn__qkv"]
    assert f["UT"].shape == (288, 12) and f["UT"].requires_grad and not f["UG"].requires_grad
    assert torch.equal(child.y_embedder.embedding_table.weight, fresh_table)  # new labels: fresh embedding
    # the learngene components are the ancestor's (width-selected: its 2 heads of q come first)
    anc = getattr(model, BANK).factors["attn__qkv"]["UG"].detach()
    assert torch.equal(f["UG"][:64], anc[:64]) and torch.equal(f["UG"][96:160], anc[64:128])
    x, t, y = inputs([0, 5, 6])
    out = child(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_inherited_descent_at_the_same_size_reproduces_the_ancestor():
    model = kind_model(gate="soft")
    child = constraint_class("kind")().descend(get_constraint("kind").learngene(model), create_model("DiT-Pico/2"))
    x, t, y = inputs([0, 3, 9, NULL])
    assert torch.allclose(child(x, t, y), model(x, t, y), atol=1e-5)


def test_a_vit_without_labels_runs_every_tailor():
    torch.manual_seed(0)
    model = create_model("ViT-Pico/2")
    c = get_constraint("kind")
    c.attach(model)
    bank = getattr(model, BANK)
    assert bank.label_arg is None
    mod = next(m for m in model.modules() if getattr(m, "role", None) == "attn.qkv.weight")
    x = torch.randn(2, 17, 64)
    assert torch.allclose(mod(x), F.linear(x, bank.weight(mod), mod.bias), atol=1e-5)
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_bad_options_and_labels_name_the_valid_values():
    for opts, msg in (({"gate": "sparse"}, "valid: hard, soft"), ({"tailors": "keep"}, "valid: inherit, fresh"),
                      ({"tailor_rank": -1}, "an int >= 0"), ({"learngene_rank": 1.5}, "a fraction in \\(0, 1\\]"),
                      ({"classes": [1, 1]}, "distinct class ids")):
        with pytest.raises(LgframeError, match=msg):
            get_constraint({"name": "kind", **opts})
    with pytest.raises(LgframeError, match=r"the model has 10 classes \(valid ids 0..9\)"):
        get_constraint({"name": "kind", "classes": [3, 12]}).attach(create_model("DiT-Pico/2"))


def test_cli_decompose(tmp_path, capsys):
    model = kind_model()
    save_model(model, tmp_path / "anc.safetensors")
    assert main(["decompose", str(tmp_path / "anc.safetensors"), "--classes", "0,3,7", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "tailors of classes 0, 3, 7" in capsys.readouterr().out
    small, _ = read_model(tmp_path / "s.safetensors")
    x, t, y = inputs([3, 7])
    assert torch.allclose(small(x, t, y), model(x, t, y), atol=1e-6)
    assert main(["decompose", str(tmp_path / "anc.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "give either --classes 0,3,7 or --learngene-only" in capsys.readouterr().err


def test_recipes_load():
    pre, tr = load_recipe("dit_digits_pretrain_kind"), load_recipe("dit_shapes_transfer_kind")
    assert pre.constraint.name == tr.constraint.name == "kind" and tr.constraint.tailors == "fresh"
    assert pre.data.name == "digits" and tr.data.name == "shapes"
