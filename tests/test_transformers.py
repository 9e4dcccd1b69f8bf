"""Hugging Face transformers models (issue #25 item 7): a BertModel and a ViTModel,
built from tiny configs (nothing downloads), go through learngene -> descend under
every constraint; the numbers are checked for select, dct and svd."""

import copy
import json
import math

import numpy as np
import pytest
import scipy.fft
import torch

transformers = pytest.importorskip("transformers")

from lgframe.core.layout import Dims, Layout, model_depth, model_dims, model_identity  # noqa: E402
from lgframe.core.registry import constraint_names, get_constraint  # noqa: E402
from lgframe.errors import LgframeError  # noqa: E402
from lgframe.formats.learngene import Learngene  # noqa: E402
from lgframe.models.hf import descend_hf, hf_model  # noqa: E402

BERT_ROLES = ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
              "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight"]
VIT_ROLES = ["attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight",
             "attention.o_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
SMALL = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=1, intermediate_size=32)  # head_dim 16 kept


def bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=50,
               max_position_embeddings=16) | kw
    return transformers.BertModel(transformers.BertConfig(**cfg)).eval()


def vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=64) | kw
    return transformers.ViTModel(transformers.ViTConfig(**cfg)).eval()


# kind: builder, blocks path, roles, an input, a free tensor whose last axis is the width
KINDS = {
    "bert": (bert, "encoder.layer", BERT_ROLES, lambda: torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),
             "embeddings.word_embeddings.weight"),
    "vit": (vit, "layers", VIT_ROLES, lambda: torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
            "embeddings.position_embeddings"),
}


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out.last_hidden_state, out.pooler_output


def stack(model, role):
    lay = Layout(model)
    return torch.stack([m.weight.detach() for m in lay.role_modules(model, lay.roles[role])])


def dense_copy(model):
    """A materialized copy (plain Linears) of a model carrying a constraint."""
    from lgframe.core.constraint import attached_constraint

    return get_constraint(attached_constraint(model).to_dict()).materialize(copy.deepcopy(model))


@pytest.mark.parametrize("kind", KINDS)
def test_layout_reads_the_transformers_config(kind):
    build, path, roles, _, _ = KINDS[kind]
    model = build()
    lay = Layout(model)
    assert lay.blocks_path == path and lay.depth == 4
    assert [r.name for r in lay.select_roles(None)] == roles
    assert lay.roles[roles[0]].shape == (4, 32, 32) and lay.roles[roles[4]].shape == (4, 64, 32)
    assert lay.roles[roles[5]].shape == (4, 32, 64)
    assert model_dims(model) == Dims(width=32, heads=2, hidden=64)
    family, cfg = model_identity(model)
    assert family == f"transformers:{type(model).__name__}"
    assert json.loads(json.dumps(cfg)) == cfg and model_depth(cfg) == 4 and cfg["hidden_size"] == 32
    # roles named in the recipe override the built-in map
    assert [r.name for r in lay.select_roles([roles[0], roles[4]])] == [roles[0], roles[4]]
    with pytest.raises(LgframeError, match=f"unknown role.*this model's roles are: .*{roles[0]}"):
        lay.select_roles(["attn.qkv.weight"])


@pytest.mark.parametrize("kind", KINDS)
def test_select_same_size_reproduces_the_ancestor_through_a_file(kind, tmp_path):
    build, _, roles, inp, _ = KINDS[kind]
    anc, x = build(seed=0), inp()
    lg = get_constraint("select").learngene(anc)
    assert list(lg.roles) == roles and lg.family == f"transformers:{type(anc).__name__}"
    lg.save(tmp_path / "lg")
    lg = Learngene.load(tmp_path / "lg")
    fresh = build(seed=1)
    assert not torch.allclose(run(fresh, x)[0], run(anc, x)[0], atol=1e-3)
    desc = descend_hf(lg, target=fresh)  # a built target model
    for a, b in zip(run(desc, x), run(anc, x)):
        assert torch.allclose(a, b, atol=1e-6)
    again = descend_hf(lg).eval()  # no target: the ancestor's class and config, built here
    assert type(again) is type(anc) and torch.allclose(run(again, x)[0], run(anc, x)[0], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_select_smaller_takes_the_weight_selection_slices(kind):
    build, _, roles, inp, free = KINDS[kind]
    anc = build()
    desc = descend_hf(get_constraint("select").learngene(anc), **SMALL)
    c = desc.config
    assert type(desc) is type(anc) and (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                        c.intermediate_size) == (2, 16, 1, 32)
    # Weight Selection: 32 -> 16 and 64 -> 32 take every second index, depth the first blocks
    for role in (roles[0], roles[3], roles[4], roles[5]):
        assert torch.equal(stack(desc, role), stack(anc, role)[:2, ::2, ::2]), role
    b_anc, b_desc = Layout(anc).blocks(anc), Layout(desc).blocks(desc)
    bias = roles[0].replace(".weight", ".bias")
    assert torch.equal(b_desc[1].get_parameter(bias), b_anc[1].get_parameter(bias)[::2])
    assert torch.equal(desc.get_parameter(free), anc.get_parameter(free)[..., ::2])
    out = run(desc.eval(), inp())[0]
    assert out.shape[-1] == 16 and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_dct_full_block_is_identity_and_smaller_matches_the_transform(kind):
    build, _, roles, inp, _ = KINDS[kind]
    anc, x = build(), inp()
    full = get_constraint({"name": "dct", "keep": [1.0, 1.0, 1.0]}).learngene(anc)
    same = descend_hf(full, target=build(seed=1))
    for role in roles:
        assert torch.allclose(stack(same, role), stack(anc, role), atol=1e-5), role
    assert torch.allclose(run(same, x)[0], run(anc, x)[0], atol=1e-4)

    # default keep [1, 0.5, 0.5] of (4, 32, 32), then the target grid (2, 16, 16):
    # crop, rescale by sqrt(L'm'n' / Lmn), inverse, the ancestor's mean and std, fan-in factor sqrt(32/16)
    desc = descend_hf(get_constraint("dct").learngene(anc), **SMALL)
    W = stack(anc, roles[0]).double().numpy()
    mean, std = W.mean(), W.std()
    Z = scipy.fft.dctn((W - mean) / std, norm="ortho")[:2, :16, :16] * math.sqrt(2 * 16 * 16 / (4 * 32 * 32))
    y = scipy.fft.idctn(Z, norm="ortho")
    want = ((y - y.mean()) / y.std() * std + mean) * math.sqrt(32 / 16)
    assert np.allclose(stack(desc, roles[0]).double().numpy(), want, atol=1e-5)
    assert torch.isfinite(run(desc.eval(), x)[0]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_svd_round_trip_same_size_and_smaller(kind):
    build, _, roles, inp, _ = KINDS[kind]
    svd = get_constraint("svd")
    anc, x = svd.attach(build(), init="random"), inp()  # an ancestor in FINE form, as trained under svd
    lg = svd.learngene(anc)
    U, V, sigma = (lg.tensors[f"{g}/{roles[0]}/{k}"] for g, k in (("learngene", "U"), ("learngene", "V"),
                                                                    ("scalers", "sigma")))
    assert U.shape == (32, 32) and V.shape == (32, 32) and sigma.shape == (4, 32)

    # full rank: the closed form of the materialized (dense) ancestor gives its weights back
    dense = dense_copy(anc)
    before = {r: stack(dense, r) for r in roles}
    errors = get_constraint("svd").attach_dense(dense)
    assert errors["all"] < 1e-5
    for r in roles:
        assert torch.allclose(stack(dense_copy(dense), r), before[r], atol=1e-5), r

    # same size: the descendant computes what the ancestor computes; learngene frozen, sigma trains
    same = descend_hf(lg, target=build(seed=1))
    assert torch.allclose(run(same, x)[0], run(anc, x)[0], atol=1e-5)
    groups = svd.param_groups(same)
    assert groups["learngene"] and not any(p.requires_grad for p in groups["learngene"])
    assert groups["scalers"] and all(p.requires_grad for p in groups["scalers"])
    plain = type(anc)(anc.config).eval()
    plain.load_state_dict(dense_copy(same).state_dict(), strict=True)  # materialized: lgframe-free
    assert torch.allclose(run(plain, x)[0], run(anc, x)[0], atol=1e-5)

    # smaller: the 16 components of largest mean |sigma|, rows of the first head of U and V,
    # sigma interpolated over depth (2 layers of 4: ancestor layers 0 and 3)
    desc = descend_hf(lg, **SMALL)
    keep = sigma.abs().mean(0).argsort(descending=True)[:16].sort().values
    Uk, Vk = U[:16][:, keep], V[:16][:, keep]
    want = torch.stack([(Uk * sigma[l, keep]) @ Vk.T for l in (0, 3)])
    assert torch.allclose(stack(dense_copy(desc), roles[0]), want, atol=1e-5)
    assert torch.isfinite(run(desc.eval(), x)[0]).all()


@pytest.mark.parametrize("name", [n for n in constraint_names() if n != "scratch"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_constraint_descends_into_a_smaller_model(kind, name):
    build, _, roles, inp, _ = KINDS[kind]
    c = get_constraint(name)
    anc = c.attach(build(), init="dense")
    lg = c.learngene(anc)
    assert list(lg.roles) == roles
    desc = descend_hf(lg, depth=2, width=16, heads=1, mlp_hidden=32)  # lgframe's names work too
    assert (desc.config.num_hidden_layers, desc.config.hidden_size) == (2, 16)
    out = run(desc.eval(), inp())[0]
    assert out.shape[-1] == 16 and torch.isfinite(out).all()


def test_roles_override_and_model_types_without_a_role_map():
    two = ["attention.self.query.weight", "intermediate.dense.weight"]
    svd = get_constraint({"name": "svd", "roles": two})
    lg = svd.learngene(svd.attach(bert(), init="random"))
    assert list(lg.roles) == two
    desc = descend_hf(lg, **SMALL)
    assert sorted(n.removeprefix("factors.") for n, _ in desc.lg_bank.named_parameters()) == [
        "attention__self__query.U", "attention__self__query.V", "intermediate__dense.U", "intermediate__dense.V"]
    assert isinstance(Layout(desc).blocks(desc)[0].attention.self.key, torch.nn.Linear)  # not a role: left dense

    torch.manual_seed(0)
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50,
        max_position_embeddings=20))
    with pytest.raises(LgframeError, match="no built-in roles for transformers model_type 'roberta'.*"
                                           "attention.self.query.weight"):
        get_constraint("select").learngene(roberta)
    lg = get_constraint({"name": "select", "roles": ["intermediate.dense.weight"]}).learngene(roberta)
    small = descend_hf(lg, hidden_size=16, num_attention_heads=1)
    assert torch.equal(stack(small, "intermediate.dense.weight"), stack(roberta, "intermediate.dense.weight")[:, :, ::2])


def test_unsupported_transformers_models_are_refused():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                                          bos_token_id=0, eos_token_id=0))
    for fn in (model_identity, Layout, get_constraint("select").learngene):
        with pytest.raises(LgframeError, match=r"GPT2Model \(model_type 'gpt2'\): its config has intermediate_size=None; "
                                               r"lgframe reads .*MLP hidden size from config.intermediate_size"):
            fn(gpt2)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4))
    with pytest.raises(LgframeError, match=r"no repeated blocks where lgframe looks for them \(encoder.layer, layers\); "
                                           r"its ModuleLists are: encoder.layers \(2 blocks\)\. Supported transformers "
                                           r"models: model_type 'bert' with its blocks at encoder.layer"):
        model_identity(clip)
    with pytest.raises(LgframeError, match="cannot read the size of Linear"):
        model_identity(torch.nn.Linear(2, 2))

    lg = get_constraint("select").learngene(bert())
    with pytest.raises(LgframeError, match="comes from a 'transformers:BertModel' model and cannot initialize a "
                                           "'transformers:ViTModel' model"):
        descend_hf(lg, target=vit())
    with pytest.raises(LgframeError, match=r"unknown config key\(s\) \['hidden_szie'\] for BertModel"):
        hf_model(lg, hidden_szie=16)
    with pytest.raises(LgframeError, match="BertModel cannot be built with"):
        hf_model(lg, hidden_size=30, num_attention_heads=4)


def test_lgframe_descend_takes_the_size_of_a_transformers_learngene_as_keywords(tmp_path):
    import lgframe

    lg = get_constraint("select").learngene(bert())
    lg.save(tmp_path / "lg.safetensors")
    small = lgframe.descend(tmp_path / "lg.safetensors", depth=2, width=16, heads=1, mlp_hidden=32)
    assert isinstance(small, transformers.BertModel)
    assert (small.config.num_hidden_layers, small.config.hidden_size, small.config.intermediate_size) == (2, 16, 32)
    ref = descend_hf(lg, **SMALL)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in small.state_dict().items())
    with pytest.raises(LgframeError, match="as keywords"):
        lgframe.descend(lg, "DiT-Pico/2")
