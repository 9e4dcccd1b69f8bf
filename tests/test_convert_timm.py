"""timm VisionTransformer <-> lgframe ViT: outputs match both ways, any size exports,
unsupported variants and missing folders fail clearly."""

import pytest
import torch
from helpers import activate

from lgframe.cli import main
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.models.convert import from_timm, to_timm
from lgframe.models.files import read_model
from lgframe.models.registry import create_model

timm = pytest.importorskip("timm")

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def timm_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, num_classes=10, in_chans=3, embed_dim=48, depth=3, num_heads=3) | kw
    m = timm.create_model("vit_base_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():
        for p in m.parameters():  # zero-initialized parts (biases, cls token) get values so every part matters
            p.add_(0.05 * torch.randn_like(p))
    return m


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_import_matches_timm_outputs(tmp_path):
    m = timm_vit()
    timm.models.save_for_hf(m, str(tmp_path / "vit"), safe_serialization=True)
    assert main(["import", "timm", str(tmp_path / "vit"), "--out", str(tmp_path / "m.safetensors")]) == 0
    model, _ = read_model(tmp_path / "m.safetensors")
    assert model.config.mlp_act == "gelu" and model.config.depth == 3 and model.config.heads == 3
    assert rel(model.eval()(X), m(X)) < 1e-4


def test_export_any_size_and_constrained_loads_in_timm(tmp_path):
    native = activate(create_model("ViT-Pico/2", depth=2, width=32, heads=2, image_size=16, in_channels=3,
                                   num_classes=7))
    for model in (from_timm(timm_vit()), native):
        get_constraint("svd").attach(model)  # a constrained model: export materializes a copy
        model.eval()
        to_timm(model, tmp_path / "out", overwrite=True)
        back = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
        x = X[:, : model.config.in_channels]
        assert rel(back(x), model(x)) < 1e-4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cli_export_round_trip(tmp_path):
    m = timm_vit(depth=2)
    lg = from_timm(m)
    from lgframe.models.files import save_model

    save_model(lg, tmp_path / "m.safetensors")
    assert main(["export", "timm", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "exp")]) == 0
    assert main(["import", "timm", str(tmp_path / "exp"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back, _ = read_model(tmp_path / "back.safetensors")
    assert rel(back.eval()(X), m(X)) < 1e-5


@pytest.mark.parametrize("kw,expect", [
    (dict(reg_tokens=2), "register tokens"),
    (dict(global_pool="avg", fc_norm=False), "global_pool"),
    (dict(init_values=1e-5), "layer scale"),
    (dict(qk_norm=True), "qk-norm"),
    (dict(class_token=False, global_pool="avg", fc_norm=False), "no class token"),
])
def test_unsupported_variants_are_refused_with_the_reason(kw, expect):
    with pytest.raises(LgframeError, match=expect):
        from_timm(timm_vit(**kw))


def test_bad_sources(tmp_path):
    with pytest.raises(LgframeError, match="no config.json"):
        from_timm(tmp_path / "missing")
    with pytest.raises(LgframeError, match="only lgframe ViTs"):
        to_timm(create_model("DiT-Pico/2"), tmp_path / "x")
    timm.models.save_for_hf(timm_vit(), str(tmp_path / "vit"), safe_serialization=True)
    (tmp_path / "vit" / "model.safetensors").unlink()
    with pytest.raises(LgframeError, match="no model.safetensors"):
        from_timm(tmp_path / "vit")
    assert main(["import", "timm", str(tmp_path / "missing"), "--out", str(tmp_path / "m.safetensors")]) == 1
