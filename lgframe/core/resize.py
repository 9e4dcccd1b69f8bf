"""Per-axis resizing of weight tensors, shared by the training-free constraints
(dct, dwt) for their role stacks and their free parameters.

A tensor is resized one axis at a time by a 1-D rule `fn(x, axis, new_len)`
(numpy float64). An axis made of k equal chunks (q/k/v rows are 3 chunks of
the width, adaLN modulation 6) is resized chunk by chunk, so q stays q; an MLP
hidden axis is one flat signal. Depth (axis 0 of a stack) is always flat.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from lgframe.core.layout import Dims, Layout, model_depth
from lgframe.errors import LgframeError

Resize1d = Callable[[np.ndarray, int, int], np.ndarray]


def axis_chunks(src: int, tgt: int, a: Dims, b: Dims, what: str = "tensor") -> int:
    """How many equal chunks an axis of size `src` (model dims a) is made of,
    when it becomes `tgt` (model dims b). Raises when the sizes do not correspond."""
    if src == a.hidden and tgt == b.hidden:
        return 1
    if src % a.width == 0 and tgt % b.width == 0 and src // a.width == tgt // b.width:
        return src // a.width
    if src == tgt:
        return 1
    raise LgframeError(
        f"cannot map an axis of size {src} to {tgt} for {what}: widths {a.width} -> {b.width}, "
        f"MLP hidden {a.hidden} -> {b.hidden}"
    )


def along(x: np.ndarray, axis: int, chunks: int, fn: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Apply `fn(y, axis)` to each of the `chunks` equal parts of `axis` (all at once)."""
    shape = x.shape
    y = x.reshape(shape[:axis] + (chunks, shape[axis] // chunks) + shape[axis + 1:])
    y = fn(y, axis + 1)
    return y.reshape(shape[:axis] + (-1,) + shape[axis + 1:])


def resize(x: np.ndarray, shape: tuple[int, ...], chunks: list[int], fn: Resize1d) -> np.ndarray:
    """Resize every axis whose length changes, chunk-aware."""
    for axis, (k, n) in enumerate(zip(chunks, shape)):
        if x.shape[axis] != n:
            x = along(x, axis, k, lambda y, ax, n=n, k=k: fn(y, ax, n // k))
    return x


def _std_mean(x: np.ndarray) -> tuple[float, float]:
    std, mean = torch.std_mean(torch.from_numpy(x), correction=0)  # multithreaded, no float64 copy
    return float(std), float(mean)


def standardize(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(x - mean) / std, and the statistics."""
    std, mean = _std_mean(x)
    t = x.dtype.type
    return (x - t(mean)) / t(std if std > 0 else 1.0), mean, std


def restore(z: np.ndarray, mean: float, std: float, renormalize: bool = True) -> np.ndarray:
    """z * std + mean; with `renormalize`, z is first brought back to zero mean
    and unit std, so the result has exactly the given statistics."""
    t = z.dtype.type
    if renormalize:
        s, m = _std_mean(z)
        if s == 0:
            return np.full_like(z, mean)
        return (z - t(m)) * t(std / s) + t(mean)
    return z * t(std) + t(mean)


def linear_resample(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Linear interpolation along `axis` to `n` samples, end points kept
    (position i of n maps to i (N-1)/(n-1) of the source; n = 1 takes the middle)."""
    N = x.shape[axis]
    if N == n:
        return x
    pos = np.linspace(0, N - 1, n) if n > 1 else np.array([(N - 1) / 2.0])
    lo = np.clip(np.floor(pos).astype(int), 0, N - 1)
    hi = np.minimum(lo + 1, N - 1)
    w = (pos - lo).astype(x.dtype).reshape([-1 if d == axis else 1 for d in range(x.ndim)])
    a = np.take(x, lo, axis=axis)
    a += (np.take(x, hi, axis=axis) - a) * w
    return a


def stack_chunks(src_shape: tuple[int, ...], tgt_shape: tuple[int, ...], a: Dims, b: Dims, what: str) -> list[int]:
    """Chunks of every axis of a per-block stack (axis 0 = depth, flat)."""
    return [1] + [axis_chunks(s, t, a, b, what) for s, t in zip(src_shape[1:], tgt_shape[1:])]


def fan_in_factor(src_in: int, tgt_in: int, power: float | str = "auto") -> float:
    """(fan-in of the source / fan-in of the target) ** power, for a weight
    whose input axis is resampled from src_in to tgt_in.

    power 1 keeps the function: a resampled input carries the same signal over
    tgt_in / src_in times as many features (growing resamples by an isometry,
    so this is exact there). power 0.5 keeps the weight's std relative to its
    size's init scale (std ~ 1 / sqrt(fan-in)); information is lost when
    shrinking, and 0.5 measured best there (digits, DiT-Pico -> width 32).
    "auto" = 1 when growing, 0.5 when shrinking."""
    if power == "auto":
        power = 1.0 if tgt_in > src_in else 0.5
    return (src_in / tgt_in) ** power if power else 1.0


def check_fan_in_power(name: str, power) -> None:
    if power != "auto" and (isinstance(power, bool) or not isinstance(power, (int, float)) or power < 0):
        raise LgframeError(f"{name} option fan_in_power={power!r}; valid: 'auto' or a number >= 0")


def resize_free(learngene, model: nn.Module, layout: Layout, a: Dims, b: Dims,
                tensor_fn: Callable[[np.ndarray, tuple[int, ...], list[int]], np.ndarray], fan_in_power: float | str = 0.0) -> None:
    """Free parameters of a descendant by a per-tensor resize `tensor_fn(src,
    target_shape, chunks)`: a per-block parameter is resized as its stack over
    depth (L, ...) -> (L', ...), a global one as itself; tensors whose shape
    does not change are copied. Frozen tables (the DiT's sincos positions) are
    resized too: the resized weights expect the ancestor's table. The weight of a Linear whose input
    size changes is multiplied by `fan_in_factor`."""

    def factor(name: str, src_shape, tgt_shape) -> float:
        mod = model.get_submodule(name.rpartition(".")[0])
        if isinstance(mod, nn.Linear) and name.endswith(".weight"):
            return fan_in_factor(src_shape[-1], tgt_shape[-1], fan_in_power)
        return 1.0

    rest = learngene.rest_for(model)
    src_depth = model_depth(learngene.ancestor_config)
    role_names = set(learngene.roles)
    per_block: dict[str, list[nn.Parameter]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            split = layout.split_block_name(name)
            if split is not None:
                if split[1] not in role_names:
                    per_block.setdefault(split[1], []).append(p)
                continue
            if name not in rest:
                continue
            src = rest[name]
            if tuple(src.shape) == tuple(p.shape):
                p.copy_(src)
            else:
                chunks = [axis_chunks(s, t, a, b, name) for s, t in zip(src.shape, p.shape)]
                out = tensor_fn(src.float().numpy(), tuple(p.shape), chunks) * factor(name, src.shape, p.shape)
                p.copy_(torch.from_numpy(out).to(p.dtype))
        for inner, params in per_block.items():
            keys = [f"{layout.blocks_path}.{l}.{inner}" for l in range(src_depth)]
            if not all(k in rest for k in keys):
                continue
            src = torch.stack([rest[k] for k in keys])
            shape = (len(params), *params[0].shape)
            if tuple(src.shape) == shape:
                out = src
            else:
                chunks = stack_chunks(tuple(src.shape), shape, a, b, inner)
                f = factor(layout.block_param_name(0, inner), src.shape, shape)
                out = torch.from_numpy(tensor_fn(src.float().numpy(), shape, chunks) * f)
            for layer, p in enumerate(params):
                p.copy_(out[layer].to(p.dtype))
