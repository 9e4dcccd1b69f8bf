"""Hugging Face transformers models (BertModel, ViTModel) as ancestors and descendants.

`lgframe.core.layout` reads a transformers model's size from its config (depth
`num_hidden_layers`, width `hidden_size`, heads `num_attention_heads`, MLP
hidden `intermediate_size`) and its roles from a built-in map (`HF_MODELS`), so
every constraint attaches to such a model, extracts its learngene and descends
into one. What `model_from_config` does for lgframe's own models is done here
for transformers ones: `hf_model` builds a fresh model of the ancestor's class
with another config, and `descend_hf` initializes it from the learngene::

    lg = lgframe.extract_learngene(bert, "svd")
    small = descend_hf(lg, num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    small = descend_hf(lg, target=my_bert)  # or a model (or a config) built by the user

Size keys may also be given by lgframe's names: depth, width, heads, mlp_hidden.
Nothing downloads: models are built from configs.
"""

from __future__ import annotations

import importlib

import torch.nn as nn

from lgframe.core.layout import is_transformers_model
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene

FAMILY_PREFIX = "transformers:"
ALIASES = {"depth": "num_hidden_layers", "width": "hidden_size", "heads": "num_attention_heads",
           "mlp_hidden": "intermediate_size"}


def _transformers():
    try:
        return importlib.import_module("transformers")  # deferred: transformers (seconds to import)
    except ImportError:
        raise LgframeError("transformers is not installed: pip install transformers") from None


def _model_class(family: str) -> type:
    if not family.startswith(FAMILY_PREFIX):
        raise LgframeError(f"this learngene comes from a '{family}' model, not a transformers one; descend it with "
                           "lgframe.descend (lgframe's own sizes) instead")
    name = family[len(FAMILY_PREFIX):]
    cls = getattr(_transformers(), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LgframeError(f"the learngene's model class '{name}' is not in this transformers installation")
    return cls


def hf_model(source: Learngene | nn.Module, config=None, **changes) -> nn.Module:
    """A fresh transformers model (its own random init) of the class of `source` (a
    learngene extracted from a transformers model, or such a model), with `source`'s
    config, or `config` (a config object or dict) when given, and `changes` applied
    (transformers' keys, or lgframe's depth/width/heads/mlp_hidden)."""
    if isinstance(source, Learngene):
        cls, base = _model_class(source.family), source.ancestor_config
    elif isinstance(source, nn.Module) and is_transformers_model(source):
        cls, base = type(source), source.config.to_dict()
    else:
        raise LgframeError(f"hf_model needs a learngene of a transformers model or a transformers model, "
                           f"not {type(source).__name__}")
    if config is not None:
        base = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    changes = {ALIASES.get(k, k): v for k, v in changes.items() if v is not None}
    unknown = sorted(k for k in changes if k not in base)
    if unknown:
        raise LgframeError(f"unknown config key(s) {unknown} for {cls.__name__}; size keys: "
                           f"{', '.join(f'{k} (or {a})' for a, k in ALIASES.items())}")
    try:
        return cls(cls.config_class.from_dict(dict(base) | changes))
    except (ValueError, TypeError) as e:
        raise LgframeError(f"{cls.__name__} cannot be built with {changes}: {str(e).splitlines()[0]}") from None


def descend_hf(learngene: Learngene, target=None, options: dict | None = None, **changes) -> nn.Module:
    """A transformers descendant initialized from `learngene` (extracted from a model of
    the same class): `target` is a built model of the target size, or a config; without
    it the ancestor's config with `changes` (e.g. num_hidden_layers=2, hidden_size=16,
    num_attention_heads=1, intermediate_size=32). `options` override the learngene's
    constraint options for the descent (ranks are re-derived for the target size)."""
    _model_class(learngene.family)
    if isinstance(target, nn.Module):
        if changes:
            raise LgframeError(f"give a target model or config changes, not both (got a model and {sorted(changes)})")
        model = target
    else:
        model = hf_model(learngene, config=target, **changes)
    own = {k: v for k, v in learngene.options.items() if k != "rank"}
    return get_constraint({"name": learngene.constraint, "options": own | dict(options or {})}).descend(learngene, model)
