"""Checkpoints during training: written atomically, never from non-finite weights.

* `AtomicCheckpointIO` (a Lightning CheckpointIO) writes each .ckpt to a temporary
  file beside its target, fsyncs and renames it (Lightning's own goes through
  fsspec, whose local transaction stages the file in the system temp dir and then
  moves it: a copy across devices). A write that fails (a full disk) leaves the
  previous checkpoint as it was and says so.
* `FiniteCheckpoint` (Lightning's ModelCheckpoint) refuses to save weights that
  are not finite, or a run whose last validation loss is not finite.

Sharded (fsdp) checkpoints are written atomically by the strategy itself
(lgframe/training/distributed.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_path

log = logging.getLogger("lgframe")


class AtomicCheckpointIO(TorchCheckpointIO):
    @override
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except RuntimeError as e:  # torch's zip writer: "enforce fail at inline_container.cc ... file write failed"
            free = shutil.disk_usage(Path(path).parent).free
            raise LgframeError(
                f"checkpoint '{path}' could not be written ({str(e).splitlines()[0][:120]}); is the disk full? "
                f"{free / 2**20:,.0f} MiB are free there. The previous checkpoint, if any, is kept; free some space "
                "and continue with resume=auto."
            ) from None


class FiniteCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that refuses to save non-finite weights or a run
    whose last validation loss is not finite: the previous checkpoint stays."""

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        val = trainer.callback_metrics.get("val/loss")
        bad = val is not None and not torch.isfinite(torch.as_tensor(val)).all()
        if not bad:
            bad = any(not torch.isfinite(p.detach()).all() for p in trainer.lightning_module.parameters())
        if bad:
            log.warning("step %d: checkpoint not saved (non-finite %s); %s", trainer.global_step,
                        "validation loss" if val is not None and not torch.isfinite(torch.as_tensor(val)).all()
                        else "weights", f"the previous one is kept: {filepath}" if Path(filepath).exists()
                        else "there is no earlier checkpoint")
            return
        super()._save_checkpoint(trainer, filepath)
