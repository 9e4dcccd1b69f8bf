"""The Python API: what `import lgframe` offers (see `lgframe.__all__`).

Each function is the notebook form of a CLI stage; the files they read and write
are the CLI's. `descend` and `extract_learngene` return objects and write nothing
(`descend_file` and `extract_learngene_file`, in lgframe.training.stages, are the
CLI's writing forms).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from lgframe.core.constraint import Constraint, attached_constraint
from lgframe.core.registry import constraint_names, get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene
from lgframe.models.files import read_model, save_model
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import RunResult, descendant, load_task
from lgframe.training.stages import evaluate as _evaluate
from lgframe.training.stages import fit as _fit
from lgframe.training.tasks import DiffusionTask

PathLike = str | os.PathLike


def list_constraints() -> list[str]:
    """The registered constraint names (built-ins and entry-point plugins)."""
    return constraint_names()


def load_model(path: PathLike, ema: bool = True) -> nn.Module:
    """A model from a model .safetensors file, a Lightning .ckpt written by lgframe (its
    EMA weights when present, unless `ema=False`) or an fsdp checkpoint folder."""
    return read_model(path, ema=ema)[0]


def fit(recipe=None, overrides=None, *, model: nn.Module | None = None, extract_learngene: bool = True,
        run_dir: PathLike | None = None) -> RunResult:
    """Train a recipe (a YAML path, a shipped recipe's name, a mapping, a `Recipe` or a
    DictConfig) with `overrides` (`key=value` strings or a mapping); returns the run's
    curves and files (`RunResult`: run_dir, checkpoint, curve, learngene, samples).
    `model` trains that model (e.g. a descendant from `descend`) instead of the one the
    recipe would build; it keeps the constraint it carries."""
    cfg = load_recipe(recipe, overrides)
    if model is not None:
        c = model.config
        cfg.model.name = f"{c.family.replace('dit', 'DiT').replace('vit', 'ViT')}-Nano/{c.patch_size}"
        cfg.model.depth, cfg.model.width, cfg.model.heads = c.depth, c.width, c.heads
    return _fit(cfg, extract_learngene=extract_learngene, run_dir=Path(run_dir) if run_dir is not None else None,
                model=model)


def refit(model: PathLike, constraint: str, out: PathLike, recipe=None, overrides=None):
    """A dense model file into a constrained ancestor by distillation (`lgframe refit`): the closed
    form, trained against the dense model on the recipe's data; its learngene written to `out`.
    Returns a RefitResult (run, learngene, weight_error, teacher_error curve, loss, teacher_loss)."""
    from lgframe.training.refit import refit as _refit

    return _refit(model, constraint, out, recipe=recipe, overrides=list(overrides or []))


def extract_learngene(source: PathLike | nn.Module, constraint=None) -> Learngene:
    """The learngene of a trained model (in memory, or a checkpoint / model file). With
    `constraint`, the model's dense weights are decomposed by it first (a copy: the
    model given is not changed). Save it with `Learngene.save(path)`."""
    model = read_model(source)[0] if not isinstance(source, nn.Module) else copy.deepcopy(source)
    carried = attached_constraint(model)
    if constraint is not None:
        if carried is not None:
            get_constraint(carried.to_dict()).materialize(model)
        c = get_constraint(constraint)
        c.attach(model, init="dense")
        return c.learngene(model)
    if carried is None:
        raise LgframeError(f"this model has no constraint; name one to decompose it with, e.g. constraint='svd' "
                           f"(registered: {', '.join(constraint_names())})")
    return get_constraint(carried.to_dict()).learngene(model)


def descend(learngene: Learngene | PathLike, size: str | list[str] | None = None, options: dict | None = None,
            **dims) -> nn.Module:
    """A descendant model, in memory, initialized from `learngene`. `size` is a table
    name (`"DiT-Pico/2"`) and/or `depth=`, `width=`, `heads=` over the ancestor's size;
    `options` override the learngene's constraint options for the descent."""
    lg = learngene if isinstance(learngene, Learngene) else Learngene.load(learngene)
    return descendant(lg, size, options, **dims)


def sample(model: nn.Module | PathLike, n: int = 10, labels: torch.Tensor | None = None, guidance: float | None = None,
           steps: int | None = None, scheduler: str | None = None, seed: int | None = None) -> torch.Tensor:
    """Images (n, C, H, W) in [-1, 1] from a DiT (in memory or a file); classes 0, 1, ...
    in turn unless `labels` are given. Sampling settings default to the model's recipe."""
    task = load_task(model)
    if not isinstance(task, DiffusionTask):
        raise LgframeError("sample needs a DiT; this is a " + task.model.config.family + " model")
    if labels is None:
        if n < 1:
            raise LgframeError(f"n={n}: the number of samples must be at least 1")
        labels = torch.arange(n) % task.model.config.num_classes
    return task.sample(labels, guidance=guidance, steps=steps, scheduler=scheduler, seed=seed)


def evaluate(model: nn.Module | PathLike, data: str = "digits", n_samples: int = 500, **sampling) -> dict:
    """Validation loss (and accuracy for a ViT); for a DiT on digits also the FID and class
    accuracy of `n_samples` generated images (see `lgframe evaluate`)."""
    task = load_task(model)
    return _evaluate(task, load_recipe(None, {"data.name": data}).data, n_samples=n_samples, **sampling)


__all__ = ["Constraint", "Learngene", "RunResult", "create_model", "descend", "evaluate", "extract_learngene", "fit",
           "get_constraint", "list_constraints", "load_model", "load_recipe", "sample", "save_model"]
