"""Nested sub-networks of a model: the narrower (`nested_width`) and shallower
(`nested_depth`) models a descent builds, run inside the full one, and both at once
(`nested_subnetwork`). Used by tucker's width-wise stochastic scaling (SWEET) and by
multi-size pre-training (WeiT's reading: the recipe section `multisize`, which draws
one (depth, width) per optimizer step with `sample_size`; lgframe/training/tasks.py).

A constrained layer whose bank computes a nested slice itself (its bank class sets
`nested_slices = True` and reads `mod._lg_nested`, as tucker's and kronecker's do)
runs that slice: `mod._lg_nested` is (row index, column index), or what the bank's
`nested_index(mod, rows, cols, path)` turned them into once per plan (kronecker: the
indices and the template blocks they cover). Every other Linear or constrained layer
reads only the nested input features (a masked input is a masked weight column).

Which constraints nest width (`width_nesting_constraints`): those whose bank computes
the nested slice of its own factors, so that the nested sub-network is exactly what
that constraint's same-depth descent builds (kronecker with width_rule select: the
same templates and the scaler blocks of the kept heads; tucker: the kept rows of B
and C). svd and kind keep only the largest components when they narrow, dct/dwt
resample, select keeps every other index: a nested slice of theirs is not their
descendant, so multi-size width training refuses them (depths work with any model)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.core.constraint import BANK, attached_constraint
from lgframe.core.layout import Dims, Layout, Role, depth_positions, dims_of, model_dims, model_identity, width_index
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


def nested_widths(dims: Dims) -> list[int]:
    """The widths a nested sub-network of `dims` can have: whole heads (head_dim kept)
    whose MLP hidden size is whole too."""
    return [k * dims.head_dim for k in range(1, dims.heads + 1) if (dims.hidden * k) % dims.heads == 0]


def width_ratio(dims: Dims, width: int) -> float:
    """The ratio of a nested width (in features) of `dims`; refused unless it keeps whole heads."""
    valid = nested_widths(dims)
    if width not in valid:
        raise LgframeError(
            f"nested width {width} of a model of width {dims.width} ({dims.heads} heads of {dims.head_dim}): a "
            f"nested width keeps whole attention heads; valid widths for this model: {', '.join(map(str, valid))}"
        )
    return width / dims.width


def width_nesting_constraints() -> list[str]:
    """Registered constraints whose bank computes nested width slices of its own factors
    (`nested_slices`): the ones whose nested sub-network is their same-depth descendant."""
    from lgframe.core.registry import constraint_class, constraint_names

    return [n for n in constraint_names() if getattr(getattr(constraint_class(n), "bank_class", None), "nested_slices", False)]


def check_width_nesting(constraint: str) -> None:
    """Refuse width nesting under a constraint whose bank cannot nest width, naming those that can."""
    able = width_nesting_constraints()
    if constraint not in able:
        raise LgframeError(
            f"constraint '{constraint}' cannot nest width: its bank does not compute nested slices of its factors, so "
            f"a nested sub-network is not what its descent builds; constraints that nest width: {', '.join(able)} "
            "(nested depths alone work with any constraint)"
        )


def sample_size(depths: Sequence[int], ratios: Sequence[float], seed: int, step: int) -> tuple[int, float]:
    """The (depth, width ratio) of optimizer step `step`: each drawn uniformly from its list by a
    generator seeded with (seed, step) alone, so every rank draws the same without communicating
    and a resumed run draws what the uninterrupted one did. The global generator is not touched."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)  # a stream apart from tucker's width draws
    depth = int(depths[int(torch.randint(len(depths), (1,), generator=g))])
    return depth, sample_width_ratio(ratios, g)


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
            idx = (width_index(mod.out_features, other.out_features, dims, nd, path),
                   width_index(mod.in_features, other.in_features, dims, nd, path))
            prepare = getattr(mod._bank, "nested_index", None)  # e.g. kronecker: the template blocks covered
            plan.append((path, "bank", tuple(prepare(mod, *idx, path)) if prepare is not None else idx))
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

    - tucker layers use only the nested rows of B and C (and bias), kronecker
      layers only the scaler blocks of the nested rows and columns (the same
      templates); their other outputs are zero;
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
                device = next(mod.parameters()).device  # the layer's own scalers
                object.__setattr__(mod, "_lg_nested", tuple(i.to(device) for i in idx))
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
    """The layers of a `depth`-layer model a `sub`-layer descendant lines up with: the descent's
    own source positions (`layout.depth_positions`: evenly spaced, first and last kept), each
    rounded to its nearest layer. Where a position is a whole layer the descent copies that
    layer, so the nested sub-network is exactly the descendant's depth; a single layer sits
    at the middle, as the descent's does."""
    if not 1 <= sub <= depth:
        raise LgframeError(f"nested depth {sub} of a {depth}-layer model; valid: 1..{depth}")
    # positions are >= 1 apart when sub < depth, so the rounded layers are distinct
    return [int(round(float(p))) for p in depth_positions(depth, sub)]


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


@contextlib.contextmanager
def nested_subnetwork(model: nn.Module, depth: int | None = None, ratio: float = 1.0):
    """Run `model` as its sub-network of `depth` layers (`nested_depth`: the blocks of
    `depth_layers`) and `ratio` times the width (`nested_width`), both at once; None and
    1.0 are the full size (a no-op). The two compose: the skipped blocks pass their input
    through, the kept ones run narrowed. Yields (kept layers, nested Dims)."""
    n = len(Layout(model).blocks(model))
    with nested_depth(model, n if depth is None else depth) as kept, nested_width(model, ratio) as dims:
        yield kept, dims
