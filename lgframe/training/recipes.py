"""Recipes: YAML loaded with OmegaConf and merged over a dataclass schema.

An unknown key or a wrong type fails at load time with the valid keys named
(and a close match suggested); `key=value` dotlist overrides from the command
line go through the same check. The constraint is one line: `constraint: svd`
or `constraint: {name: svd, rank: 16}`.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lgframe.core.registry import get_constraint
from lgframe.data.datasets import CROPS, DATA_NAMES
from lgframe.errors import LgframeError
from lgframe.models.registry import FAMILIES, resolve_config

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # lgframe/recipes: a link to the repository's recipes/ (a copy in a wheel)
TASKS = ("diffusion", "classification")


LR_SCHEDULES = ("constant", "cosine", "linear")
LOGGERS = ("csv", "tensorboard", "wandb")


@dataclass
class ModelCfg:
    name: str = "DiT-Nano/2"  # a size from `lgframe list`
    depth: Optional[int] = None  # overrides of the size table
    width: Optional[int] = None
    heads: Optional[int] = None
    # Input geometry and classes; None = taken from the data (8x8x1, 10 classes for digits).
    image_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None
    freq_shift: Optional[int] = None  # DiT timestep embedding; 1 = diffusers' convention (needed to export)
    mlp_act: Optional[str] = None  # gelu_tanh (default) | gelu (exact, as timm's ViT)


@dataclass
class DataCfg:
    name: str = "digits"  # digits | shapes | animals (lgframe[data]) | imagefolder | latents
    batch_size: int = 128
    val_fraction: float = 0.2
    seed: int = 0
    train_fraction: float = 1.0  # < 1: the limited-data setting
    augment: bool = False
    num_workers: int = 0
    shuffle: bool = True  # false: the same global batches at any world size (equivalence checks)
    classes: Optional[list[int]] = None  # keep only these labels (e.g. fine-tuning on a subset)
    path: Optional[str] = None  # imagefolder: one subfolder per class; latents: a folder from `lgframe encode`
    image_size: Optional[int] = None  # imagefolder (default 32): side after resize/crop; animals: 28 (native), 16, 32; digits, shapes: 8 (native) or any by resize / drawing
    val_subset: Optional[int] = None  # validate on a fixed random subset of this many validation images (null: all)
    channels: int = 3  # imagefolder: 1 (grayscale) or 3 (RGB)
    crop: str = "center"  # imagefolder: center (short side, then centre crop) | resize (square, aspect not kept)
    vae: Optional[str] = None  # latents: local AutoencoderKL folder for decoding samples (default: the one encode used)


@dataclass
class OptimCfg:
    name: str = "adamw"  # adamw | sgd (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    learngene_lr: Optional[float] = None  # None: same as lr
    scaler_lr: Optional[float] = None  # None: same as lr (scalers often need more, see DESIGN)
    warmup_steps: int = 0
    # after the warmup: constant | cosine (to 0 at max_steps) | linear (to 0), diffusers' get_scheduler curves
    schedule: str = "constant"
    grad_clip: float = 1.0


@dataclass
class TrainerCfg:
    max_steps: int = 1000
    val_every: int = 100  # steps between validations
    log_every: int = 10
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    progress: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at the end
    nan_skip: int = 0  # non-finite gradient steps to skip before stopping the run
    accumulate_grad_batches: int = 1  # batches per optimizer step; max_steps, val_every count optimizer steps
    logger: list[str] = field(default_factory=lambda: ["csv"])  # csv (always kept) + tensorboard, wandb (offline)
    # recompute each block's activations in the backward (memory for compute; lgframe/training/speed.py)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile of each block (needs a working compiler: a C++ one on CPU, triton on GPU)
    # TF32 matmuls on CUDA (torch.set_float32_matmul_precision("high")): Ampere and later, for 32-true runs
    tf32: bool = True


@dataclass
class DiffusionCfg:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    label_dropout: float = 0.1  # probability of the null class during training (CFG)
    clip_sample: bool = True  # samplers clip the predicted x0 (and the sample) to [-clip_range, clip_range]
    clip_range: float = 1.0  # 1 for images in [-1, 1]; wider for standardized data (weight tokens)
    # What the model predicts (diffusers' prediction_type): epsilon (the noise; DiT's own), v_prediction
    # (v = sqrt(abar) eps - sqrt(1 - abar) x0, stable at high noise for unclipped data) or sample (x0).
    prediction: str = "epsilon"


@dataclass
class SampleCfg:
    n: int = 100  # 10 per class for the 10-class data; 0: no samples.png at the end of training
    steps: int = 50
    guidance: float = 2.0
    scheduler: str = "ddim"  # ddim | ddpm | dpm (DPM-Solver++ multistep)
    spacing: str = "leading"  # diffusers' timestep_spacing: leading | trailing | linspace
    seed: int = 0
    uncond_from: Optional[str] = None  # checkpoint whose null-class prediction is the CFG unconditional term


@dataclass
class DistillCfg:
    weight: float = 1.0  # weight of the match-the-teacher term
    task_weight: float = 1.0  # weight of the task's own loss
    temperature: float = 2.0  # ViT soft labels: KL at this temperature (times T^2)


@dataclass
class MimCfg:
    mask_ratio: float = 0.5  # fraction of patches masked per image (objective: self_supervised, ViT)


@dataclass
class EmaCfg:
    enabled: bool = True
    decay: float = 0.999
    start_step: int = 0
    # diffusers' warm-up: decay min(decay, (1 + n) / (10 + n)) at the n-th update, so a short run's
    # average does not keep decay^steps of its starting weights (lgframe/training/ema.py)
    warmup: bool = True


@dataclass
class InitCfg:
    # Where the model's weights come from: None (fresh), a checkpoint (.ckpt or
    # model .safetensors) or a learngene (.safetensors with a .json manifest beside).
    source: Optional[str] = None
    # Phase 2 of descendant training: step at which the learngene is unfrozen
    # (-1 = never; phase 1 trains scalers and free parameters only, the learngene gets no gradient).
    unfreeze_at: int = -1
    # Linear warmup of the learngene's rate after `unfreeze_at` (its Adam state starts then);
    # None: optim.warmup_steps.
    unfreeze_warmup: Optional[int] = None
    # A learngene source only: bake the descendant's dense weights right after the descent and
    # train it as a plain model (WAVE's stage 2: the constraint is dropped; unfreeze_at does nothing).
    materialize: bool = False


@dataclass
class CompareCfg:
    """`lgframe compare`: which constraints, target sizes, seeds and budgets."""

    constraints: list[str] = field(default_factory=lambda: ["all"])  # names, or [all]: every registered one
    sizes: list[str] = field(default_factory=lambda: ["DiT-Pico/2", "DiT-Micro/2"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 300  # each descendant and scratch model
    ancestor_steps: int = 800
    points: int = 20  # validation points per curve (every steps // points steps): enough to resolve a 2x speed-up
    unfreeze_at: Optional[int] = None  # descendants' init.unfreeze_at; None: half of `steps`
    train_fraction: float = 1.0  # < 1: the limited-data setting for the descendants
    descendant_data: Optional[str] = None  # another data source for the descendants (domain shift), e.g. shapes
    ancestor_recipe: str = "dit_digits_pretrain"
    descendant_recipe: str = "dit_digits_descend"


@dataclass
class PersonalizeCfg:
    """`lgframe personalize`: DiT-BlockSkip LoRA personalization (see lgframe/apps/personalize.py)."""

    base: Optional[str] = None  # pretrained DiT: model file or checkpoint
    subject: str = "shapes:3"  # shapes:K (generated shapes of class K) or a folder of images
    n_images: int = 8  # training images of the subject
    val_images: int = 4  # held-out subject images (validation loss at full resolution)
    image_size: int = 16  # s_max: the subject images' side, and the sampling resolution
    s_min: Optional[int] = None  # training resolution; None = the base model's image_size
    patch_sampling: bool = True  # crop side s(t) from s_min to s_max by timestep; off: resize to s_min
    patch_positions: str = "crop"  # crop: tokens keep their full-resolution positions | grid: an s_min image's
    skip_front: int = 0  # first n blocks: frozen, run without gradients
    skip_back: int = 0  # last m blocks: replaced by the frozen base's residual delta
    lora_rank: int = 4
    lora_alpha: float = 4.0
    samples: int = 16  # samples of the subject in the report


@dataclass
class MultisizeCfg:
    """WeiT multi-size pre-training (off by default): every optimizer step runs its forward and
    backward through one nested sub-network, (depth, width) drawn from these lists by a
    generator seeded with (seed, step), the same on every rank (lgframe/training/tasks.py).
    Validation always runs the full model."""

    depths: Optional[list[int]] = None  # nested depths (the evenly spaced layers of nested.depth_layers); null: full only
    widths: Optional[list[int]] = None  # nested widths in features (whole heads); null: full only
    width_ratios: Optional[list[float]] = None  # or the widths as ratios of the model's width (not both)
    every: int = 1  # draw a size on every N-th optimizer step; the steps between train the full model
    include_full: bool = True  # the model's own depth and width join the lists when missing


@dataclass
class Recipe:
    task: str = "diffusion"  # diffusion | classification
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    # Continue a run: "auto" (the run directory's checkpoints/last.ckpt) or a checkpoint
    # path (.ckpt file, or the folder a trainer.strategy=fsdp run writes); any world size.
    resume: Optional[str] = None
    constraint: Any = "svd"  # a name, or {name: ..., option: value}
    # supervised | self_supervised (no labels: the DiT denoises with the null
    # class only; the ViT does masked image modeling, see `mim`).
    objective: str = "supervised"
    # WAVE-style distillation for any constraint: a dense model file or checkpoint
    # whose predictions the model learns to match (DiT: noise prediction; ViT:
    # soft labels), weighted by `distill`.
    teacher: Optional[str] = None
    distill: DistillCfg = field(default_factory=DistillCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    mim: MimCfg = field(default_factory=MimCfg)
    init: InitCfg = field(default_factory=InitCfg)
    compare: CompareCfg = field(default_factory=CompareCfg)
    personalize: PersonalizeCfg = field(default_factory=PersonalizeCfg)
    multisize: MultisizeCfg = field(default_factory=MultisizeCfg)


def _schema_node(path: list[str]):
    node = Recipe
    for key in path:
        f = {x.name: x for x in fields(node)}.get(key)
        if f is None or not is_dataclass(f.default_factory() if f.default_factory is not None else None):
            return node
        node = f.default_factory().__class__
    return node


def _explain(e: OmegaConfBaseException, where: str) -> LgframeError:
    key = getattr(e, "full_key", None) or ""
    parts = [p for p in str(key).split(".") if p]
    if isinstance(e, ConfigKeyError) and parts:
        parent = _schema_node(parts[:-1])
        valid = [f.name for f in fields(parent)]
        close = difflib.get_close_matches(parts[-1], valid, n=1)
        hint = f" Did you mean '{'.'.join(parts[:-1] + close)}'?" if close else ""
        section = ".".join(parts[:-1]) or "the recipe top level"
        return LgframeError(
            f"unknown recipe key '{key}' in {where}.{hint} Valid keys in {section}: {', '.join(valid)}."
        )
    if isinstance(e, ValidationError):
        return LgframeError(f"recipe key '{key}' in {where}: {e.msg.splitlines()[0]}")
    return LgframeError(f"recipe error in {where}: {str(e).splitlines()[0]}")


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without .yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / p.name, RECIPE_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    raise LgframeError(
        f"recipe '{path}' does not exist. Shipped recipes: {', '.join(r.stem for r in shipped_recipes())}."
    )


def shipped_recipes() -> list[Path]:
    return sorted(RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []


def _dotlist(overrides) -> list[str]:
    """`key=value` strings, or a mapping (nested or with dotted keys) turned into them."""
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):
        raise LgframeError(f"overrides must be a list of key=value strings or a mapping, not the string {overrides!r}")
    if hasattr(overrides, "items"):
        flat: list[str] = []

        def walk(prefix, node):
            for k, v in node.items():
                key = f"{prefix}{k}"
                if hasattr(v, "items") and key != "constraint":
                    walk(key + ".", v)
                else:
                    value = OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                    flat.append(f"{key}={_yaml_value(value)}")

        walk("", overrides)
        return flat
    return list(overrides)


def _yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        return json.dumps(v)  # JSON is YAML: OmegaConf parses it back to the same structure
    return str(v)


def read_recipe_file(p: Path) -> DictConfig:
    """A recipe file's mapping; not YAML, or not a mapping, is one clear error."""
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:
        raise LgframeError(f"recipe '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise LgframeError(f"recipe '{p}' must be a mapping of keys to values")
    return loaded


def load_recipe(path: str | Path | dict | Recipe | DictConfig | None = None, overrides=None) -> DictConfig:
    """Schema defaults <- the recipe <- overrides, validated; returns a DictConfig.

    The recipe is a YAML path, the name of a shipped recipe, a mapping, a `Recipe`
    or a DictConfig; overrides are `key=value` strings (as on the command line) or
    a mapping (`{"trainer": {"max_steps": 100}}` or `{"trainer.max_steps": 100}`)."""
    cfg = OmegaConf.structured(Recipe)
    where = "defaults"
    overrides = _dotlist(overrides)
    try:
        if isinstance(path, (Recipe, DictConfig)) or hasattr(path, "items"):
            where = "the recipe mapping"
            given = OmegaConf.structured(path) if isinstance(path, Recipe) else path
            if not isinstance(given, DictConfig):
                given = OmegaConf.create(dict(given))
            cfg = OmegaConf.merge(cfg, given)
        elif path is not None:
            p = resolve_recipe_path(path)
            where = str(p)
            cfg = OmegaConf.merge(cfg, read_recipe_file(p))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise LgframeError(f"override {bad[0]!r} must look like key=value (e.g. trainer.max_steps=500)")
            where = "command-line overrides"
            # `constraint=svd` replaces a mapping with a name: drop the old value first.
            for o in overrides:
                if o.split("=", 1)[0] == "constraint":
                    cfg.constraint = None
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    validate(cfg)
    return cfg


OBJECTIVES = ("supervised", "self_supervised")
PREDICTIONS = ("epsilon", "v_prediction", "sample")  # diffusion.prediction: diffusers' prediction_type values


def validate(cfg: DictConfig) -> None:

    if cfg.task not in TASKS:
        raise LgframeError(f"recipe key 'task' is {cfg.task!r}; valid: {', '.join(TASKS)}")
    family = "dit" if cfg.task == "diffusion" else "vit"
    m = cfg.model
    mc = resolve_config(m.name, depth=m.depth, width=m.width, heads=m.heads, freq_shift=m.freq_shift, mlp_act=m.mlp_act)
    if mc["family"] != family:
        raise LgframeError(f"task '{cfg.task}' needs a {family.upper()} model, but model.name is '{m.name}'")

    try:
        FAMILIES[family][1](**mc).validate()
    except ValueError as e:
        raise LgframeError(f"recipe model: {e}") from None
    get_constraint(constraint_spec(cfg))  # unknown name / option fails here, before training
    for name in cfg.compare.constraints:
        if name != "all":
            get_constraint(name)  # an unknown name fails here
    if cfg.optim.name not in ("adamw", "sgd"):
        raise LgframeError(f"optim.name={cfg.optim.name!r}; valid: adamw, sgd")
    if cfg.optim.schedule not in LR_SCHEDULES:
        raise LgframeError(f"optim.schedule={cfg.optim.schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    bad = [name for name in cfg.trainer.logger if name not in LOGGERS]
    if bad:
        raise LgframeError(f"trainer.logger has {', '.join(map(repr, bad))}; valid: {', '.join(LOGGERS)} "
                           "(csv is always written: the reports read it)")
    if cfg.sample.scheduler not in ("ddim", "ddpm", "dpm"):
        raise LgframeError(f"sample.scheduler={cfg.sample.scheduler!r}; valid: ddim, ddpm, dpm")
    if cfg.sample.spacing not in ("leading", "trailing", "linspace"):
        raise LgframeError(f"sample.spacing={cfg.sample.spacing!r}; valid: leading, trailing, linspace "
                           "(diffusers' timestep_spacing)")

    if cfg.data.name not in DATA_NAMES:
        raise LgframeError(f"data.name={cfg.data.name!r}; valid: {', '.join(DATA_NAMES)}")
    if cfg.data.crop not in CROPS:
        raise LgframeError(f"data.crop={cfg.data.crop!r}; valid: {', '.join(CROPS)}")
    if cfg.objective not in OBJECTIVES:
        raise LgframeError(f"objective={cfg.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if cfg.teacher is not None and not Path(cfg.teacher).exists():
        raise LgframeError(f"teacher '{cfg.teacher}' does not exist; give a model .safetensors or a .ckpt written by lgframe")
    if cfg.distill.temperature <= 0 or cfg.distill.weight < 0 or cfg.distill.task_weight < 0:
        raise LgframeError("distill: temperature must be > 0, weight and task_weight >= 0")
    if cfg.diffusion.prediction not in PREDICTIONS:
        raise LgframeError(f"diffusion.prediction={cfg.diffusion.prediction!r}; valid: {', '.join(PREDICTIONS)}")
    if cfg.sample.n < 0:
        raise LgframeError(f"sample.n={cfg.sample.n}; valid: 0 (no sample grid) or more")
    if not cfg.diffusion.clip_range > 0:
        raise LgframeError(f"diffusion.clip_range={cfg.diffusion.clip_range}; valid: a number > 0 (1 for images in [-1, 1])")
    if not 0 < cfg.mim.mask_ratio < 1:
        raise LgframeError(f"mim.mask_ratio={cfg.mim.mask_ratio}; valid: a fraction strictly between 0 and 1")
    check_ranges(cfg)
    check_multisize(cfg, mc)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what diffusers' DDPM, DDIM and DPM all take


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> (test, what is valid). Checked on every recipe before anything is written.
RANGES: dict[str, tuple[Any, str]] = {
    "trainer.max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.val_every": (lambda v: v >= 1, "an integer >= 1 (steps between validations)"),
    "trainer.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.checkpoint_every": (lambda v: v >= 0, "0 (only at the end) or an integer >= 1"),
    "trainer.nan_skip": (lambda v: v >= 0, "0 (stop at the first non-finite step) or more"),
    "trainer.num_nodes": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1 (batches per optimizer step)"),
    "optim.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0 (freeze a group with optim.learngene_lr=0 "
                                                 "or optim.scaler_lr=0 instead)"),
    "optim.learngene_lr": (lambda v: v is None or (_finite(v) and v >= 0), "null (derive from optim.lr) or a number >= 0"),
    "optim.scaler_lr": (lambda v: v is None or (_finite(v) and v >= 0), "null (derive from optim.lr) or a number >= 0"),
    "optim.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.warmup_steps": (lambda v: v >= 0, "0 (no warmup) or an integer >= 1"),
    "optim.grad_clip": (lambda v: _finite(v) and v >= 0, "0 (no clipping) or a finite number > 0"),
    "diffusion.num_train_timesteps": (lambda v: v >= 2, "an integer >= 2 (1000 is DiT's)"),
    "diffusion.beta_schedule": (lambda v: v in BETA_SCHEDULES, ", ".join(BETA_SCHEDULES)),
    "diffusion.label_dropout": (lambda v: _finite(v) and 0 <= v < 1, "a probability in [0, 1)"),
    "sample.steps": (lambda v: v >= 1, "an integer >= 1"),
    "sample.guidance": (lambda v: _finite(v), "a finite number (1 = no guidance)"),
    "ema.decay": (lambda v: _finite(v) and 0 < v < 1, "a number strictly between 0 and 1 (e.g. 0.999)"),
    "ema.start_step": (lambda v: v >= 0, "an integer >= 0"),
    "init.unfreeze_at": (lambda v: v >= -1, "-1 (never) or a step >= 0"),
    "init.unfreeze_warmup": (lambda v: v is None or v >= 0, "null (optim.warmup_steps), 0 (none) or a number of steps"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.image_size": (lambda v: v is None or v >= 1, "null (the data set's own) or an integer >= 1"),
    "data.val_subset": (lambda v: v is None or v >= 1, "null (the whole validation split) or an integer >= 1"),
    "compare.steps": (lambda v: v >= 1, "an integer >= 1"),
    "compare.ancestor_steps": (lambda v: v >= 1, "an integer >= 1"),
    "compare.seeds": (lambda v: len(v) >= 1, "a non-empty list of seeds"),
    "compare.points": (lambda v: v >= 2, "an integer >= 2 (validation points per curve)"),
    "compare.unfreeze_at": (lambda v: v is None or v >= -1, "null (half of compare.steps), -1 (never) or a step >= 0"),
    "compare.train_fraction": (lambda v: _finite(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    "personalize.n_images": (lambda v: v >= 1, "an integer >= 1"),
    "personalize.val_images": (lambda v: v >= 1, "an integer >= 1"),
    "personalize.image_size": (lambda v: v >= 1, "an integer >= 1"),
    "personalize.lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "personalize.lora_alpha": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "personalize.samples": (lambda v: v >= 0, "an integer >= 0"),
    "personalize.skip_front": (lambda v: v >= 0, "an integer >= 0"),
    "personalize.skip_back": (lambda v: v >= 0, "an integer >= 0"),
}


def check_ranges(cfg: DictConfig) -> None:
    """Every numeric key against its valid range: a violation names the key, the value and what is valid."""
    for key, (ok, valid) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise LgframeError(f"recipe key '{key}' is {value!r}; valid: {valid}.")
    d = cfg.trainer.devices
    if not (d == "auto" or (isinstance(d, int) and not isinstance(d, bool) and d >= 1) or
            (isinstance(d, str) and d.isdigit() and int(d) >= 1) or (isinstance(d, (list, ListConfig)) and len(d) >= 1)):
        raise LgframeError(f"recipe key 'trainer.devices' is {d!r}; valid: auto, a count >= 1, or a list of device ids.")
    if cfg.sample.steps > cfg.diffusion.num_train_timesteps:
        raise LgframeError(f"recipe key 'sample.steps' is {cfg.sample.steps}; valid: at most diffusion.num_train_timesteps "
                           f"({cfg.diffusion.num_train_timesteps}).")


def constraint_spec(cfg: DictConfig) -> Any:
    c = cfg.constraint
    if c is None:
        raise LgframeError("recipe key 'constraint' is empty; give a name like 'svd' or 'scratch'")
    return OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# ------------------------------------------------------------------ multisize (WeiT multi-size pre-training)
def multisize_on(ms) -> bool:
    """Whether a `multisize` section asks for any nested size (all lists null or empty: off)."""
    return bool(ms) and any(ms.get(k) for k in ("depths", "widths", "width_ratios"))


def multisize_sizes(ms, depth: int, dims, constraint) -> tuple[list[int], list[float]] | None:
    """The depths and width ratios a `multisize` section draws from for a model of `depth`
    layers and width structure `dims` (lgframe.core.layout.Dims) under `constraint` (a
    Constraint), sorted, without repeats; None when the section is off. Refuses, naming what
    is valid: a depth outside 1..depth, a width that does not keep whole heads, widths and
    width_ratios together, and a narrower width under a constraint whose bank cannot nest
    width (lgframe.models.nested.width_nesting_constraints)."""
    from lgframe.models.nested import check_width_nesting, nested_dims, width_ratio

    if not multisize_on(ms):
        return None
    if ms.get("widths") and ms.get("width_ratios"):
        raise LgframeError("multisize: give widths (features) or width_ratios, not both")
    if not (isinstance(ms.get("every", 1), int) and ms.get("every", 1) >= 1):
        raise LgframeError(f"recipe key 'multisize.every' is {ms.get('every')!r}; valid: an integer >= 1")
    depths = list(ms.get("depths") or [])
    bad = [d for d in depths if not (isinstance(d, int) and 1 <= d <= depth)]
    if bad:
        raise LgframeError(f"multisize.depths has {', '.join(map(str, bad))}: a model of {depth} layers has nested "
                           f"depths 1..{depth}")
    if ms.get("widths"):
        ratios = [width_ratio(dims, int(w)) for w in ms["widths"]]
    else:
        ratios = [float(r) for r in ms.get("width_ratios") or []]
        for r in ratios:
            nested_dims(dims, r)  # whole heads, or the valid ratios named
    if ms.get("include_full", True) or not depths:
        depths.append(depth)
    if ms.get("include_full", True) or not ratios:
        ratios.append(1.0)
    if any(r < 1 for r in ratios):
        check_width_nesting(constraint.name)
        if getattr(constraint.options, "width_ratios", None):
            raise LgframeError(f"multisize widths and constraint option width_ratios of {constraint.name} both nest "
                               "the width each step: use one (multisize.widths, or the constraint's width_ratios)")
    return sorted(set(depths)), sorted(set(ratios))


def check_multisize_trainer(trainer) -> None:
    """Trainer settings a multi-size step cannot run under: the nested sub-network exists while the
    forward runs, and both of these run the blocks again outside it (recompute in the backward;
    a compiled block's graph, traced without the nesting hooks)."""
    why = {"activation_checkpointing": "the backward recomputes each block after the step left its nested sub-network",
           "compile": "compiled blocks do not see the nesting hooks"}
    for key, reason in why.items():
        if trainer.get(key):
            raise LgframeError(f"multisize with trainer.{key}=true: {reason}; set trainer.{key}=false for "
                               "multi-size pre-training")


def check_multisize(cfg: DictConfig, model_config: dict) -> None:
    """The recipe's `multisize` section against the recipe's own model, constraint and trainer, at
    load time (the task checks it again against the model it trains)."""
    if not multisize_on(cfg.multisize):
        return
    from lgframe.core.layout import dims_of

    check_multisize_trainer(cfg.trainer)
    multisize_sizes(OmegaConf.to_container(cfg.multisize), model_config["depth"], dims_of(model_config),
                    get_constraint(constraint_spec(cfg)))
