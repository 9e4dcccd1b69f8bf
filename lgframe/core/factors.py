"""Random factors the factorized constraints start from."""

from __future__ import annotations

import torch


def random_orthonormal(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) with orthonormal columns (cols <= rows), float64: the Q of a QR of a
    Gaussian matrix with its signs fixed by R's diagonal, so the draw is Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
