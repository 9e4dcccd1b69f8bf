"""lgframe: constraint-based pre-training and learngene transfer on PyTorch Lightning.

The public Python API (the notebook form of the CLI's stages)::

    import lgframe
    run = lgframe.fit("dit_digits_pretrain", {"trainer.max_steps": 200})
    lg = lgframe.Learngene.load(run.learngene)
    small = lgframe.descend(lg, "DiT-Pico/2")
    images = lgframe.sample(small, n=10)
    lgframe.save_pretrained(small, "pico")  # a hub-style folder; lgframe.from_pretrained("pico")

Names are imported on first use, so `import lgframe` (and the CLI's `--help`) stays
fast and never pulls in torch or Lightning by itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Constraint", "Learngene", "RunResult", "__version__", "create_model", "descend", "evaluate",
           "extract_learngene", "fit", "from_pretrained", "get_constraint", "list_constraints", "load_model",
           "load_recipe", "refit", "sample", "save_model", "save_pretrained"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (below)
    from lgframe.api import (  # noqa: F401
        Constraint,
        Learngene,
        RunResult,
        create_model,
        descend,
        evaluate,
        extract_learngene,
        fit,
        from_pretrained,
        get_constraint,
        list_constraints,
        load_model,
        load_recipe,
        refit,
        sample,
        save_model,
        save_pretrained,
    )


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("lgframe.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lgframe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
