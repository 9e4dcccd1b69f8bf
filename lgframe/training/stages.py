"""The stages as functions: fit (pretrain / train), learngene, descend, sample, evaluate.

The CLI and the demo call these; so can a notebook. A run directory holds
config.yaml (the resolved recipe), metrics.csv, checkpoints/last.ckpt,
learngene.safetensors + learngene.json (pretrain), samples.png (DiT) and
loss.png.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import constraint_class, constraint_names, get_constraint
from lgframe.data.datamodule import build_datamodule
from lgframe.data.datasets import image_folder_classes
from lgframe.data.latents import decode, load_vae, sample_decoder
from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint, read_dcp_metadata
from lgframe.formats.files import atomic_path, read_safetensors, write_text
from lgframe.formats.learngene import Learngene, paths_for
from lgframe.models.files import CONSOLIDATED, build_model, model_meta, read_model, save_model
from lgframe.models.registry import model_from_config, parse_size, resolve_config
from lgframe.training.checkpointing import AtomicCheckpointIO, FiniteCheckpoint
from lgframe.training.distributed import make_sharded_strategy, recover_checkpoints
from lgframe.training.ema import ShardedEMA, WarmupEMA
from lgframe.training.metrics import FEATURE_DATA, class_accuracy, digits_fid, inception_fid
from lgframe.training.progress import StepProgressBar
from lgframe.training.recipes import constraint_spec, load_recipe, to_plain, validate
from lgframe.training.rundir import RunLock, remove_partial_files, resolve_run_dir, unique_dir  # noqa: F401 (unique_dir: API)
from lgframe.training.tasks import DiffusionTask, LgTask, make_task

log = logging.getLogger("lgframe")

# Known, harmless warnings of the libraries, silenced inside fit only (never at import).
QUIET = (
    r".*WeightAveraging callback with a model that overrides the configure_model.*",  # attach is not sharding
    r".*Experiment logs directory .* exists and is not empty.*",  # config.yaml is written there first
    r".*does not have many workers.*",  # in-memory tensors: workers would only add start-up time
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*litlogger.*",
    r".*'set_vital' is deprecated.*",  # torchdata's StatefulDataLoader calls a deprecated torch hook
)


# ------------------------------------------------------------------ init sources
def source_kind(path: str | os.PathLike) -> str:
    """'checkpoint' (.ckpt), 'model' (model .safetensors) or 'learngene'."""
    p = Path(path)
    if not p.exists() and not paths_for(p)[0].exists():
        raise LgframeError(f"init source '{p}' does not exist; give a checkpoint (.ckpt or an fsdp checkpoint folder), a "
                           "model .safetensors, or a learngene .safetensors with its .json manifest.")
    if p.is_dir() and (p / "learngene.safetensors").is_file():  # a folder from Learngene.save_pretrained
        return "learngene"
    if p.suffix in (".ckpt", ".pt", ".pth") or p.is_dir():
        return "checkpoint"
    st, js = paths_for(p)
    if js.is_file():
        return "learngene"
    _, meta = read_safetensors(st, "init source")
    if "lgframe" in meta:
        return "model"
    if "lgframe_learngene" in meta:
        return "learngene"
    raise LgframeError(f"'{p}' is neither an lgframe model file nor a learngene (no lgframe metadata, no manifest)")


def descend_model(learngene: Learngene, model: nn.Module, options: dict | None = None) -> nn.Module:
    """`model` (dense, target size) initialized from `learngene`; the learngene's
    constraint options are kept unless `options` overrides them."""
    own = {k: v for k, v in learngene.options.items() if k != "rank"}  # ranks are re-derived for the target size
    opts = own | dict(options or {})
    opts.pop("rank", None)
    try:
        constraint_class(learngene.constraint)(**own)
    except LgframeError as e:
        raise LgframeError(
            f"the learngene's manifest names constraint '{learngene.constraint}' with options "
            f"{sorted(learngene.options)}, which do not fit it ({e}); the manifest was edited or comes from another "
            "lgframe version. Re-extract the learngene."
        ) from None
    return constraint_class(learngene.constraint)(**opts).descend(learngene, model)


def recipe_model_config(cfg: DictConfig, check_data: bool = True) -> dict:
    """The model config a recipe describes: the size table, overrides, and the input
    geometry of the data (or of `model.image_size/in_channels/num_classes`)."""
    m = cfg.model
    mc = resolve_config(m.name, depth=m.depth, width=m.width, heads=m.heads, freq_shift=m.freq_shift,
                        mlp_act=m.mlp_act)
    keys = ("image_size", "in_channels", "num_classes")
    if not check_data and all(m[k] is not None for k in keys):  # the recipe gives the geometry: no data read
        return mc | {k: m[k] for k in keys}
    dm = build_datamodule(cfg.data)
    data = {"image_size": dm.image_size, "in_channels": dm.channels, "num_classes": dm.num_classes}
    for k, v in data.items():
        given = m[k]
        if given is not None and check_data and given != v:
            raise LgframeError(
                f"model.{k}={given} does not match data '{cfg.data.name}' ({k} {v}); "
                f"unset model.{k} or use data with {k} {given}."
            )
        mc[k] = v if given is None else given
    return mc


def starting_model(cfg: DictConfig) -> tuple[nn.Module, str]:
    """The model a recipe starts from, and how configure_model attaches its constraint."""
    src = cfg.init.source
    if src is None:
        return model_from_config(recipe_model_config(cfg)), "random"
    kind = source_kind(src)
    if kind == "learngene":
        family = "dit" if cfg.task == "diffusion" else "vit"
        lg = Learngene.load(src, family=family)
        spec = constraint_spec(cfg)
        name, opts = (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items() if k != "name"})
        if name != lg.constraint:
            raise LgframeError(
                f"init.source '{src}' is a learngene of constraint '{lg.constraint}', but the recipe's constraint is "
                f"'{name}'; set constraint={lg.constraint}."
            )
        model = descend_model(lg, model_from_config(recipe_model_config(cfg)), opts.get("options", opts))
        if cfg.init.get("materialize"):  # WAVE's second stage: drop the constraint, train the dense weights
            return get_constraint(lg.constraint).materialize(model), "plain"
        return model, "random"
    model, meta = read_model(src)
    carried = (meta.get("constraint") or {}).get("name")
    spec = constraint_spec(cfg)
    name = spec if isinstance(spec, str) else spec.get("name")
    if carried is not None and carried != name:
        raise LgframeError(
            f"init.source '{src}' carries constraint '{carried}', but the recipe's constraint is '{name}'; set "
            f"constraint={carried} to continue it, or convert it explicitly first (e.g. `lgframe learngene {src} "
            f"--constraint {name} --out NEW` and init.source=NEW)."
        )
    # A dense checkpoint under a recipe constraint is decomposed, not re-initialized.
    return model, "dense"


# ------------------------------------------------------------------ fit
@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/loss)
    acc_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/acc)
    learngene: Path | None = None
    samples: Path | None = None
    task: LgTask | None = None
    model_file: Path | None = None  # sharded runs: the consolidated model.safetensors
    finished: bool = False  # resume=auto found the run already finished: nothing was trained or written

    @property
    def initial_loss(self) -> float:
        return self.curve[0][1]

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


def read_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(optimizer steps done, value) of one metric over a run's metrics files
    (metrics.csv, plus the ones set aside by each resume)."""
    out = {}
    files = sorted(run_dir.glob("metrics.before-resume-*.csv"), key=lambda f: f.stat().st_mtime)
    for path in files + [run_dir / "metrics.csv"]:
        if not path.is_file():
            continue
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    steps = row.get("steps") if key.startswith("val/") else None
                    out[int(float(steps)) if steps else int(row["step"])] = float(row[key])
    return sorted(out.items())


def resume_checkpoint(resume: str | None, run_dir: Path, strategy: str = "auto") -> Path | None:
    """The checkpoint `resume=` names: 'auto' is the run directory's last.ckpt."""
    if not resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "auto" else Path(resume)
    if resume == "auto":
        recover_checkpoints(path.parent)  # a kill between the two renames of a sharded save
    if not path.exists():
        raise LgframeError(
            f"resume={resume}: no checkpoint at '{path}'. Give resume=PATH to a .ckpt (or an fsdp checkpoint "
            "folder), or leave resume unset to start a new run."
        )
    if path.is_dir() and strategy != "fsdp":
        raise LgframeError(
            f"resume={resume}: '{path}' is a distributed (fsdp) checkpoint folder; resume it with "
            "trainer.strategy=fsdp (any number of devices, 1 included)."
        )
    return path


def checkpoint_info(path: Path) -> dict:
    """What a checkpoint says about itself (global_step, lgframe's model record), read
    safely: a .ckpt with weights_only=True, an fsdp folder's meta.pt likewise after
    its .metadata passed the allow-list."""
    if path.is_dir():

        read_dcp_metadata(path)
        return load_checkpoint(path / "meta.pt")
    return load_checkpoint(path)


def check_resume_fits(path: Path, info: dict, model: nn.Module, cfg: DictConfig) -> None:
    """A resume whose model or constraint differs from the checkpoint's fails in one sentence."""
    saved = info.get("lgframe")
    if not saved:
        raise LgframeError(f"resume: '{path}' was not written by lgframe (no 'lgframe' entry); it cannot be resumed.")
    have = saved.get("model", {})
    want = model.config.to_dict()
    diff = [f"{k} {have.get(k)} -> {want.get(k)}" for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    spec = constraint_spec(cfg)
    name = spec if isinstance(spec, str) else spec.get("name")
    carried = attached_constraint(model)
    name = carried.name if carried is not None else name
    saved_name = (saved.get("constraint") or {}).get("name", "scratch")
    if diff or saved_name != name:
        what = "; ".join(diff + ([f"constraint {saved_name} -> {name}"] if saved_name != name else []))
        raise LgframeError(
            f"resume: the checkpoint '{path}' holds another model than the recipe describes ({what}); resume with "
            "the recipe it was trained with (config.yaml in its run folder) or start a new run without resume."
        )


def finished_result(run_dir: Path, checkpoint: Path, step: int) -> RunResult:
    log.warning("run %s is finished at step %d (trainer.max_steps); nothing was changed. Raise trainer.max_steps to "
                "train it further.", run_dir, step)
    res = RunResult(run_dir, checkpoint, finished=True)
    res.curve = read_curve(run_dir, "val/loss")
    res.acc_curve = read_curve(run_dir, "val/acc")
    st = run_dir / "learngene.safetensors"
    res.learngene = st if st.is_file() else None
    res.samples = run_dir / "samples.png" if (run_dir / "samples.png").is_file() else None
    return res


def make_strategy(t) -> object:
    """`trainer.strategy`: auto | ddp | fsdp (FSDP2 through ModelParallelStrategy,
    which also runs on CPU with gloo; see lgframe/distributed.py) | any other
    Lightning strategy name."""
    if t.strategy != "fsdp":
        return t.strategy

    return make_sharded_strategy(t.accelerator, t.devices, t.num_nodes)


def full_model(task: LgTask, sharded: bool) -> nn.Module:
    """The task's model with full (unsharded) tensors; called on every rank."""
    if not sharded:
        return task.model


    state = get_model_state_dict(task.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return task.model  # full tensors land on rank 0 only
    return build_model(model_meta(task.model), state)


UNHONOURED = {  # trainer keys a one-device app run may not honour, with why and the valid value
    "compile": ("does not compile its blocks", False),
    "checkpoint_every": ("writes its own file once, at the end of the run", 0),
    "activation_checkpointing": ("does not recompute its blocks in the backward", False),
}


def refuse_unhonoured(recipe: dict, app: str, honoured: tuple[str, ...] = ()) -> None:
    """An app run (personalize, control) refuses the `trainer` keys of UNHONOURED it does
    not honour when they are set, instead of ignoring them."""
    t = recipe["trainer"]
    for key, (why, valid) in UNHONOURED.items():
        if key not in honoured and t.get(key, valid) != valid:
            raise LgframeError(f"trainer.{key}={t[key]!r}: {app} {why}; valid: {str(valid).lower()}")


def single_device_trainer(recipe: dict, run_dir: Path, callbacks: list | None = None, label: str | None = None,
                          precision: str | None = None) -> pl.Trainer:
    """A one-device Lightning Trainer from fit's pieces for an app run (personalize, control):
    its loggers, progress bar, WarmupEMA (`ema.*`), precision, accumulation and clipping; no
    checkpoints (the app writes its own file). The caller checks the keys it honours first."""
    t, e = recipe["trainer"], recipe["ema"]
    callbacks = list(callbacks or []) + ([StepProgressBar(label or recipe["name"])] if t["progress"] else [])
    if e["enabled"]:
        callbacks.append(WarmupEMA(decay=e["decay"], warmup=e["warmup"], update_starting_at_step=e["start_step"]))
    acc = t.get("accumulate_grad_batches", 1)
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        return pl.Trainer(
            max_steps=t["max_steps"], val_check_interval=t["val_every"] * acc, accumulate_grad_batches=acc,
            check_val_every_n_epoch=None, log_every_n_steps=t["log_every"], accelerator=t["accelerator"],
            devices=t["devices"], precision=precision or t["precision"],
            gradient_clip_val=recipe["optim"]["grad_clip"] or None,
            logger=make_loggers(t["logger"], run_dir, recipe["name"]), callbacks=callbacks, enable_checkpointing=False,
            enable_progress_bar=t["progress"], enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=run_dir)


def check_loggers(names) -> None:
    """Each logger of `trainer.logger` has its package (before any run folder is made)."""
    import importlib.util

    for name, package in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))):
        if name in names and not any(importlib.util.find_spec(p) for p in package):
            raise LgframeError(f'trainer.logger {name} needs the {package[0]} package: pip install "lgframe[{name}]"')


def make_loggers(names, run_dir: Path, run_name: str) -> list:
    """Lightning loggers for `trainer.logger`: the CSV logger always (metrics.csv, which the
    curves and reports read), then TensorBoard (event files under run_dir/tensorboard) and
    Weights & Biases (offline unless WANDB_MODE says otherwise; files under run_dir/wandb)."""
    check_loggers(names)
    loggers = [CSVLogger(run_dir, name="", version="")]
    if "tensorboard" in names:
        from lightning.pytorch.loggers import TensorBoardLogger  # deferred: optional tensorboard

        loggers.append(TensorBoardLogger(run_dir, name="", version="tensorboard", default_hp_metric=False))
    if "wandb" in names:
        from lightning.pytorch.loggers import WandbLogger  # deferred: optional wandb

        loggers.append(WandbLogger(name=run_name, save_dir=str(run_dir), offline=os.environ.get("WANDB_MODE") != "online"))
    return loggers


def fit(cfg: DictConfig, extract_learngene: bool = True, run_dir: Path | None = None,
        model: nn.Module | None = None, label: str | None = None) -> RunResult:
    """Train the recipe's model; writes a run directory and returns its curves.
    `label` names the stage on the progress bar (e.g. "ancestor 1/5: DiT-Nano/2 under svd").

    Everything that can be checked is checked before the run folder is created or
    changed: the recipe (every key and range), the init source, the teacher, the
    swapped prior, the data, and for a resume the checkpoint (read safely) and
    whether it holds the recipe's model. `resume=auto` on a finished run changes
    nothing and returns its results."""

    validate(cfg)
    check_loggers(cfg.trainer.logger)
    pl.seed_everything(cfg.seed, verbose=False)
    t = cfg.trainer
    multi = t.strategy in ("ddp", "fsdp") or t.devices not in (1, "1") or t.num_nodes > 1
    base = Path(run_dir or Path(cfg.out_dir) / cfg.name)
    resume = resume_checkpoint(cfg.resume, base, t.strategy)
    info = checkpoint_info(resume) if resume is not None else None
    if resume is not None:
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resolve_run_dir(base, multi)
    else:
        run_dir = resolve_run_dir(base, multi)
    recipe = to_plain(cfg)
    if model is None:
        model, mode = starting_model(cfg)
    else:  # a model in memory (e.g. from lgframe.descend): it keeps the constraint it carries
        mode = "random"
        carried = attached_constraint(model)
        if carried is not None:
            cfg.constraint = carried.to_dict()  # what the weights carry, recorded in config.yaml
            recipe = to_plain(cfg)
    if info is not None:
        check_resume_fits(resume, info, model, cfg)
        if int(info.get("global_step", 0)) >= t.max_steps and (run_dir / "checkpoints" / "last.ckpt") == resume:
            return finished_result(run_dir, resume, int(info["global_step"]))
    dm = build_datamodule(cfg.data)
    dm.setup()  # reads the data now: an unreadable folder fails before anything is written
    if cfg.task == "classification" and dm.num_classes < 2:
        names = image_folder_classes(dm.path)[1] if dm.name == "imagefolder" else list(range(dm.num_classes))
        raise LgframeError(f"classification needs at least 2 classes; data '{cfg.data.name}' has {dm.num_classes} "
                           f"({', '.join(repr(n) for n in names)}). Add a subfolder per class.")
    task = make_task(recipe, model, mode)
    uncond = sampling_kwargs(uncond_from=cfg.sample.uncond_from) if isinstance(task, DiffusionTask) else {}
    with RunLock(run_dir):
        return _fit_in(cfg, task, dm, run_dir, resume, extract_learngene, recipe, uncond, label)


def _fit_in(cfg, task, dm, run_dir: Path, resume, extract_learngene: bool, recipe: dict, uncond: dict,
            label: str | None = None) -> RunResult:
    t = cfg.trainer
    sharded = t.strategy == "fsdp"
    if rank_zero_only.rank == 0:
        for what in recover_checkpoints(run_dir / "checkpoints") + remove_partial_files(run_dir):
            log.warning("run folder %s: %s (left by an interrupted run)", run_dir, what)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    metrics = run_dir / "metrics.csv"
    if resume is not None and metrics.is_file() and rank_zero_only.rank == 0:
        # Lightning's CSV logger would start the file afresh: keep the history.
        os.replace(metrics, run_dir / f"metrics.before-resume-{len(list(run_dir.glob('metrics.before-resume-*')))}.csv")
    ckpt_cb = FiniteCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every or None,
    )
    callbacks: list = [ckpt_cb] + ([StepProgressBar(label or cfg.name)] if t.progress else [])
    if t.tf32 and torch.cuda.is_available():  # TF32 tensor-core matmuls for float32 (a no-op before Ampere)
        torch.set_float32_matmul_precision("high")
    if cfg.ema.enabled and sharded:  # Lightning's WeightAveraging copies the whole module: each rank averages its shard
        callbacks.append(ShardedEMA(decay=cfg.ema.decay, warmup=cfg.ema.warmup, update_starting_at_step=cfg.ema.start_step))
    elif cfg.ema.enabled:
        callbacks.append(WarmupEMA(decay=cfg.ema.decay, warmup=cfg.ema.warmup, update_starting_at_step=cfg.ema.start_step))
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer = pl.Trainer(
            max_steps=t.max_steps,
            val_check_interval=t.val_every * t.accumulate_grad_batches,  # Lightning counts batches here
            accumulate_grad_batches=t.accumulate_grad_batches,
            check_val_every_n_epoch=None,
            log_every_n_steps=t.log_every,
            accelerator=t.accelerator,
            strategy=make_strategy(t),
            devices=t.devices,
            num_nodes=t.num_nodes,
            precision=t.precision,
            gradient_clip_val=cfg.optim.grad_clip or None,
            logger=make_loggers(t.logger, run_dir, cfg.name),
            callbacks=callbacks,
            plugins=None if sharded else [AtomicCheckpointIO()],
            enable_progress_bar=t.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=run_dir,
        )
        task.checkpoint_dir = run_dir / "checkpoints"  # the NaN guard says what it kept
        if resume is None:
            trainer.validate(task, datamodule=dm, verbose=False)  # the step-0 loss
        trainer.fit(task, datamodule=dm, ckpt_path=resume, weights_only=True)
    result = RunResult(run_dir, Path(ckpt_cb.last_model_path), task=task)
    result.curve = read_curve(run_dir, "val/loss")
    result.acc_curve = read_curve(run_dir, "val/acc")
    model = full_model(task, sharded)  # every rank takes part in the gather
    if trainer.is_global_zero:
        if sharded:  # one plain file beside the shards: what sample / evaluate / export read
            save_model(model, run_dir / CONSOLIDATED, {"global_step": trainer.global_step, "recipe": recipe})
            result.model_file = run_dir / CONSOLIDATED
        plot_curves({cfg.name: result.curve}, run_dir / "loss.png", "validation loss")
        spec = attached_constraint(model)
        if extract_learngene and spec is not None:
            result.learngene = paths_for(run_dir / "learngene.safetensors")[0]
            get_constraint(spec.to_dict()).learngene(model).save(result.learngene)
        if isinstance(task, DiffusionTask) and cfg.sample.n > 0:  # sample.n=0: no sample grid
            result.samples = run_dir / "samples.png"
            sampler = task if not sharded else make_task(recipe, model)
            save_sample_grid(sampler, result.samples, n=cfg.sample.n, real=real_row(dm, model.config.num_classes),
                             **uncond)
    return result


# ------------------------------------------------------------------ other stages
def extract_learngene_file(checkpoint: str | os.PathLike, out: str | os.PathLike, constraint: str | dict | None = None,
                           allow_lossy: bool = False) -> tuple[Path, Path]:
    """The learngene of a checkpoint or model file. With `constraint`, the model's
    dense weights are decomposed by that constraint first (any dense checkpoint
    works, e.g. one trained with constraint=scratch). A factorized constraint whose
    closed form loses more than lgframe.training.refit.LOSSY of the weights (relative
    error) is refused with the measured error and the `lgframe refit` command, unless
    `allow_lossy`."""
    from lgframe.training.refit import LOSSY, closed_form_errors, lossy_message

    model, meta = read_model(checkpoint)
    carried = meta.get("constraint")
    if constraint is not None:
        if carried is not None:
            get_constraint(carried).materialize(model)
        c = get_constraint(constraint)
        errors = closed_form_errors(model, c)
        if errors is not None and errors["all"] > LOSSY:
            if not allow_lossy:
                raise LgframeError(lossy_message(checkpoint, c.name, errors))
            log.warning("--allow-lossy: %s keeps relative weight error %.2f of '%s'", c.name, errors["all"], checkpoint)
        return c.learngene(model).save(out)
    if carried is None:
        raise LgframeError(
            f"'{checkpoint}' holds a dense model with no constraint; name one to decompose it with, "
            f"e.g. --constraint svd (registered: {', '.join(constraint_names())})."
        )
    return get_constraint(carried).learngene(model).save(out)


def descendant(learngene: Learngene, size: str | list[str] | None = None, options: dict | None = None,
               **dims) -> nn.Module:
    """A descendant model of `size` (a table name and/or depth=/width=/heads= over the
    ancestor's size; `dims` adds depth=, width=, heads= as keywords), in memory."""
    if str(learngene.family).startswith("transformers:"):  # a Hugging Face ancestor: its own config, changed
        from lgframe.models.hf import descend_hf

        if size:
            raise LgframeError(f"the learngene comes from a {learngene.family} model: give its size as keywords "
                               "(depth=, width=, heads=, mlp_hidden= or the transformers config fields), not a table name")
        return descend_hf(learngene, options=options, **{k: v for k, v in dims.items() if v is not None})
    name, overrides = parse_size(size) if size else (None, {})
    overrides |= {k: v for k, v in dims.items() if v is not None}
    anc = learngene.ancestor_config
    if name is None:
        cfg = dict(anc) | overrides
    else:
        cfg = resolve_config(name, **overrides)
        if cfg["family"] != learngene.family:
            raise LgframeError(f"--model {name} is a {cfg['family']} size, but the learngene comes from a "
                               f"{learngene.family} model")
        cfg.update({k: anc[k] for k in ("image_size", "in_channels", "num_classes") if k in anc})
    return descend_model(learngene, model_from_config(cfg), options)


def descend_file(learngene: str | os.PathLike, size: str | list[str], out: str | os.PathLike, options: dict | None = None) -> nn.Module:
    """`lgframe descend`: a descendant model file of the given size from a learngene."""
    model = descendant(Learngene.load(learngene), size, options)
    save_model(model, out)
    return model


def load_task(checkpoint: str | os.PathLike | nn.Module, recipe: DictConfig | None = None) -> LgTask:
    """A task around a saved model (or a model in memory), for sampling and evaluation."""
    if isinstance(checkpoint, nn.Module):
        spec = attached_constraint(checkpoint)
        model, meta = checkpoint, {"constraint": spec.to_dict() if spec is not None else None}
    else:
        model, meta = read_model(checkpoint)
    if recipe is not None:
        plain = to_plain(recipe)
    elif "recipe" in meta:
        plain = meta["recipe"]
    else:  # a bare model file: default sampling and evaluation settings
        task = "diffusion" if model.config.family == "dit" else "classification"
        plain = to_plain(load_recipe(None, [f"task={task}", f"model.name={model.config.family.replace('dit', 'DiT').replace('vit', 'ViT')}-Nano/2"]))
    plain["constraint"] = meta.get("constraint") or "scratch"  # what the weights carry
    return make_task(plain, model)


def sampling_kwargs(guidance: float | None = None, steps: int | None = None, scheduler: str | None = None,
                    seed: int | None = None, uncond_from: str | None = None) -> dict:
    """Keyword arguments of DiffusionTask.sample; `uncond_from` loads the swapped prior."""
    kw = {"guidance": guidance, "steps": steps, "scheduler": scheduler, "seed": seed}
    if uncond_from:
        kw["uncond_model"] = read_model(uncond_from)[0]
    return kw


def to_pixels(task: DiffusionTask, x: torch.Tensor) -> torch.Tensor:
    """A latent DiT's samples decoded through its VAE (see lgframe/data/latents.py); pixel
    samples unchanged. Without the VAE folder, a warning and the latents' first
    channels (one, or three) scaled to [-1, 1]."""

    vae = sample_decoder(getattr(task, "recipe", {}).get("data"))
    if vae is None:
        return x
    if Path(vae).expanduser().is_dir():
        return decode(x, load_vae(vae))
    log.warning("latent samples not decoded: VAE folder '%s' is missing (set data.vae); saving the latents", vae)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return x / x.abs().amax().clamp_min(1e-8)


def save_sample_grid(task: DiffusionTask, out: str | os.PathLike, n: int = 100, progress: bool = False,
                     real: torch.Tensor | None = None, min_pixels: int = 32, **kw) -> Path:
    """n samples, one class per column, as a PNG grid; `real` (one image per class)
    becomes a first row, set apart by a gap. Images smaller than `min_pixels` are
    enlarged by nearest neighbour (a pixel stays a pixel), so 8x8 digits are visible."""
    from torchvision.utils import save_image  # deferred: torchvision (image grids only)

    k = task.model.config.num_classes
    imgs = to_pixels(task, task.sample(torch.arange(n) % k, progress=progress, **kw))
    if real is not None:
        gap = torch.full((k, *imgs.shape[1:]), 0.0)  # a row of mid-grey between real and generated
        imgs = torch.cat([real[:k].to(imgs).expand(-1, imgs.shape[1], -1, -1), gap, imgs])
    scale = max(1, -(-min_pixels // imgs.shape[-1]))
    if scale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=scale, mode="nearest")
    out = Path(out)
    with atomic_path(out) as tmp:
        save_image((imgs + 1) / 2, tmp, nrow=k, padding=scale, pad_value=0.5, format="png")
    return out


def real_row(dm, k: int) -> torch.Tensor | None:
    """The first validation image of each class 0..k-1 (None when a class is missing or the data is latent)."""
    if dm.name == "latents" or dm.val_set is None:
        return None
    x, y = dm.val_set.tensors
    firsts = [torch.nonzero(y == c).flatten() for c in range(k)]
    if any(len(f) == 0 for f in firsts):
        return None
    return torch.stack([x[f[0]] for f in firsts])


@torch.no_grad()
def evaluate(task: LgTask, data_cfg, n_samples: int = 500, inception_weights: str | None = None, **kw) -> dict:
    """Validation loss (and accuracy for a ViT) on the data split; for a DiT on digits,
    shapes or animals also FID (`fid_<data>`, in that data's classifier features) of
    `n_samples` generated images against the training images, and their class
    accuracy; `kw` as in `sampling_kwargs`."""
    dm = build_datamodule(data_cfg)
    dm.setup("validate")
    task.eval()
    losses, correct, count = [], 0, 0
    for i, batch in enumerate(dm.val_dataloader()):
        if isinstance(task, DiffusionTask):
            g = torch.Generator().manual_seed(1000 + i)
            losses.append(task.diffusion_loss(batch, generator=g).item() * len(batch[0]))
        else:
            x, y = batch
            logits = task.model(x)
            losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item())
            correct += (logits.argmax(1) == y).sum().item()
        count += len(batch[0])
    out: dict = {"val_loss": sum(losses) / count, "val_images": count}
    if not isinstance(task, DiffusionTask):
        out["val_acc"] = correct / count
        return out
    if n_samples and data_cfg.name in FEATURE_DATA:
        labels = torch.arange(n_samples) % task.model.config.num_classes
        fake = task.sample(labels, **kw)
        real = dm.train_set.tensors[0]
        out |= {f"fid_{data_cfg.name}": digits_fid(real, fake, data_cfg.name),
                "class_accuracy": class_accuracy(fake, labels, data_cfg.name), "samples": n_samples,
                "guidance": kw.get("guidance") if kw.get("guidance") is not None else task.recipe["sample"]["guidance"],
                "uncond_from": "own" if kw.get("uncond_model") is None else "swapped"}
        if inception_weights:
            out["fid_inception"] = inception_fid(real, fake, inception_weights)
    return out


def plot_curves(curves: dict[str, list[tuple[int, float]]], out: str | os.PathLike, ylabel: str, title: str = "") -> Path:
    import matplotlib  # deferred: matplotlib (plots only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib (plots only)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out

