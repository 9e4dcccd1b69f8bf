"""Sharded training: FSDP2 through Lightning's ModelParallelStrategy, with safe loading
and atomic distributed checkpoints.

`trainer.strategy=fsdp` builds `ShardedStrategy`: pure data parallelism (every
process holds a shard, tensor-parallel size 1), on GPUs with NCCL or on CPUs with
gloo. Two things differ from Lightning's own strategy:

* **Loading reads no pickle from the folder.** Lightning hands the folder to
  `torch.distributed.checkpoint.load`, whose reader unpickles `.metadata` and
  whose planner unpickles byte items without the weights-only guard; here both go
  through lgframe's allow-list reader and planner (lgframe/formats/checkpoints.py), and
  `meta.pt` loads with `weights_only=True`.
* **Saving is atomic.** Every rank writes its shard into `.NAME.partial` beside
  the target; once all have finished, rank 0 marks it complete, moves the
  previous checkpoint aside, renames the new one into place and removes the old
  one. A kill at any point leaves a loadable checkpoint: the previous one, or the
  new one, and `recover_checkpoints` (run at every start) finishes or discards
  what a kill left half-done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from typing_extensions import override

from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import dcp_inner_error, dcp_load, load_checkpoint, read_dcp_metadata
from lgframe.training.ema import sharded_ema

COMPLETE = ".lgframe-complete"  # marker written into a staging folder once every shard is on disk


def staging_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(staging: Path, path: Path) -> None:
    """Rename a complete staging folder over `path`, keeping the previous one until then."""
    (staging / COMPLETE).write_text("")
    _fsync_tree(staging)
    old = old_path(path)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoints(folder: Path) -> list[str]:
    """Finish or discard what a kill left in a checkpoints folder; returns what was done.

    * `.NAME.partial` complete and NAME missing (killed between the two renames): renamed to NAME;
    * `.NAME.partial` otherwise (killed while shards were written): removed;
    * `.NAME.old` with NAME present: removed; with NAME missing: renamed back;
    * `.NAME.*.tmp` files (a plain checkpoint killed mid-write): removed.
    """
    done: list[str] = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(".") and name.endswith(".partial") and p.is_dir():
            target = folder / name[1:-len(".partial")]
            if (p / COMPLETE).is_file() and not target.exists():
                os.replace(p, target)
                done.append(f"completed {target.name} from its finished staging folder")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed the unfinished {name}")
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(".") and name.endswith(".old"):
            target = folder / name[1:-len(".old")]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                done.append(f"removed the superseded {name}")
            else:
                os.replace(p, target)
                done.append(f"restored {target.name} from {name}")
        elif name.startswith(".") and name.endswith(".tmp") and p.is_file():
            p.unlink()
            done.append(f"removed the partial file {name}")
    return done


class ShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy with lgframe's safe loading and atomic saving (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(filepath))
        staging = staging_path(path)
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self.barrier("lgframe_checkpoint_staging")
        if "current_model_state" in checkpoint:  # ShardedEMA: the average in state_dict, both written as shards
            staging.mkdir(parents=True, exist_ok=True)
            converted = {"state_dict": checkpoint.pop("state_dict"),
                         "current_model_state": checkpoint.pop("current_model_state")}
            converted.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))})
            _distributed_checkpoint_save(converted, staging)
            if self.global_rank == 0:
                torch.save(checkpoint, staging / "meta.pt")
        else:
            super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("lgframe_checkpoint_written")
        if self.global_rank == 0:
            swap_in(staging, path)
        self.barrier("lgframe_checkpoint_swapped")

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():
            return super().load_checkpoint(path, weights_only=True)
        md = read_dcp_metadata(path)  # refuses a crafted .metadata before torch sees the folder
        meta = load_checkpoint(path / "meta.pt")
        module = self.model
        with_average = any(k.startswith("current_model_state.") for k in md.state_dict_metadata)
        ema = sharded_ema(self.lightning_module.trainer)
        try:
            # a checkpoint written with ShardedEMA keeps the training weights in current_model_state
            key = "current_model_state" if with_average else "state_dict"
            state = {key: get_model_state_dict(module)}
            dcp_load(state, path)
            module.load_state_dict(state[key], strict=self.lightning_module.strict_loading)
            if ema is not None:  # the average: from state_dict, or the weights themselves for an EMA-less checkpoint
                average = {"state_dict": ema.build(self.lightning_module)} if with_average else None
                if average is not None:
                    dcp_load(average, path)
                else:
                    with torch.no_grad():
                        for k, v in get_model_state_dict(module).items():
                            ema.average[k].copy_(v)
            for i, optim in enumerate(self.optimizers):
                key = f"optimizer_{i}"
                ostate = {key: get_optimizer_state_dict(module, optim)}
                dcp_load(ostate, path)
                set_optimizer_state_dict(module, optim, optim_state_dict=ostate[key],
                                         options=StateDictOptions(cpu_offload=True))
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit, LgframeError)):
                raise
            inner = dcp_inner_error(e)
            if isinstance(inner, LgframeError):
                raise inner from None
            raise LgframeError(f"distributed checkpoint '{path}' could not be restored: {inner}") from None
        return meta


def make_sharded_strategy(accelerator: str, devices, num_nodes: int) -> ShardedStrategy:
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    n = int(devices) if str(devices).isdigit() else (torch.cuda.device_count() if gpu else 1)
    # Pure data parallelism: every process holds a shard (tensor parallel size 1).
    return ShardedStrategy(data_parallel_size=n * num_nodes, tensor_parallel_size=1,
                           process_group_backend="nccl" if gpu else "gloo")
