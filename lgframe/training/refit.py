"""From a pretrained dense model to a constrained ancestor, correctly: `lgframe refit`.

A closed-form decomposition of a dense model into a factorized constraint loses most
of it (svd's shared bases, kronecker's few templates, tucker's ranks: the relative
weight error is measured by `FactorizedConstraint.attach_dense`). WAVE does not
decompose: it trains the constrained form to match the dense model. `refit` does
that: the constrained form starts from the closed form (as well as the constraint
allows), then trains on data against the dense model as teacher (the recipe's
`teacher:` machinery: the teacher's noise prediction for a DiT, its logits for a ViT),
with the task loss at `distill.task_weight` (0 by default: pure distillation).
Every validation logs `val/teacher_error` (||student - teacher|| / ||teacher|| of the
outputs, the same noise and timesteps) beside `val/loss` and the teacher's own
`val/teacher_loss`; the result says where the output error started (the closed form)
and where it ended.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lgframe.core.constraint import FactorizedConstraint
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError

LOSSY = 0.10  # relative weight error above which a closed-form decomposition is refused


@dataclass
class RefitResult:
    run: object  # the RunResult of the training
    learngene: Path
    weight_error: dict[str, float]  # closed form, per role and "all"
    teacher_error: list[tuple[int, float]]  # (step, relative output error); step 0 = the closed form
    loss: list[tuple[int, float]]  # the student's validation loss
    teacher_loss: float  # the teacher's validation loss on the same noise


def lossy_message(source, name: str, errors: dict[str, float]) -> str:
    worst = max((k for k in errors if k != "all"), key=errors.get)
    return (f"decomposing the dense model '{source}' into constraint '{name}' in closed form leaves a relative weight "
            f"error of {errors['all']:.2f} over its roles (worst: {worst} {errors[worst]:.2f}), above {LOSSY:.2f}: the "
            f"learngene would carry little of the model. Refit instead, which starts from this decomposition and trains "
            f"the constrained form to match the dense model on data: `lgframe refit {source} --constraint {name} "
            f"--out REFIT.safetensors [recipe overrides, e.g. data.name=... trainer.max_steps=...]`. Pass "
            f"--allow-lossy to keep the closed form anyway.")


def closed_form_errors(model, constraint) -> dict[str, float] | None:
    """attach(init="dense") on `model` and its relative weight errors; None for a constraint
    that keeps the dense weights (dct, dwt, select: nothing is decomposed at attach)."""
    c = get_constraint(constraint) if not hasattr(constraint, "attach") else constraint
    if not isinstance(c, FactorizedConstraint):
        c.attach(model, init="dense")
        return None
    return c.attach_dense(model)


def refit(source: str | os.PathLike, constraint: str, out: str | os.PathLike, recipe: str | None = None,
          overrides: list[str] | None = None) -> RefitResult:
    """Train `constraint`'s form of the dense model `source` to match it; the learngene to `out`."""
    from lgframe.formats.learngene import paths_for
    from lgframe.models.files import read_model
    from lgframe.training.recipes import load_recipe
    from lgframe.training.stages import fit, read_curve

    model, meta = read_model(source)
    if meta.get("constraint"):
        raise LgframeError(f"refit: '{source}' already carries constraint '{meta['constraint']['name']}'; refit "
                           "starts from a dense model (materialize it first, or train it further with `lgframe train`)")
    family = model.config.family
    recipe = recipe or ("dit_digits_pretrain" if family == "dit" else "vit_digits_pretrain")
    c = model.config
    given = [f"constraint={constraint}", f"init.source={source}", f"teacher={source}", "distill.task_weight=0.0",
             f"model.depth={c.depth}", f"model.width={c.width}", f"model.heads={c.heads}"]
    cfg = load_recipe(recipe, given + list(overrides or []))
    if not isinstance(get_constraint(cfg.constraint if isinstance(cfg.constraint, str) else dict(cfg.constraint)),
                      FactorizedConstraint):
        raise LgframeError(f"refit: constraint '{constraint}' keeps the dense weights (it decomposes nothing at "
                           "attach); extract its learngene directly: `lgframe learngene MODEL --constraint "
                           f"{constraint} --out LG`")
    run = fit(cfg, extract_learngene=True)
    teacher_error = read_curve(run.run_dir, "val/teacher_error")
    teacher_loss = read_curve(run.run_dir, "val/teacher_loss")
    out = Path(out)
    from lgframe.formats.learngene import Learngene

    Learngene.load(run.learngene).save(out)
    weight_error = getattr(run.task, "dense_weight_error", None) or {}
    return RefitResult(run, paths_for(out)[0], weight_error, teacher_error, run.curve,
                       teacher_loss[-1][1] if teacher_loss else float("nan"))
