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
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging


def warmup_decay(decay: float, n: int) -> float:
    """The decay of the n-th average update (n = 0 is the first after the copy)."""
    return min(decay, (1 + n) / (10 + n))


def save_last_first(trainer, pl_module) -> None:
    """Let the checkpoint callbacks write their train-end checkpoint now, before the
    average is copied into the model: Lightning runs checkpoint callbacks last, so
    otherwise the final `last.ckpt` holds the average under both `state_dict` and
    `current_model_state`, and a resume that extends the run would go on from the
    average instead of the training weights (ModelCheckpoint saves at most once at the
    end, so its own call later does nothing)."""
    for cb in trainer.checkpoint_callbacks:
        cb.on_train_end(trainer, pl_module)


class WarmupEMA(EMAWeightAveraging):
    """`EMAWeightAveraging` whose decay warms up as `warmup_decay` (or stays fixed with warmup=False)."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs):
        super().__init__(decay=decay, **kwargs)
        if warmup:  # the averaging function handed to torch's AveragedModel at setup
            self._kwargs["avg_fn"] = _warmup_avg_fn(decay)

    def on_train_end(self, trainer, pl_module) -> None:
        save_last_first(trainer, pl_module)
        super().on_train_end(trainer, pl_module)


def _warmup_avg_fn(decay: float):
    @torch.no_grad()
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        # AveragedModel counts the first copy: num_averaged is 1 at the first average
        d = warmup_decay(decay, int(num_averaged) - 1)
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


class ShardedEMA(Callback):
    """EMA of a model sharded by FSDP2: every rank averages its own shard of each weight.

    Lightning's `WeightAveraging` deep-copies the whole module into a torch
    `AveragedModel`, which it cannot do for sharded parameters. Here the average is a
    dict of tensors with the model's state-dict keys, each a clone of the (sharded)
    DTensor, so it costs one more shard per rank and no communication: the update,
    the swap around validation and the copy into the model at the end are local,
    pointwise DTensor ops on equal placements. The arithmetic is `WarmupEMA`'s: the
    first update copies, the n-th after it moves by 1 - warmup_decay(decay, n - 1)
    (or by 1 - decay with warmup=False), floating buffers are averaged as parameters
    (torch's `use_buffers=True`), and updates start at `update_starting_at_step`.

    Checkpoints keep Lightning's layout: `state_dict` holds the average and
    `current_model_state` the training weights (both written as shards by
    `ShardedStrategy`), so `lgframe.load_model(ckpt, ema=False)` reads the latter, a
    resume restores both (`ShardedStrategy.load_checkpoint` fills `average` in place),
    and the model gathered at the end of `fit` (the consolidated file, the learngene)
    is the average, as on one process.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_starting_at_step: int | None = None):
        self.decay, self.warmup, self.start = float(decay), bool(warmup), update_starting_at_step
        self.average: dict[str, torch.Tensor] | None = None
        self.n_averaged = 0
        self.latest_update_step = 0

    def build(self, pl_module) -> dict[str, torch.Tensor]:
        """The average's tensors (clones of the module's state-dict tensors), made once."""
        if self.average is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            with torch.no_grad():
                self.average = {k: v.detach().clone() for k, v in get_model_state_dict(pl_module).items()}
        return self.average

    def _pairs(self, pl_module):
        from torch.distributed.fsdp import FSDPModule

        for m in pl_module.modules():  # the root stays unsharded after a forward without backward (validation)
            if isinstance(m, FSDPModule):
                m.reshard()
        named = dict(pl_module.named_parameters()) | dict(pl_module.named_buffers())
        return [(a, named[k].detach()) for k, a in self.build(pl_module).items() if k in named]

    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module) -> None:
        self.build(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step <= self.latest_update_step or (self.start is not None and step_idx < self.start):
            return
        d = warmup_decay(self.decay, self.n_averaged - 1) if self.warmup else self.decay
        for avg, cur in self._pairs(pl_module):
            if self.n_averaged == 0 or not avg.is_floating_point():
                avg.copy_(cur)
            else:
                avg.lerp_(cur, 1.0 - d)
        self.n_averaged += 1
        self.latest_update_step = trainer.global_step

    @torch.no_grad()
    def _swap(self, pl_module) -> None:
        for avg, cur in self._pairs(pl_module):
            tmp = avg.clone()
            avg.copy_(cur)
            cur.copy_(tmp)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self.average is not None:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self.average is not None:
            self._swap(pl_module)

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        save_last_first(trainer, pl_module)
        for avg, cur in self._pairs(pl_module):
            cur.copy_(avg)

    def state_dict(self) -> dict:
        return {"latest_update_step": self.latest_update_step, "n_averaged": self.n_averaged}

    def load_state_dict(self, state_dict: dict) -> None:
        self.latest_update_step = int(state_dict["latest_update_step"])
        self.n_averaged = int(state_dict.get("n_averaged", 0))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is None:
            return
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = dict(self.average)


def sharded_ema(trainer) -> ShardedEMA | None:
    """The trainer's `ShardedEMA` callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, ShardedEMA)), None)
