"""Model registry: names that encode sizes (timm's `create_model` idea).

`create_model("DiT-Nano/2", image_size=8, in_channels=1, num_classes=10)`
builds lgframe's DiT; `depth=`, `width=`, `heads=` override the table, so a
descendant of any size is one call. `model_from_config(dict)` rebuilds a model
from the config stored in a checkpoint or learngene manifest.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch.nn as nn

from lgframe.errors import LgframeError
from lgframe.models.dit import DIT_PATCHES, DIT_SIZES, DiT, DiTConfig
from lgframe.models.vit import VIT_PATCHES, VIT_SIZES, ViT, ViTConfig

FAMILIES = {"dit": (DiT, DiTConfig, DIT_SIZES, DIT_PATCHES), "vit": (ViT, ViTConfig, VIT_SIZES, VIT_PATCHES)}


def model_names(family: str | None = None) -> list[str]:
    names = []
    for fam, (_, _, sizes, patches) in FAMILIES.items():
        if family in (None, fam):
            names += [f"{base}/{p}" for base in sizes for p in patches]
    return names


def _lookup(name: str) -> tuple[str, int, tuple[int, int, int]]:
    base, _, patch = name.partition("/")
    for fam, (_, _, sizes, patches) in FAMILIES.items():
        if base in sizes and patch.isdigit() and int(patch) in patches:
            return fam, int(patch), sizes[base]
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    table = ", ".join(
        f"{fam.upper().replace('DIT', 'DiT').replace('VIT', 'ViT')}-{{{','.join(b.split('-', 1)[1] for b in sizes)}}}"
        f"/{{{','.join(map(str, patches))}}}"
        for fam, (_, _, sizes, patches) in FAMILIES.items()
    )
    raise LgframeError(
        f"unknown model '{name}'.{hint} Valid names: {table}; "
        "sizes can also be given explicitly with depth=, width=, heads=."
    )


def resolve_config(name: str, **overrides: Any) -> dict:
    """The full config dict for a named size with overrides applied (None = keep)."""
    family, patch, (depth, width, heads) = _lookup(name)
    cfg = FAMILIES[family][1](depth=depth, width=width, heads=heads, patch_size=patch).to_dict()
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in cfg:
            raise LgframeError(f"unknown model option '{k}'; valid: {', '.join(sorted(cfg))}")
        cfg[k] = v
    return cfg


def model_from_config(cfg: dict) -> nn.Module:
    family = cfg.get("family")
    if family not in FAMILIES:
        raise LgframeError(f"unknown model family '{family}'; valid: {', '.join(FAMILIES)}")
    cls, config_cls, _, _ = FAMILIES[family]
    fields = config_cls.__dataclass_fields__
    unknown = set(cfg) - set(fields)
    if unknown:
        raise LgframeError(f"unknown {family} config keys {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
    try:
        return cls(config_cls(**cfg))
    except ValueError as e:
        raise LgframeError(str(e)) from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    return model_from_config(resolve_config(name, **overrides))


def parse_size(spec: str | list[str]) -> tuple[str | None, dict]:
    """A `--model` value: a table name ('DiT-Pico/2') and/or `depth=4 width=96 heads=3`.
    Returns (name or None, overrides)."""
    tokens = spec.split() if isinstance(spec, str) else list(spec)
    name, overrides = None, {}
    for tok in tokens:
        if "=" in tok:
            k, v = tok.split("=", 1)
            if k not in ("depth", "width", "heads"):
                raise LgframeError(f"unknown size key '{k}' in --model; valid: depth, width, heads")
            try:
                overrides[k] = int(v)
            except ValueError:
                raise LgframeError(f"--model {k}={v}: expected an integer") from None
        else:
            _lookup(tok)
            name = tok
    if name is None and not overrides:
        raise LgframeError("--model needs a size name (e.g. DiT-Pico/2) or depth=, width=, heads=")
    return name, overrides
