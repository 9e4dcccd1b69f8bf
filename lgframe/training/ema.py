"""EMA of the weights with diffusers' warm-up: Lightning's `EMAWeightAveraging` with the
decay at the n-th update min(decay, (1 + n) / (10 + n)), as diffusers' `EMAModel`
(and the DiT and timm recipes) use it.

Without the warm-up a short run's average keeps decay^steps of the weights it started
from: 0.99^240 = 9% of a random init after a 240-step descendant run, 55% after 120
steps at 0.995, so every early validation point measures mostly the starting weights
(a good init looks better than it is, and scratch worse). With it the average follows
the model closely at first (decay 0.1, 0.18, 0.25, ... 0.9 at n = 80) and reaches
`decay` once (1 + n) / (10 + n) passes it.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the n-th average update (n = 0 is the first after the copy)."""
    return min(decay, (1 + n) / (10 + n))


class WarmupEMA(EMAWeightAveraging):
    """`EMAWeightAveraging` whose decay warms up as `warmup_decay` (or stays fixed with warmup=False)."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs):
        super().__init__(decay=decay, **kwargs)
        if warmup:  # the averaging function handed to torch's AveragedModel at setup
            self._kwargs["avg_fn"] = _warmup_avg_fn(decay)


def _warmup_avg_fn(decay: float):
    @torch.no_grad()
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        # AveragedModel counts the first copy: num_averaged is 1 at the first average
        d = warmup_decay(decay, int(num_averaged) - 1)
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn
