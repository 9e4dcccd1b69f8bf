"""Nested sub-networks of a model: the narrower (`nested_width`) and shallower
(`nested_depth`) models a descent builds, run inside the full one. Used by tucker's
width-wise stochastic scaling (SWEET); meant for multi-size ancestor training
(WeiT's reading, any constraint), which is not built yet.

A constrained layer whose bank computes a nested slice itself (its bank class sets
`nested_slices = True` and reads `mod._lg_nested` = (row index, column index), as
tucker's does) runs that slice; every other Linear or constrained layer reads only
the nested input features (a masked input is a masked weight column)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.core.constraint import BANK, attached_constraint
from lgframe.core.layout import Dims, Layout, Role, dims_of, model_dims, model_identity, width_index
from lgframe.errors import LgframeError
from lgframe.models.registry import model_from_config


# ------------------------------------------------------------------ nested widths
def sample_width_ratio(ratios: Sequence[float], generator: torch.Generator | None = None) -> float:
    """One ratio drawn uniformly from `ratios` (one draw per step; seed the
    generator with the step so every rank draws the same)."""
    return float(ratios[int(torch.randint(len(ratios), (1,), generator=generator))])


def nested_dims(dims: Dims, ratio: float) -> Dims:
    """Width structure of the nested sub-network at `ratio`: heads' = ratio * heads
    (whole heads, head_dim kept), MLP hidden scaled alike."""
    heads = ratio * dims.heads
    h = round(heads)
    if not 0 < ratio <= 1 or h < 1 or abs(heads - h) > 1e-6 or (dims.hidden * h) % dims.heads:
        valid = [f"{k / dims.heads:g}" for k in range(1, dims.heads + 1) if (dims.hidden * k) % dims.heads == 0]
        raise LgframeError(
            f"width ratio {ratio} of width {dims.width} ({dims.heads} heads of {dims.head_dim}) gives "
            f"{ratio * dims.width:g} features: a nested width keeps whole attention heads; "
            f"valid ratios for this model: {', '.join(valid)}"
        )
    return Dims(h * dims.head_dim, h, dims.hidden * h // dims.heads)


def nested_size(size: int, a: Dims, b: Dims) -> int:
    """Size of a role axis of size `size` (full dims a) in the nested dims b."""
    if size == a.hidden:
        return b.hidden
    if size % a.width == 0:
        return size // a.width * b.width
    return size


def nested_rows(role: Role, dims: Dims, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of B (output features) and rows of C (input features) a role keeps
    at `ratio`: (m',), (n',) indices, the layout's consistent width selection."""
    nd = nested_dims(dims, ratio)
    _, m, n = role.shape
    return (width_index(m, nested_size(m, dims, nd), dims, nd, f"{role.name} rows"),
            width_index(n, nested_size(n, dims, nd), dims, nd, f"{role.name} columns"))


def _nested_model(model: nn.Module, heads: int) -> tuple[nn.Module, Dims]:
    """The narrower model's module shapes (on the meta device, no memory) and dims."""
    _, cfg = model_identity(model)
    with torch.device("meta"):
        if "width" in cfg:
            cfg = cfg | {"width": heads * dims_of(cfg).head_dim, "heads": heads}
            sub = model_from_config(cfg)
        else:  # diffusers
            cfg = {**cfg, "num_attention_heads": heads}
            sub = type(model).from_config(cfg)
    return sub, dims_of(cfg)


def _nested_plan(model: nn.Module, ratio: float) -> tuple[Dims, list]:
    """[(module path, kind, indices)] that make `model` run as its nested sub-network."""
    dims = model_dims(model)
    nd = nested_dims(dims, ratio)
    spec = attached_constraint(model)
    key = (nd.heads, spec.name if spec else None)
    cache = model.__dict__.setdefault("_lg_nested_plans", {})
    if key in cache:
        return cache[key]
    sub, nd = _nested_model(model, nd.heads)
    subs = dict(sub.named_modules())
    plan = []
    for path, mod in model.named_modules():
        if path.startswith(BANK) or path not in subs or list(mod.children()):
            continue
        other = subs[path]
        if getattr(mod, "is_constrained_linear", False) and getattr(mod._bank, "nested_slices", False):
            plan.append((path, "bank", (width_index(mod.out_features, other.out_features, dims, nd, path),
                                        width_index(mod.in_features, other.in_features, dims, nd, path))))
        elif isinstance(mod, nn.Linear) or getattr(mod, "is_constrained_linear", False):
            if other.in_features != mod.in_features:
                plan.append((path, "input", width_index(mod.in_features, other.in_features, dims, nd, path)))
        elif isinstance(mod, nn.LayerNorm):
            if tuple(other.normalized_shape) != tuple(mod.normalized_shape):
                plan.append((path, "norm", width_index(mod.normalized_shape[-1], other.normalized_shape[-1], dims, nd, path)))
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if other.in_channels != mod.in_channels:
                raise LgframeError(f"nested_width cannot narrow the input channels of {type(mod).__name__} '{path}'")
        elif not isinstance(mod, nn.Embedding):  # an embedding's width axis is its output: nothing reads past it
            if any(tuple(p.shape) != tuple(q.shape) for p, q in zip(mod.parameters(False), other.parameters(False))):
                raise LgframeError(
                    f"nested_width does not know how to narrow {type(mod).__name__} '{path}'; "
                    "it handles Linear, LayerNorm, constrained layers, convolutions and embeddings"
                )
    cache[key] = (nd, plan)
    return nd, plan


def _mask_input(mask: torch.Tensor, mod: nn.Module, args: tuple):
    x = args[0]
    return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])


def _nested_norm(idx: torch.Tensor, mod: nn.LayerNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    idx = idx.to(x.device)
    w = mod.weight[idx] if mod.weight is not None else None
    b = mod.bias[idx] if mod.bias is not None else None
    y = F.layer_norm(x.index_select(-1, idx), (idx.numel(),), w, b, mod.eps)
    return out.new_zeros(out.shape).index_copy(-1, idx, y)


@contextlib.contextmanager
def nested_width(model: nn.Module, ratio: float):
    """Run `model` (the plain module, not a DDP wrapper) as its nested
    sub-network of `ratio` times the width, inside the block and out:

    - tucker layers use only the nested rows of B and C (and bias); their
      other outputs are zero;
    - every other Linear (and constrained layer of another constraint) reads
      only the nested input features: a masked input is a masked weight column;
    - every LayerNorm over the width normalizes over the nested features only.

    Attention heads need nothing more: the nested heads are the first ones,
    each of head_dim, and the heads outside produce only features that no
    nested reader takes. Parameters used outside a module (position
    embeddings, class tokens) are assumed to enter the residual stream
    additively, as in lgframe's DiT/ViT and diffusers' DiT: their features outside the
    nested width are never read. The result equals the narrower model whose
    every tensor is the consistent width selection of this one (what a
    same-depth descent builds). Only index sets are cached (per model and
    ratio), never tensors. Yields the nested Dims. Tested in one process; under
    DDP, enter it around the wrapped model's forward and backward.
    """
    dims = model_dims(model)
    nd = nested_dims(dims, ratio)
    if nd.heads == dims.heads:
        yield dims
        return
    nd, plan = _nested_plan(model, ratio)
    handles, nested = [], []
    try:
        for path, kind, idx in plan:
            mod = model.get_submodule(path)
            if kind == "bank":
                device = mod.A.device
                object.__setattr__(mod, "_lg_nested", (idx[0].to(device), idx[1].to(device)))
                nested.append(mod)
            elif kind == "input":
                mask = torch.zeros(mod.in_features)
                mask[idx] = 1.0
                handles.append(mod.register_forward_pre_hook(partial(_mask_input, mask)))
            else:
                handles.append(mod.register_forward_hook(partial(_nested_norm, idx)))
        yield nd
    finally:
        for h in handles:
            h.remove()
        for mod in nested:
            object.__delattr__(mod, "_lg_nested")


def depth_layers(depth: int, sub: int) -> list[int]:
    """The layers of a `depth`-layer model a `sub`-layer descendant lines up with: evenly spaced,
    first and last kept (where the descent's depth resampling is exact)."""
    if not 1 <= sub <= depth:
        raise LgframeError(f"nested depth {sub} of a {depth}-layer model; valid: 1..{depth}")
    if sub == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (sub - 1)) for i in range(sub)})


def _identity(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def nested_depth(model: nn.Module, depth: int):
    """Run `model` as its `depth`-layer sub-network: the blocks of `depth_layers` compute, every
    other block passes its input through (the residual stream goes on unchanged), so the result
    is the shallower model made of those blocks. Blocks skipped get no gradient in that step
    (under DDP: trainer.strategy=ddp_find_unused_parameters_true)."""
    blocks = Layout(model).blocks(model)
    keep = set(depth_layers(len(blocks), depth))
    skipped = [b for i, b in enumerate(blocks) if i not in keep]
    try:
        for b in skipped:
            object.__setattr__(b, "forward", _identity)
        yield sorted(keep)
    finally:
        for b in skipped:
            b.__dict__.pop("forward", None)
