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
from lgframe.models.files import read_model, read_pretrained, save_model
from lgframe.models.files import save_pretrained as _save_pretrained
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import RunResult, descendant, load_task, read_curve
from lgframe.training.stages import evaluate as _evaluate
from lgframe.training.stages import fit as _fit
from lgframe.training.tasks import DiffusionTask

PathLike = str | os.PathLike


def list_constraints() -> list[str]:
    """The registered constraint names (built-ins and entry-point plugins)."""
    return constraint_names()


def load_model(path: PathLike, ema: bool = True) -> nn.Module:
    """A model from a model .safetensors file, a folder written by `save_pretrained`, a
    Lightning .ckpt written by lgframe (its EMA weights when present, unless `ema=False`)
    or an fsdp checkpoint folder."""
    return read_model(path, ema=ema)[0]


def save_pretrained(model: nn.Module | PathLike, folder: PathLike, ema: bool = True) -> Path:
    """`model` (in memory, or any file `load_model` reads) as a hub-style folder:
    `config.json` (model config, constraint and options, frozen parameters; from a
    file also its recipe, step and whether the weights are EMA) and `model.safetensors`
    (plain tensors, readable with safetensors alone). From a checkpoint its EMA weights
    are written when present, unless `ema=False`. Atomic; replaces only an earlier
    lgframe model folder, never a user's. Read it back with `from_pretrained` (or
    `load_model`). See lgframe.models.files.save_pretrained."""
    if isinstance(model, nn.Module):
        return _save_pretrained(model, folder)
    m, meta = read_model(model, ema=ema)
    return _save_pretrained(m, folder, meta)


def from_pretrained(folder: PathLike) -> nn.Module:
    """The model of a folder written by `save_pretrained` (for a model file or
    checkpoint, `load_model`)."""
    return read_pretrained(folder)[0]


def run_facts(source: PathLike, meta: dict) -> dict:
    """Where a model read from `source` came from, for a learngene's card (`Learngene.about`):
    the file, its run folder (a checkpoint's `RUN/checkpoints/X.ckpt`, or a file beside
    RUN/metrics.csv), the recipe's name, task, data and steps, the checkpoint's step and
    whether its weights are EMA, and the first and last value of each validation metric
    in the run's metrics up to that step. Paths are left out (a card gets published)."""
    p = Path(source)
    recipe = meta.get("recipe") or {}
    about: dict = {"file": p.name}
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if (run / "metrics.csv").is_file():
        about["run"] = run.name
    if recipe:
        data = recipe.get("data") or {}
        about |= {"recipe": recipe.get("name"), "task": recipe.get("task"),
                  "data": {k: data[k] for k in ("name", "classes", "train_fraction", "image_size")
                           if data.get(k) is not None and not (k == "train_fraction" and data[k] == 1)},
                  "max_steps": (recipe.get("trainer") or {}).get("max_steps")}
    about |= {k: meta[k] for k in ("global_step", "ema") if k in meta}
    if "run" in about:
        with open(run / "metrics.csv") as f:
            keys = [k for k in f.readline().strip().split(",") if k.startswith("val/")]
        last = meta.get("global_step")
        metrics = {k: [[s, v] for s, v in read_curve(run, k) if last is None or s <= last] for k in keys}
        about["metrics"] = {k: [pts[0], pts[-1]] for k, pts in metrics.items() if pts}
    return {k: v for k, v in about.items() if v not in (None, {}, [])}


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
    model given is not changed). Save it with `Learngene.save(path)`, or as a folder with
    a model card with `Learngene.save_pretrained(folder)`; read from a file, it records
    where it came from (`run_facts`) in its manifest and card."""
    if isinstance(source, nn.Module):
        model, about = copy.deepcopy(source), {}
    else:
        model, meta = read_model(source)
        about = run_facts(source, meta)
    carried = attached_constraint(model)
    if constraint is not None:
        if carried is not None:
            get_constraint(carried.to_dict()).materialize(model)
        c = get_constraint(constraint)
        c.attach(model, init="dense")
        lg = c.learngene(model)
    elif carried is None:
        raise LgframeError(f"this model has no constraint; name one to decompose it with, e.g. constraint='svd' "
                           f"(registered: {', '.join(constraint_names())})")
    else:
        lg = get_constraint(carried.to_dict()).learngene(model)
    lg.about = about
    return lg


def descend(learngene: Learngene | PathLike, size: str | list[str] | None = None, options: dict | None = None,
            **dims) -> nn.Module:
    """A descendant model, in memory, initialized from `learngene` (a Learngene, a learngene
    file, or a folder from `Learngene.save_pretrained`). `size` is a table
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
           "from_pretrained", "get_constraint", "list_constraints", "load_model", "load_recipe", "sample", "save_model",
           "save_pretrained"]
