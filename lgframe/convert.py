"""Import and export: diffusers `DiTTransformer2DModel` <-> lgframe's DiT.

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
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from lgframe.constraint import attached_constraint, get_constraint
from lgframe.dit import DiT, DiTConfig
from lgframe.errors import LgframeError

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
    from diffusers import DiTTransformer2DModel

    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not (path / "config.json").is_file():
        raise LgframeError(f"'{path}' is not a diffusers model directory (no config.json); give a local folder "
                           "saved by DiTTransformer2DModel.save_pretrained. Nothing is downloaded.")
    return DiTTransformer2DModel.from_pretrained(str(path), local_files_only=True)


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


def to_diffusers(model: nn.Module, out_dir: str | os.PathLike | None = None) -> nn.Module:
    """A diffusers DiTTransformer2DModel with the weights of an lgframe DiT (any size;
    a constrained model is materialized on a copy first). Saved to `out_dir` if given."""
    from diffusers import DiTTransformer2DModel

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
        dst.save_pretrained(str(out_dir), safe_serialization=True)
    return dst
