"""dct: FRONT (frequency-domain learngene; training-free, both directions).

The weights train dense. The learngene of a role is the low-frequency block of
its stack (L, m, n) in an orthonormal 3-D DCT-II:

    z = (W - mean) / std                       (per role; mean, std kept)
    Z = dctn(z, norm="ortho")                  (over depth, rows, columns)
    learngene = Z[:L0, :m0, :n0]               (`keep`)

Descent to (L', m', n'): crop or zero-pad the block to (L', m', n'), multiply
by sqrt(L'm'n' / (L m n)) so a coefficient keeps its per-element amplitude on
the new grid, inverse DCT, then restore the role's mean and std. The kept block
holds only part of the energy, so the inverse is first brought back to unit
std (`renormalize`, on by default): every role of a descendant has its
ancestor's mean and std exactly. With the full block at the same size this is
the identity (within 1e-6).

Axes made of chunks (q/k/v rows: 3 chunks of the width; adaLN modulation: 6)
are transformed chunk by chunk, so q's spectrum never spills into k's; `keep`
on such an axis counts per chunk. The MLP hidden axis is one signal. Growing
depth interpolates in the frequency domain, so every new block is active (not
a copy of the last one, the fault of the published code, which also scales by
N_source / N_target on every axis because its DCT is unnormalized, and crashes
at depth 1; none of that here).

Free parameters (embeddings, norms, biases, final layer): with `rest: select`
each is resized the same way over its full spectrum where its shape changes
(a per-block parameter as its stack over depth), and copied where it does not.

`lam` > 0 turns on FRONT's spectral regularizer for a (refinement) phase of a
dense ancestor: lam * mean over roles of the fraction of the centered stack's
energy outside the kept block.

`band: high` is an ablation (the FRONT claim, measured in tests): the kept
block is taken from the highest frequencies [-L0:, -m0:, -n0:] and stays at its
place in the spectrum (the learngene records where each block starts), so a
same-size descendant is the high-pass counterpart of the low-pass one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.fft
import torch

from lgframe.core.constraint import BaseOptions, TransformConstraint
from lgframe.core.layout import Dims, Layout, Role, model_dims
from lgframe.core.registry import register_constraint
from lgframe.core.resize import (
    along,
    axis_chunks,
    check_fan_in_power,
    fan_in_factor,
    resize,
    resize_free,
    restore,
    stack_chunks,
    standardize,
)
from lgframe.errors import LgframeError

BANDS = ("low", "high")


def dct_resize_1d(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Resize along one axis over the full spectrum: DCT, crop/pad, rescale, inverse."""
    N = x.shape[axis]
    c = scipy.fft.dct(x, norm="ortho", axis=axis, workers=-1)
    # idct's n crops or zero-pads the leading coefficients itself (what `fit` does), without a copy
    out = scipy.fft.idct(c, n=n, norm="ortho", axis=axis, workers=-1, overwrite_x=True)
    out *= out.dtype.type(np.sqrt(n / N))
    return out


def dct_resize(x: np.ndarray, shape: tuple[int, ...], chunks: list[int], renormalize: bool = True) -> np.ndarray:
    """A free tensor to `shape`, full spectrum, statistics kept."""
    z, mean, std = standardize(x)
    return restore(resize(z, shape, chunks, dct_resize_1d), mean, std, renormalize)


@lru_cache(maxsize=64)
def _dct_rows(N: int, k: int, high: bool) -> torch.Tensor:
    """The k lowest (or highest) rows of the orthonormal DCT-II matrix (N, N)."""
    D = scipy.fft.dct(np.eye(N), norm="ortho", axis=0)
    return torch.from_numpy(D[N - k:] if high else D[:k]).float()


@lru_cache(maxsize=64)
def _idct_matrix(N: int, n: int, s0: int, c: int) -> torch.Tensor:
    """(n, c): the c coefficients starting at s0 of a length-N orthonormal DCT-II spectrum,
    inverted on n samples: scipy's `idct(pad(y, (s0, 0)), n=n) * sqrt(n / N)` (crop or
    zero-pad to n) as a matrix."""
    D = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)  # row j: basis function j on n samples
    M = np.zeros((n, c))
    hi = min(s0 + c, n)
    if hi > s0:
        M[:, : hi - s0] = D[s0:hi].T
    return torch.from_numpy(M * np.sqrt(n / N)).float()


def _restore(z: torch.Tensor, mean: float, std: float, renormalize: bool) -> torch.Tensor:
    """`lgframe.core.resize.restore` in place on a torch tensor (no numpy round trip)."""
    if renormalize:
        s, m = torch.std_mean(z, correction=0)
        if float(s) == 0:
            return z.fill_(mean)
        return z.sub_(m).mul_(std / s).add_(mean)
    return z.mul_(std).add_(mean)


@dataclass
class DCTOptions(BaseOptions):
    # Kept block per axis (depth, rows, columns): a fraction in (0, 1] of the
    # axis (of one chunk for chunked axes) or an absolute count >= 1 (int).
    keep: list = field(default_factory=lambda: [1.0, 0.5, 0.5])
    band: str = "low"  # low | high (ablation)
    renormalize: bool = True  # restore each role's std exactly (see docstring)
    fan_in_power: float | str = "auto"  # weights times (fan-in ratio) ** power, see lgframe.resize.fan_in_factor
    lam: float = 0.0  # weight of the spectral regularizer (0 = off)


@register_constraint
class DCT(TransformConstraint):
    """FRONT: the low-frequency block of an orthonormal 3-D DCT of each role is
    the learngene; any size, smaller or larger, descends without training."""

    name = "dct"
    Options = DCTOptions
    lossless_options = {"keep": [1.0, 1.0, 1.0]}

    def check_options(self) -> None:
        o = self.options
        check_fan_in_power("dct", o.fan_in_power)
        keep = [o.keep] * 3 if isinstance(o.keep, (int, float)) else list(o.keep)
        if len(keep) != 3 or not all(self._valid_keep(k) for k in keep):
            raise LgframeError(
                f"dct option keep={o.keep!r}; valid: a list of 3 entries (depth, rows, columns), each a "
                "fraction in (0, 1] or a positive int count"
            )
        o.keep = keep
        if o.band not in BANDS:
            raise LgframeError(f"dct option band={o.band!r}; valid: {', '.join(BANDS)}")
        if o.lam < 0:
            raise LgframeError(f"dct option lam={o.lam}; must be >= 0")

    @staticmethod
    def _valid_keep(k) -> bool:
        if isinstance(k, bool):
            return False
        if isinstance(k, int):
            return k >= 1
        return isinstance(k, float) and 0 < k <= 1

    def kept(self, sizes: tuple[int, int, int]) -> tuple[int, int, int]:
        """Kept block per axis for per-chunk axis sizes `sizes`."""
        return tuple(min(n, k) if isinstance(k, int) else max(1, round(k * n)) for k, n in zip(self.options.keep, sizes))

    def chunks(self, role: Role, a: Dims) -> list[int]:
        return stack_chunks(role.shape, role.shape, a, a, role.name)

    # -- learngene --------------------------------------------------------------
    def encode(self, role: Role, stack: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        chunks = self.chunks(role, dims)
        z, mean, std = standardize(stack.float().numpy())
        sizes = tuple(n // k for n, k in zip(z.shape, chunks))
        high = self.options.band == "high"
        Z = z
        for axis, (k, c) in enumerate(zip(chunks, self.kept(sizes))):
            def take(y, ax, c=c):
                y = scipy.fft.dct(y, norm="ortho", axis=ax, workers=-1)
                n = y.shape[ax]
                return np.take(y, np.arange(n - c, n) if high else np.arange(c), axis=ax)
            Z = along(Z, axis, k, take)
        start = [n // k - c if high else 0 for n, k, c in zip(z.shape, chunks, self.kept(sizes))]
        return {"coef": torch.from_numpy(Z).float(), "stats": torch.tensor([mean, std], dtype=torch.float64),
                "start": torch.tensor(start)}

    def decode(self, role, src_shape, tensors, a: Dims, b: Dims, init) -> torch.Tensor:
        """scipy.fft's inverse on a CPU; one matrix product per axis on the descendant's device
        where that is a GPU (on a CPU the products cost 5x scipy's time: benchmarks/dct_decode.py)."""
        decode = scipy_decode if init.device.type == "cpu" else matrix_decode
        return decode(self, role, src_shape, tensors, a, b, init)

    def descend_free(self, learngene, model, layout: Layout, a: Dims, b: Dims) -> None:
        resize_free(learngene, model, layout, a, b,
                    lambda x, shape, chunks: dct_resize(x, shape, chunks, self.options.renormalize), self.options.fan_in_power)

    # -- regularizer --------------------------------------------------------------
    def regularizer(self, model):
        if not self.options.lam:
            return None
        layout = Layout(model)
        dims = model_dims(model)
        high = self.options.band == "high"
        fractions = []
        for role in layout.select_roles(self.options.roles):
            chunks = self.chunks(role, dims)
            W = torch.stack([m.weight for m in layout.role_modules(model, role)])
            W = W - W.mean()
            L, m, n = W.shape
            X = W.reshape(L, chunks[1], m // chunks[1], chunks[2], n // chunks[2])
            sizes = (L, m // chunks[1], n // chunks[2])
            D = [_dct_rows(N, c, high).to(W.device, W.dtype) for N, c in zip(sizes, self.kept(sizes))]
            Y = torch.einsum("al,limjn->aimjn", D[0], X)
            Y = torch.einsum("bm,aimjn->aibjn", D[1], Y)
            inside = torch.einsum("cn,aibjn->aibjc", D[2], Y).pow(2).sum()
            fractions.append(1 - inside / W.pow(2).sum().clamp_min(1e-30))
        return self.options.lam * torch.stack(fractions).mean()


def _decode_axes(role, src_shape, tensors, a: Dims, b: Dims):
    """Per axis: its chunk count, source and target length, and where the kept block starts."""
    chunks = [1] + [axis_chunks(s, t, a, b, role.name) for s, t in zip(src_shape[1:], role.shape[1:])]
    start = tensors["start"].tolist() if "start" in tensors else [0, 0, 0]
    return enumerate(zip(chunks, src_shape, role.shape, start))


def scipy_decode(self, role, src_shape, tensors, a: Dims, b: Dims, init) -> torch.Tensor:
    """`DCT.decode` on a CPU: scipy.fft's crop/pad inverse per axis (numpy)."""
    Z = tensors["coef"].float().numpy()
    mean, std = tensors["stats"].tolist()
    for axis, (k, N, n, s0) in _decode_axes(role, src_shape, tensors, a, b):
        def back(y, ax, N=N // k, n=n // k, s0=s0):
            if s0:
                pad = [(0, 0)] * y.ndim
                pad[ax] = (s0, 0)
                y = np.pad(y, pad)
            out = scipy.fft.idct(y, n=n, norm="ortho", axis=ax, workers=-1)
            out *= out.dtype.type(np.sqrt(n / N))
            return out
        Z = along(Z, axis, k, back)
    W = restore(Z, mean, std, self.options.renormalize) * fan_in_factor(src_shape[2], role.shape[2], self.options.fan_in_power)
    return torch.from_numpy(W).float()


def matrix_decode(self, role, src_shape, tensors, a: Dims, b: Dims, init) -> torch.Tensor:
    """`DCT.decode` as one matrix product per axis (`_idct_matrix`), in torch on `init`'s device."""
    Z = tensors["coef"].to(init.device, torch.float32)
    mean, std = tensors["stats"].tolist()
    for axis, (k, N, n, s0) in _decode_axes(role, src_shape, tensors, a, b):
        c = Z.shape[axis] // k
        M = _idct_matrix(N // k, n // k, s0, c).to(init.device)
        shape = Z.shape
        Y = Z.reshape(shape[:axis] + (k, c) + shape[axis + 1:]).movedim(axis + 1, -1) @ M.T
        Z = Y.movedim(-1, axis + 1).reshape(shape[:axis] + (-1,) + shape[axis + 1:])
    W = _restore(Z, mean, std, self.options.renormalize)
    return W.mul_(fan_in_factor(src_shape[2], role.shape[2], self.options.fan_in_power)).contiguous()
