"""Model files: one safetensors file whose header holds the model's config, its
constraint and its frozen parameters, or a hub-style folder of the same record
(config.json) and plain weights (model.safetensors); and the reverse (a model
rebuilt from a model file or folder, a Lightning checkpoint or a
distributed-checkpoint folder).
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
from lgframe.formats.files import read_safetensors, save_tensors, write_json
from lgframe.formats.learngene import FOLDER_MANIFEST, pretrained_folder
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


# ------------------------------------------------------------------ hub-style folders
FOLDER_CONFIG, FOLDER_WEIGHTS = "config.json", "model.safetensors"
KEPT = ("recipe", "global_step", "ema")  # what a record read from a file adds to model_meta, and a folder keeps


def _config_format(path: Path) -> str | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj.get("format") if isinstance(obj, dict) else None


def save_pretrained(model: nn.Module, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """`model` as a hub-style folder (the layout of Hugging Face's `save_pretrained`):

    - `config.json`: what `model_meta` holds (format, model config, constraint and its
      options, frozen parameter names), plus, from `meta` (the record `read_model`
      returned), the run's `recipe` (sampling and data settings), its `global_step`
      and `ema`: true when the weights are the EMA average a checkpoint held (what
      `read_model` gives by default), false when they are the trained weights
      (`ema=False`, or a run without EMA); absent for a model saved from memory,
      whose weights are whatever it holds. One set of weights per folder: save the
      other set to a second folder.
    - `model.safetensors`: the state dict as plain tensors (metadata {"format": "pt"}
      only), readable with `safetensors.torch.load_file` alone; a constrained model's
      are its factors (e.g. svd's U, sigma, V), as in its state dict.

    Written to a temporary folder beside, then renamed. An existing folder is replaced
    only when it is an earlier lgframe model folder (config.json of lgframe's format
    and model.safetensors, nothing else); any other raises LgframeError untouched."""
    record = model_meta(model) | {k: meta[k] for k in KEPT if meta and k in meta}
    own = {FOLDER_CONFIG: lambda f: _config_format(f) == MODEL_FORMAT, FOLDER_WEIGHTS: None}
    with pretrained_folder(folder, own, "model folder") as tmp:
        save_tensors(tmp / FOLDER_WEIGHTS, dict(model.state_dict()), {"format": "pt"})
        write_json(tmp / FOLDER_CONFIG, record)
    return Path(folder)


def read_pretrained(folder: str | os.PathLike) -> tuple[nn.Module, dict]:
    """A model from a folder written by `save_pretrained`. Returns (model, its config.json)."""
    p = Path(folder)
    cfg = p / FOLDER_CONFIG
    if not cfg.is_file():
        learngene = (p / FOLDER_MANIFEST).is_file()
        raise LgframeError(f"'{p}' is not an lgframe model folder: it has no {FOLDER_CONFIG}" + (
            f". It holds a learngene: descend it (`lgframe descend {p} --model ...`, lgframe.descend), or train "
            f"from it with init.source={p / FOLDER_MANIFEST.replace('.json', '.safetensors')}." if learngene
            else "; a model file or checkpoint is read by lgframe.load_model."))
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise LgframeError(f"model folder config '{cfg}' is not valid JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise LgframeError(f"'{cfg}' is not an lgframe model config (format {got!r}, expected {MODEL_FORMAT!r}); a "
                           f"diffusers or timm folder is read with `lgframe import diffusers|timm {p} --out FILE`.")
    check_model_meta(meta, cfg)
    tensors, _ = read_safetensors(p / FOLDER_WEIGHTS, "model weights file")
    return build_model(meta, tensors), meta


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
    """A model from a `.safetensors` model file, a folder written by `save_pretrained`
    (or its model.safetensors), or a Lightning `.ckpt` or fsdp checkpoint folder written
    by lgframe. Returns (model, meta). From a checkpoint, the EMA weights are used when
    present (meta["ema"] says which were read)."""
    p = Path(path)
    if p.is_dir() and ((p / FOLDER_CONFIG).is_file() or (p / FOLDER_MANIFEST).is_file()):
        return read_pretrained(p)
    if p.suffix == ".safetensors":
        tensors, raw = read_safetensors(p, "model file")
        if "lgframe" not in raw and p.name == FOLDER_WEIGHTS and (p.parent / FOLDER_CONFIG).is_file():
            return read_pretrained(p.parent)
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
    if isinstance(ckpt.get("global_step"), int):
        meta["global_step"] = ckpt["global_step"]
    meta["ema"] = key == "state_dict" and "current_model_state" in ckpt
    state = {k[len("model."):]: v for k, v in ckpt[key].items() if k.startswith("model.")}
    return build_model(meta, state), meta
