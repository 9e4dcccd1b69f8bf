"""Model files: one safetensors file whose header holds the model's config, its
constraint and its frozen parameters, and the reverse (a model rebuilt from a
model file, a Lightning checkpoint or a distributed-checkpoint folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint, load_distributed_checkpoint
from lgframe.formats.files import read_safetensors, save_tensors
from lgframe.models.registry import model_from_config

MODEL_FORMAT = "lgframe.model"


def model_meta(model: nn.Module) -> dict:
    """What is needed to rebuild `model`: its config, its constraint, frozen params."""

    spec = attached_constraint(model)
    return {
        "format": MODEL_FORMAT,
        "model": model.config.to_dict(),
        "constraint": spec.to_dict() if spec is not None else None,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def check_model_meta(meta: Any, where) -> None:
    """The lgframe record of a model file or checkpoint: a missing or malformed key is named."""
    if not isinstance(meta, dict):
        raise LgframeError(f"'{where}': its lgframe record is a {type(meta).__name__}, not a mapping.")
    if meta.get("format", MODEL_FORMAT) != MODEL_FORMAT:
        raise LgframeError(f"'{where}': lgframe record of format {meta.get('format')!r}; this lgframe reads {MODEL_FORMAT!r}.")
    if not isinstance(meta.get("model"), dict) or "family" not in meta["model"]:
        raise LgframeError(f"'{where}': its lgframe record has no model config ('model' with a 'family'); the file was "
                           "changed or not written by lgframe.")
    c = meta.get("constraint")
    if c is not None and not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("options", {}), dict)):
        raise LgframeError(f"'{where}': its lgframe record's 'constraint' must be null or {{name, options}}, not {c!r}.")
    if not isinstance(meta.get("frozen", []), list):
        raise LgframeError(f"'{where}': its lgframe record's 'frozen' must be a list of parameter names.")


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model (with its constraint attached, if any) and load `state`."""

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


CONSOLIDATED = "model.safetensors"  # what a sharded run writes into its run folder at its end


def consolidated_model(folder: Path) -> Path | None:
    """The run folder's consolidated model file when it was written from this very
    distributed checkpoint (same step): reading it needs no gather and no pickle."""
    candidate = folder.parent.parent / CONSOLIDATED
    if folder.parent.name != "checkpoints" or not candidate.is_file() or not (folder / "meta.pt").is_file():
        return None
    try:
        _, raw = read_safetensors(candidate, "consolidated model")
        step = json.loads(raw.get("lgframe", "{}")).get("global_step")
        return candidate if step is not None and step == load_checkpoint(folder / "meta.pt").get("global_step") else None
    except (LgframeError, ValueError):
        return None


def read_model(path: str | os.PathLike, ema: bool = True) -> tuple[nn.Module, dict]:
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
        try:
            meta = json.loads(raw["lgframe"])
        except json.JSONDecodeError as e:
            raise LgframeError(f"model file '{p}': its lgframe config is not valid JSON ({e}).") from None
        check_model_meta(meta, p)
        return build_model(meta, tensors), meta
    if p.is_dir():
        consolidated = consolidated_model(p)
        if consolidated is not None:
            return read_model(consolidated)
        ckpt = load_distributed_checkpoint(p)
    else:
        ckpt = load_checkpoint(p)
    if "lgframe" not in ckpt:
        raise LgframeError(f"checkpoint '{p}' was not written by lgframe (no 'lgframe' entry).")
    meta = dict(ckpt["lgframe"])
    check_model_meta(meta, p)
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    if not isinstance(ckpt.get(key), dict):
        raise LgframeError(f"checkpoint '{p}' has no '{key}' mapping of weights.")
    recipe = ckpt.get("hyper_parameters", {}).get("recipe")
    if recipe is not None:
        meta["recipe"] = recipe
    state = {k[len("model."):]: v for k, v in ckpt[key].items() if k.startswith("model.")}
    return build_model(meta, state), meta
