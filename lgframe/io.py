"""Files: atomic writes, model files (safetensors + config), checkpoints loaded safely.

Everything lgframe writes goes to a temporary file in the target directory,
is flushed and fsynced, then renamed over the target, so a crash mid-write
leaves the previous file intact. Nothing is ever unpickled: model files and
learngenes are safetensors; Lightning checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lgframe.errors import LgframeError

MODEL_FORMAT = "lgframe.model"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path`
    (an existing folder is moved aside first and removed after), so a failed
    export never leaves a half-written model folder behind."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise LgframeError(f"{what} '{p}' does not exist (or is not a file).")
    return p


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = require_file(path, what)
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(p)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise LgframeError(f"{what} '{p}' is not a readable safetensors file ({e}).") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint, loaded with weights_only=True (no arbitrary unpickling)."""
    p = require_file(path, "checkpoint")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise LgframeError(
            f"checkpoint '{p}' could not be loaded safely (weights_only=True): {e}. "
            "lgframe reads Lightning .ckpt files it wrote and .safetensors model files."
        ) from None


def load_distributed_checkpoint(path: Path) -> dict:
    """A distributed-checkpoint folder (written under trainer.strategy=fsdp) as one
    checkpoint dict: Lightning's meta.pt plus the consolidated tensors."""
    if not (path / "meta.pt").is_file() or not (path / ".metadata").is_file():
        raise LgframeError(f"'{path}' is a directory but not a distributed checkpoint (no .metadata / meta.pt).")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = load_checkpoint(path / "meta.pt")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        ckpt |= load_checkpoint(Path(tmp) / "full.pt")
    return ckpt


def atomic_checkpoint_io():
    """Lightning CheckpointIO that writes each .ckpt beside its target, fsyncs and
    renames (Lightning's own goes through fsspec, whose local transaction stages
    the file in the system temp dir and then moves it: a copy across devices)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

    return AtomicCheckpointIO()


# ------------------------------------------------------------------ model state
def model_meta(model: nn.Module) -> dict:
    """What is needed to rebuild `model`: its config, its constraint, frozen params."""
    from lgframe.constraint import attached_constraint

    spec = attached_constraint(model)
    return {
        "format": MODEL_FORMAT,
        "model": model.config.to_dict(),
        "constraint": spec.to_dict() if spec is not None else None,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model (with its constraint attached, if any) and load `state`."""
    from lgframe.constraint import get_constraint
    from lgframe.models import model_from_config

    model = model_from_config(meta["model"])
    if meta.get("constraint"):
        get_constraint(meta["constraint"]).attach(model, init="random")
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise LgframeError(f"weights do not fit the model described by their config: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise LgframeError(
                f"weights do not fit the model described by their config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    frozen = set(meta.get("frozen", []))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return model


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    meta = model_meta(model) | (extra or {})
    save_tensors(path, dict(model.state_dict()), {"lgframe": json.dumps(meta)})


def load_model(path: str | os.PathLike, ema: bool = True) -> tuple[nn.Module, dict]:
    """A model from a `.safetensors` model file or a Lightning `.ckpt` written by lgframe.
    Returns (model, meta). From a checkpoint, the EMA weights are used when present."""
    p = Path(path)
    if p.suffix == ".safetensors":
        tensors, raw = read_safetensors(p, "model file")
        if "lgframe" not in raw:
            raise LgframeError(
                f"'{p}' is a safetensors file without an lgframe model config; if it is a learngene, "
                "use `lgframe descend` on it."
            )
        meta = json.loads(raw["lgframe"])
        return build_model(meta, tensors), meta
    if p.is_dir():
        ckpt = load_distributed_checkpoint(p)
    else:
        ckpt = load_checkpoint(p)
    if "lgframe" not in ckpt:
        raise LgframeError(f"checkpoint '{p}' was not written by lgframe (no 'lgframe' entry).")
    meta = dict(ckpt["lgframe"])
    recipe = ckpt.get("hyper_parameters", {}).get("recipe")
    if recipe is not None:
        meta["recipe"] = recipe
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    state = {k[len("model."):]: v for k, v in ckpt[key].items() if k.startswith("model.")}
    return build_model(meta, state), meta
