"""Import and export: diffusers `DiTTransformer2DModel` <-> lgframe's DiT, and
timm `VisionTransformer` <-> lgframe's ViT.

Name mapping (diffusers -> lgframe), per block i:

| diffusers | lgframe |
|---|---|
| pos_embed.proj | x_embedder.proj |
| transformer_blocks.0.norm1.emb.timestep_embedder.linear_1 / linear_2 | t_embedder.mlp.0 / mlp.2 |
| transformer_blocks.0.norm1.emb.class_embedder.embedding_table | y_embedder.embedding_table |
| transformer_blocks.i.norm1.linear | blocks.i.adaLN_modulation.1 |
| transformer_blocks.i.attn1.to_q / to_k / to_v (rows stacked) | blocks.i.attn.qkv |
| transformer_blocks.i.attn1.to_out.0 | blocks.i.attn.proj |
| transformer_blocks.i.ff.net.0.proj / ff.net.2 | blocks.i.mlp.fc1 / mlp.fc2 |
| proj_out_1 / proj_out_2 | final_layer.adaLN_modulation.1 / final_layer.linear |

diffusers keeps a timestep/class embedder in every block (copies of DiT's one
shared embedder in converted checkpoints); lgframe's DiT has one, so import
checks that all blocks carry the same embedder and says so otherwise. The
timestep embedding of diffusers' DiT uses a frequency shift of 1
(`freq_shift` in the config). Nothing downloads: `from_pretrained` reads a
local directory only.

timm's ViT and lgframe's ViT use the same parameter names, so the mapping is
the identity: `patch_embed.proj`, `cls_token`, `pos_embed` (class position
first), `blocks.i.norm1`, `blocks.i.attn.qkv` (fused, rows [q | k | v] by
head), `blocks.i.attn.proj`, `blocks.i.norm2`, `blocks.i.mlp.fc1 / fc2`,
`norm`, `head`. lgframe represents the classic ViT only: class-token pooling,
LayerNorm (eps 1e-6) pre-norm blocks, biased qkv, GELU (exact or tanh), learned
positions that include the class token; timm variants outside it (register
tokens, average pooling / fc_norm, layer scale, qk-norm, norm_pre, no class
token, positions without the class token, dynamic image size, attention
pooling, other norms or activations) are refused with the reason. A timm folder
is the layout `timm.models.save_for_hf` writes and `timm.create_model(
"local-dir:PATH")` reads: `config.json` (architecture, num_classes,
model_args) and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint
from lgframe.formats.files import atomic_dir
from lgframe.models.dit import DiT, DiTConfig
from lgframe.models.vit import ViT, ViTConfig

EMB = "transformer_blocks.{i}.norm1.emb."
TOP = {
    "pos_embed.proj.weight": "x_embedder.proj.weight",
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    EMB + "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    EMB + "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    EMB + "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    EMB + "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    EMB + "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight",
    "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
    "proj_out_2.weight": "final_layer.linear.weight",
    "proj_out_2.bias": "final_layer.linear.bias",
}
BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


def _load_diffusers(source) -> nn.Module:
    from diffusers import DiTTransformer2DModel  # deferred: diffusers (seconds to import)

    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not (path / "config.json").is_file():
        raise LgframeError(f"'{path}' is not a diffusers model directory (no config.json); give a local folder "
                           "saved by DiTTransformer2DModel.save_pretrained. Nothing is downloaded.")
    try:
        if (path / "diffusion_pytorch_model.safetensors").is_file():
            return DiTTransformer2DModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        weights = path / "diffusion_pytorch_model.bin"
        if not weights.is_file():
            raise LgframeError(f"'{path}' has no diffusion_pytorch_model.safetensors (or .bin) beside its config.json")
        # A .bin is a pickle: read here with weights_only=True, never through a library's own loader.

        model = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(str(path)))
        model.load_state_dict(load_checkpoint(weights, "diffusers weights file"), strict=True)
        return model
    except LgframeError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise LgframeError(f"diffusers could not load the DiT in '{path}': {str(e).splitlines()[0]}") from None


def from_diffusers(source) -> DiT:
    """An lgframe DiT with the weights of a diffusers DiTTransformer2DModel (module or local directory)."""
    src = _load_diffusers(source)
    c = src.config
    wrong = {k: c.get(k) for k, v in {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
                                      "attention_bias": True, "norm_elementwise_affine": False}.items() if c.get(k) != v}
    if wrong or not c.get("num_embeds_ada_norm"):
        raise LgframeError(f"only class-conditional adaLN-Zero DiTs import; this config differs: {wrong or 'no classes'}")
    cfg = DiTConfig(depth=c.num_layers, width=c.num_attention_heads * c.attention_head_dim, heads=c.num_attention_heads,
                    patch_size=c.patch_size, image_size=c.sample_size, in_channels=c.in_channels,
                    num_classes=c.num_embeds_ada_norm, out_channels=c.out_channels or c.in_channels, freq_shift=1)
    sd = src.state_dict()
    for i in range(1, cfg.depth):  # one shared embedder in lgframe
        for k in TOP:
            if k.startswith(EMB) and not torch.equal(sd[k.format(i=i)], sd[k.format(i=0)]):
                raise LgframeError(
                    f"block {i} has its own timestep/class embedder ('{k.format(i=i)}' differs from block 0's); "
                    "lgframe's DiT shares one, as the original DiT and checkpoints converted from it do."
                )
    out = {v: sd[k.format(i=0)] for k, v in TOP.items()}
    for i in range(cfg.depth):
        p = f"transformer_blocks.{i}."
        for k, v in BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{v}.{leaf}"] = sd[f"{p}{k}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}attn1.to_{x}.{leaf}"] for x in "qkv"])
    model = DiT(cfg)
    out["pos_embed"] = model.pos_embed.detach()
    model.load_state_dict(out, strict=True)
    return model


def to_diffusers(model: nn.Module, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> nn.Module:
    """A diffusers DiTTransformer2DModel with the weights of an lgframe DiT (any size;
    a constrained model is materialized on a copy first). Saved to `out_dir` if given."""
    from diffusers import DiTTransformer2DModel  # deferred: diffusers (seconds to import)

    if getattr(model.config, "family", None) != "dit":
        raise LgframeError("only lgframe DiTs export to diffusers")
    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(copy.deepcopy(model))
    c = model.config
    if c.freq_shift != 1:
        raise LgframeError(
            f"this DiT uses timestep frequency shift {c.freq_shift}; diffusers' DiT hard-wires 1, so its outputs would "
            "differ. Train with model config freq_shift=1 (or import from diffusers) to export."
        )
    dst = DiTTransformer2DModel(num_attention_heads=c.heads, attention_head_dim=c.width // c.heads,
                                in_channels=c.in_channels, out_channels=model.out_channels, num_layers=c.depth,
                                sample_size=c.image_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes)
    sd = model.state_dict()
    out = {}
    for i in range(c.depth):
        for k, v in TOP.items():
            out[k.format(i=i)] = sd[v]
        p = f"transformer_blocks.{i}."
        for k, v in BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"{p}{k}.{leaf}"] = sd[f"blocks.{i}.{v}.{leaf}"]
        for leaf in ("weight", "bias"):
            for x, t in zip("qkv", sd[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3)):
                out[f"{p}attn1.to_{x}.{leaf}"] = t
    dst.load_state_dict(out, strict=True)
    if out_dir is not None:

        with atomic_dir(out_dir, replace=overwrite) as tmp:
            dst.save_pretrained(str(tmp), safe_serialization=True)
    return dst


# ------------------------------------------------------------------ timm ViT
TIMM_ARCH = "vit_base_patch16_224"  # the registered architecture exports name; model_args give the size


def _timm():
    try:
        import timm  # deferred: timm (optional extra)
    except ImportError:
        raise LgframeError("timm is not installed: pip install 'lgframe[timm]' (or pip install timm)") from None
    return timm


def _load_timm(source) -> nn.Module:
    timm = _timm()
    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not (path / "config.json").is_file():
        raise LgframeError(f"'{path}' is not a timm model folder (no config.json); give a local folder as written by "
                           "timm.models.save_for_hf (config.json + model.safetensors). Nothing is downloaded.")
    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=False)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise LgframeError(f"timm could not build the model described by {path / 'config.json'}: {e}") from None
    if (path / "model.safetensors").is_file():

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():

        state = load_checkpoint(path / "pytorch_model.bin", "timm weights file")
    else:
        raise LgframeError(f"{path} has no model.safetensors or pytorch_model.bin")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LgframeError(f"the weights in {path} do not fit its config.json: {str(e).splitlines()[0]}") from None
    return model


def _timm_differences(m: nn.Module) -> list[str]:
    """What in a timm ViT lgframe's ViT cannot represent (empty: it converts exactly)."""
    from timm.layers import LayerNorm as TimmLayerNorm  # deferred: timm (optional extra)

    def identity(mod) -> bool:
        return mod is None or isinstance(mod, nn.Identity)

    def layernorm(mod) -> bool:
        return isinstance(mod, (nn.LayerNorm, TimmLayerNorm)) and mod.elementwise_affine and abs(mod.eps - 1e-6) < 1e-12

    why = []
    if type(m).__name__ != "VisionTransformer":
        return [f"a {type(m).__name__}, not timm's VisionTransformer"]
    if getattr(m, "cls_token", None) is None:
        why.append("no class token")
    if getattr(m, "num_reg_tokens", 0):
        why.append(f"{m.num_reg_tokens} register tokens")
    if getattr(m, "global_pool", "token") != "token":
        why.append(f"global_pool={m.global_pool!r} (lgframe pools the class token)")
    if getattr(m, "no_embed_class", False):
        why.append("positions without the class token (no_embed_class)")
    if getattr(m, "pos_embed", None) is None:
        why.append("no learned position embedding")
    if getattr(m, "dynamic_img_size", False):
        why.append("dynamic image size")
    if getattr(m, "attn_pool", None) is not None:
        why.append("attention pooling")
    for name in ("norm_pre", "fc_norm"):
        if not identity(getattr(m, name, None)):
            why.append(name)
    if not identity(getattr(m.patch_embed, "norm", None)) or m.patch_embed.proj.bias is None:
        why.append("patch embedding with a norm or without bias")
    if not layernorm(m.norm):
        why.append(f"final norm {type(m.norm).__name__}")
    if not isinstance(m.head, nn.Linear):
        why.append("no linear classifier head (num_classes=0)")
    for i, b in enumerate(m.blocks):
        parts = []
        if type(b).__name__ != "Block":
            parts.append(type(b).__name__)
        else:
            if not (layernorm(b.norm1) and layernorm(b.norm2)):
                parts.append("norms other than LayerNorm eps 1e-6")
            if not (identity(b.ls1) and identity(b.ls2)):
                parts.append("layer scale (init_values)")
            a = b.attn
            if not (identity(getattr(a, "q_norm", None)) and identity(getattr(a, "k_norm", None))):
                parts.append("qk-norm")
            if not identity(getattr(a, "norm", None)):
                parts.append("attention output norm")
            if a.qkv.bias is None:
                parts.append("qkv without bias")
            mlp = b.mlp
            if type(mlp).__name__ != "Mlp" or not identity(getattr(mlp, "norm", None)):
                parts.append(f"MLP {type(mlp).__name__}")
            elif not (isinstance(mlp.act, nn.GELU)):
                parts.append(f"activation {type(mlp.act).__name__}")
        if parts:
            why.append(f"block {i}: " + ", ".join(parts))
            break
    return why


def from_timm(source) -> nn.Module:
    """An lgframe ViT with the weights of a timm VisionTransformer (module or local folder)."""

    src = _load_timm(source)
    why = _timm_differences(src)
    if why:
        raise LgframeError("this timm model has parts lgframe's ViT cannot represent: " + "; ".join(why) +
                           ". Supported: the classic ViT (class token, LayerNorm pre-norm blocks, biased qkv, GELU).")
    pe = src.patch_embed
    size = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    b0 = src.blocks[0]
    width = src.embed_dim
    cfg = ViTConfig(depth=len(src.blocks), width=width, heads=b0.attn.num_heads, patch_size=patch, image_size=size,
                    in_channels=pe.proj.in_channels, num_classes=src.head.out_features,
                    mlp_ratio=b0.mlp.fc1.out_features / width,
                    mlp_act="gelu_tanh" if b0.mlp.act.approximate == "tanh" else "gelu")
    try:
        model = ViT(cfg)
    except ValueError as e:
        raise LgframeError(f"timm ViT of this size does not fit lgframe's ViT: {e}") from None
    if int(width * cfg.mlp_ratio) != b0.mlp.fc1.out_features:
        raise LgframeError(f"MLP hidden size {b0.mlp.fc1.out_features} is not a whole ratio of width {width}")
    model.load_state_dict(src.state_dict(), strict=True)
    return model.eval()


def to_timm(model: nn.Module, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> nn.Module:
    """A timm VisionTransformer with the weights of an lgframe ViT (any size; a
    constrained model is materialized on a copy first). Saved to `out_dir` if
    given, in the folder layout `timm.create_model("local-dir:PATH", pretrained=True)` reads."""
    timm = _timm()
    if getattr(model.config, "family", None) != "vit":
        raise LgframeError("only lgframe ViTs export to timm (DiTs export to diffusers)")
    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(copy.deepcopy(model))
    c = model.config
    args = dict(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_channels, num_classes=c.num_classes,
                embed_dim=c.width, depth=c.depth, num_heads=c.heads, mlp_ratio=c.mlp_ratio)
    if c.mlp_act == "gelu_tanh":
        args["act_layer"] = "gelu_tanh"
    dst = timm.create_model(TIMM_ARCH, pretrained=False, **args)
    dst.load_state_dict(model.state_dict(), strict=True)
    dst.eval()
    if out_dir is not None:
        from timm.models import save_for_hf  # deferred: timm (optional extra)


        with atomic_dir(out_dir, replace=overwrite) as tmp:
            save_for_hf(dst, str(tmp), model_args=args, safe_serialization=True)
    return dst
