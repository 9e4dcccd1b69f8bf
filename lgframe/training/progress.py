"""A step-based training progress bar: Lightning's TQDM bar counts batches per epoch
("Epoch 72/-2" when a run is set by `max_steps`); this one counts optimizer steps
against `max_steps`, so it has a total and a time estimate, and names the stage."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """`label` is shown before the bar, e.g. "ancestor 1/5: DiT-Nano/2 under svd"."""

    def __init__(self, label: str | None = None, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.label = label

    def _total(self, trainer: pl.Trainer) -> int | None:
        return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != self._total(trainer):  # the first epoch (or a resume): one bar for the whole run
            bar.reset(total=self._total(trainer))
            bar.initial = 0
            bar.n = trainer.global_step
            bar.refresh()
        bar.set_description(f"{self.label}: step" if self.label else "step")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total or 0):
            self.train_progress_bar.n = n
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the bar spans epochs
