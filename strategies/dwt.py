"""dwt: BoT (weights as signals, model sizes as resolutions; training-free,
both directions).

The weights train dense. Per role stack (L, m, n) and per axis, with source
length N and target length n (chunk lengths on chunked axes: q/k/v rows are 3
chunks of the width, adaLN modulation 6; the MLP hidden axis is one signal):

- level j = round(log2(N / n)), the nearest dyadic level (0 = no transform);
- j > 0 (large to small): keep the approximation band of a j-level 1-D DWT
  along the axis, times 2^(-j/2) (a Haar approximation coefficient is the sum
  of a pair over sqrt(2): the factor makes it the pair's mean);
- j < 0 (small to large): |j| levels of inverse DWT with zero detail bands,
  times 2^(|j|/2) (Haar: each value repeated);
- if the length reached is not n (ratio not a power of two, or an odd length),
  linear interpolation (end points kept) along that axis to exactly n. Plain
  cropping or padding here would make the method Weight Selection.

The amplitude factors keep the statistics of a smooth signal; trained weights
are close to white noise along the width (a pair's mean then has 1/sqrt(2) of
the std), so each role's mean and std are finally restored exactly
(`match_stats`, on by default). Any PyWavelets wavelet is allowed (`wavelet`,
default haar; transforms use mode "periodization", so a level halves a length
exactly). Level 0 on every axis is the identity.

`descend` decides the direction per axis from the shapes, so one learngene
initializes smaller and larger models. The learngene is the role stacks
themselves at `level` 0 (default), or their level-`level` approximation band
over rows and columns (a learngene 4^level times smaller; descent then treats
the band as a model of width / 2^level). BoT's authors published no code:
these choices are lgframe's, the first public implementation.

Free parameters with `rest: select` follow the same per-axis rule (a per-block
parameter as its stack over depth), copied where the shape does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pywt
import torch

from lgframe.core.constraint import BaseOptions, TransformConstraint
from lgframe.core.layout import Dims, Layout, Role
from lgframe.core.registry import register_constraint
from lgframe.core.resize import (
    along,
    axis_chunks,
    check_fan_in_power,
    fan_in_factor,
    linear_resample,
    resize,
    resize_free,
    restore,
    stack_chunks,
    standardize,
)
from lgframe.errors import LgframeError


def dyadic_level(N: int, n: int) -> int:
    """Nearest dyadic level from length N to n (> 0 halves, < 0 doubles)."""
    return int(np.round(np.log2(N / n)))


def dwt_resize_1d(x: np.ndarray, axis: int, n: int, wavelet: str = "haar") -> np.ndarray:
    """One axis from length N to n: nearest dyadic level of (inverse) DWT with
    amplitude correction, then linear resampling to exactly n if needed."""
    N = x.shape[axis]
    j = dyadic_level(N, n)
    r2 = x.dtype.type(np.sqrt(2))  # a float64 scalar would make every level a float64 copy
    for _ in range(j):
        if x.shape[axis] < 2:
            break
        x = pywt.dwt(x, wavelet, mode="periodization", axis=axis)[0]
        x /= r2
    for _ in range(-j):
        x = pywt.idwt(x, None, wavelet, mode="periodization", axis=axis)
        x *= r2
    return linear_resample(x, axis, n)


@dataclass
class DWTOptions(BaseOptions):
    wavelet: str = "haar"  # any discrete wavelet of PyWavelets (pywt.wavelist(kind="discrete"))
    level: int = 0  # learngene = level-`level` approximation band over rows and columns (0 = the stacks)
    match_stats: bool = True  # restore each role's mean and std exactly (see docstring)
    fan_in_power: float | str = "auto"  # weights times (fan-in ratio) ** power, see lgframe.resize.fan_in_factor


@register_constraint
class DWT(TransformConstraint):
    """BoT: weights as signals; a smaller model keeps the approximation band of
    a DWT, a larger one is the inverse DWT with zero details; no training."""

    name = "dwt"
    Options = DWTOptions

    def check_options(self) -> None:
        o = self.options
        check_fan_in_power("dwt", o.fan_in_power)
        if o.wavelet not in pywt.wavelist(kind="discrete"):
            raise LgframeError(
                f"dwt option wavelet={o.wavelet!r}; valid: a discrete PyWavelets wavelet, e.g. haar, db2, db4, "
                f"sym4, coif1, bior2.2 (all: {', '.join(pywt.families())} families; pywt.wavelist(kind='discrete'))"
            )
        if isinstance(o.level, bool) or not isinstance(o.level, int) or o.level < 0:
            raise LgframeError(f"dwt option level={o.level!r}; valid: an int >= 0")

    def resize(self, x: np.ndarray, shape: tuple[int, ...], chunks: list[int]) -> np.ndarray:
        z, mean, std = standardize(x)
        y = resize(z, shape, chunks, lambda v, ax, n: dwt_resize_1d(v, ax, n, self.options.wavelet))
        return restore(y, mean, std, self.options.match_stats)

    # -- learngene --------------------------------------------------------------
    def encode(self, role: Role, stack: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        x = stack.float().numpy()
        chunks = stack_chunks(role.shape, role.shape, dims, dims, role.name)
        for _ in range(self.options.level):
            for axis in (1, 2):
                if x.shape[axis] // chunks[axis] >= 2:
                    x = along(x, axis, chunks[axis],
                              lambda v, ax: pywt.dwt(v, self.options.wavelet, mode="periodization", axis=ax)[0]
                              / v.dtype.type(np.sqrt(2)))
        mean, std = float(stack.double().mean()), float(stack.double().std(unbiased=False))
        return {"band": torch.from_numpy(x).float(), "stats": torch.tensor([mean, std], dtype=torch.float64)}

    def decode(self, role, src_shape, tensors, a: Dims, b: Dims, init) -> torch.Tensor:
        band = tensors["band"].float().numpy()
        mean, std = tensors["stats"].tolist()
        chunks = [1] + [axis_chunks(s, t, a, b, role.name) for s, t in zip(src_shape[1:], role.shape[1:])]
        z = standardize(band)[0]
        y = resize(z, role.shape, chunks, lambda v, ax, n: dwt_resize_1d(v, ax, n, self.options.wavelet))
        W = restore(y, mean, std, self.options.match_stats) * fan_in_factor(src_shape[2], role.shape[2], self.options.fan_in_power)
        return torch.from_numpy(W).float()

    def descend_free(self, learngene, model, layout: Layout, a: Dims, b: Dims) -> None:
        resize_free(learngene, model, layout, a, b, self.resize, self.options.fan_in_power)
