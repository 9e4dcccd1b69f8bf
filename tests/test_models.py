"""Models, size table and layout (lgframe's DiT/ViT and diffusers' DiT)."""

import pytest
import torch
import torch.nn as nn

from lgframe.core.layout import Dims, Layout, resample_depth, select_width, width_index
from lgframe.errors import LgframeError
from lgframe.models.registry import create_model, parse_size, resolve_config


def test_dit_forward_and_adaln_zero_init():
    m = create_model("DiT-Pico/2")
    x = torch.randn(3, 1, 8, 8)
    out = m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert out.abs().max() == 0  # zero final layer: an untrained DiT predicts eps = 0
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in m.blocks)


def test_vit_forward():
    m = create_model("ViT-Pico/2")
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_size_table_names():
    assert resolve_config("DiT-XL/2")["depth"] == 28
    assert resolve_config("DiT-S/4")["patch_size"] == 4
    assert resolve_config("ViT-Ti/16")["width"] == 192
    assert resolve_config("DiT-Nano/2", depth=3)["depth"] == 3
    assert parse_size("depth=8 width=192 heads=6") == (None, {"depth": 8, "width": 192, "heads": 6})
    assert parse_size(["DiT-Pico/2", "depth=2"]) == ("DiT-Pico/2", {"depth": 2})


def test_bad_sizes_name_valid_choices():
    with pytest.raises(LgframeError, match="not divisible by heads 5.*Valid head counts for width 64: \\[1, 2, 4"):
        create_model("DiT-Pico/2", heads=5)
    with pytest.raises(LgframeError, match="unknown size key 'depht'"):
        parse_size("depht=3")


def test_layout_on_lgframe_models():
    lay = Layout(create_model("DiT-Nano/2"))
    assert lay.blocks_path == "blocks" and lay.depth == 6
    assert lay.roles["attn.qkv.weight"].shape == (6, 384, 128)
    assert [r.name for r in lay.select_roles(None)] == ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert "adaLN_modulation.1.weight" in lay.roles  # present, free by default


def test_layout_on_diffusers_dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    lay = Layout(m)
    assert lay.blocks_path == "transformer_blocks" and lay.depth == 3
    assert lay.roles["attn1.to_q.weight"].shape == (3, 32, 32)
    assert lay.roles["ff.net.0.proj.weight"].shape == (3, 128, 32)
    names = [r.name for r in lay.select_roles(None)]
    assert names == ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
                     "ff.net.0.proj.weight", "ff.net.2.weight"]
    assert lay.stack(m, lay.roles["attn1.to_q.weight"]).shape == (3, 32, 32)


def test_layout_needs_repeated_blocks():
    with pytest.raises(LgframeError, match="has no repeated blocks"):
        Layout(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_width_selection_keeps_whole_heads():
    a, b = Dims(128, 4, 512), Dims(96, 4, 384)  # head_dim 32 -> 24
    idx = width_index(3 * 128, 3 * 96, a, b)
    assert idx[:24].tolist() == list(range(24)) and idx[24:48].tolist() == list(range(32, 56))
    assert idx[96:120].tolist() == list(range(128, 152))  # k chunk starts at 128 in the source
    grow = width_index(128, 192, a, Dims(192, 6, 768))  # 4 -> 6 heads of 32
    assert grow[:128].tolist() == list(range(128)) and (grow[128:] == -1).all()
    src = torch.arange(128.0)
    out = select_width(src, torch.full((192,), -7.0), a, Dims(192, 6, 768))
    assert torch.equal(out[:128], src) and (out[128:] == -7).all()


def test_depth_interpolation_endpoints():
    s = torch.arange(6.0)[:, None]
    assert resample_depth(s, 11)[:, 0].tolist() == [i / 2 for i in range(11)]
    assert resample_depth(s, 2)[:, 0].tolist() == [0.0, 5.0]
    assert resample_depth(s, 1)[:, 0].tolist() == [2.5]
