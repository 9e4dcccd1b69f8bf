"""Training, adaptation, sampling and the control file: `lgframe control train|adapt|sample`.

A control recipe is an ordinary recipe (trainer, optim, ema, data, sample, seed,
name, out_dir: validated by lgframe's schema) with a `control:` section validated
by `ControlCfg` here; `control.*` overrides go to that section, the rest to the
recipe. The diffusion settings (noise schedule, prediction) are the base's own
when its file records them: the branch learns to correct the base's prediction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from lgframe.apps.report import markdown_table
from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import get_constraint
from lgframe.data.datamodule import build_datamodule
from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_path, read_safetensors, save_tensors, write_text
from lgframe.models.dit import DiT
from lgframe.models.files import read_model
from lgframe.training.recipes import RECIPE_DIR, load_recipe, read_recipe_file
from lgframe.training.stages import QUIET, plot_curves, read_curve, refuse_unhonoured, single_device_trainer, unique_dir
from lgframe.training.tasks import SAMPLERS, DiffusionTask

from .conditions import FAMILIES, Instruction, apply_each, embeddings, fidelity, parse_instruction
from .model import METHODS, ControlledDiT, ControlSpec, tailor_parameters

CONTROL_FORMAT = "lgframe-control/1"
CONTROL_META = "lgframe_control"
INITS = ("copy", "random")
DEFAULT_CONDITIONS = ["edges:threshold=0.2", "edges:threshold=0.5", "lowres:factor=2", "mask:threshold=-0.5",
                      "mask:threshold=0", "blur:radius=0.6", "blur:radius=1.4"]
NEW_GROUP_LOGIT = 20.0  # an added tailor group's gate: -20 for every other instruction (its weight ~2e-9)


# ------------------------------------------------------------------ recipe
@dataclass
class ControlCfg:
    """The `control:` section (recipes/control/divcontrol_digits.yaml)."""

    base: Optional[str] = None  # the pretrained DiT: a model file, folder or checkpoint (train; adapt/sample: recorded)  # noqa: UP045
    method: str = "divcontrol"  # divcontrol (kind components + instruction gate) | dense (one plain ControlNet branch)
    blocks: int = 2  # N: the first N blocks of the base are copied into the branch
    conditions: list = field(default_factory=lambda: list(DEFAULT_CONDITIONS))  # training instructions, mixed per batch
    groups: Optional[list] = None  # families owning tailors, in order; null: the families of `conditions`  # noqa: UP045
    learngene_rank: Any = 0.5  # kind's learngene components per role (int, fraction of min(m, n), "full")
    tailor_rank: int = 4  # kind's tailor components per family (k_T)
    init: str = "copy"  # copy: kind's decomposition of the copied blocks (tailors at sigma 0) | random
    align_weight: float = 0.5  # weight of the representation alignment loss (0: off)
    align_from: int = 1  # branch tokens after this many branch blocks ...
    align_block: int = 1  # ... aligned with the frozen DiT's tokens of the clean image after this many blocks
    samples: int = 8  # condition | sample pairs per instruction in samples.png and the report's fidelity
    checkpoint: Optional[str] = None  # adapt: the control file to adapt  # noqa: UP045
    instruction: Optional[str] = None  # adapt: the new condition, e.g. negative:contrast=1  # noqa: UP045
    shots: int = 10  # adapt: K examples of the new condition (from the data's training split)


def shipped_control_recipes() -> list[Path]:
    return sorted((RECIPE_DIR / "control").glob("*.yaml"))


def _control_recipe_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / "control" / p.name, RECIPE_DIR / "control" / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    raise LgframeError(f"control recipe '{path}' does not exist; shipped: "
                       f"{', '.join(r.stem for r in shipped_control_recipes()) or 'none'}")


def load_control_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> tuple[DictConfig, ControlCfg]:
    """(the recipe without its control section, validated by lgframe's schema; the control
    section as a ControlCfg). `control.KEY=VALUE` overrides go to the control section."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise LgframeError(f"override {bad[0]!r} must look like key=value (e.g. control.align_weight=0.5)")
    own = [o[len("control."):] for o in overrides if o.startswith("control.")]
    rest = [o for o in overrides if not o.startswith("control.")]
    where = "defaults"
    loaded = OmegaConf.create({})
    if path is not None:
        p = _control_recipe_path(path)
        where = str(p)
        loaded = read_recipe_file(p)
    section = loaded.pop("control", None) or {}
    try:
        ctl = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ControlCfg), section, OmegaConf.from_dotlist(own)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise LgframeError(f"control recipe key '{key}' in {where}: {str(e).splitlines()[0]}; valid keys in control: "
                           f"{', '.join(ControlCfg.__dataclass_fields__)}") from None
    cfg = load_recipe(loaded, rest)
    check_control_cfg(ctl)
    return cfg, ctl


def check_control_cfg(c: ControlCfg) -> None:
    if c.method not in METHODS:
        raise LgframeError(f"control.method={c.method!r}; valid: {', '.join(METHODS)}")
    if c.init not in INITS:
        raise LgframeError(f"control.init={c.init!r}; valid: {', '.join(INITS)}")
    if not c.conditions:
        raise LgframeError("control.conditions is empty; give training instructions, e.g. [edges:threshold=0.3, blur:radius=1]")
    for text in c.conditions:
        parse_instruction(text, "control.conditions")
    if c.groups is not None:
        unknown = [g for g in c.groups if g not in FAMILIES]
        if unknown:
            raise LgframeError(f"control.groups has unknown families {unknown}; valid: {', '.join(FAMILIES)}")
    for k in ("blocks", "tailor_rank", "align_from", "align_block", "shots"):
        v = getattr(c, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "tailor_rank" else 1):
            raise LgframeError(f"control.{k}={v!r}; valid: an integer >= {0 if k == 'tailor_rank' else 1}")
    if not (isinstance(c.align_weight, (int, float)) and math.isfinite(c.align_weight) and c.align_weight >= 0):
        raise LgframeError(f"control.align_weight={c.align_weight!r}; valid: a finite number >= 0 (0: no alignment loss)")
    if c.samples < 0:
        raise LgframeError(f"control.samples={c.samples}; valid: 0 or more")
    if c.instruction is not None:
        parse_instruction(c.instruction, "control.instruction")


def tailor_groups(instructions: list[Instruction], groups: list | None = None) -> list[str]:
    """The families owning tailors: `groups`, or every family of the instructions in order of appearance."""
    if groups is not None:
        return list(groups)
    return list(dict.fromkeys(f for ins in instructions for f in ins.families))


# ------------------------------------------------------------------ the base
def read_base(path: str | os.PathLike | nn.Module) -> DiT:
    """The frozen base: a dense lgframe DiT (a constrained one is materialized)."""
    if isinstance(path, nn.Module):
        model, where = path, "the base model"
    else:
        if path is None:
            raise LgframeError("control.base is required: a pretrained DiT model file or checkpoint (e.g. a run's "
                               "checkpoints/last.ckpt from `lgframe pretrain recipes/dit_digits_pretrain.yaml`)")
        model, _ = read_model(path)
        where = f"'{path}'"
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    if family != "dit":
        raise LgframeError(f"control needs a DiT as its base; {where} holds a {family} model (lgframe DiTs come from "
                           "`lgframe pretrain`/`train` with a diffusion recipe, or `lgframe import diffusers`)")
    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(model)
    if not isinstance(model, DiT):
        raise LgframeError(f"control needs an lgframe DiT as its base; {where} is a {type(model).__name__}")
    return model.eval().requires_grad_(False)


def base_fingerprint(base: DiT) -> str:
    """SHA-256 of the base's weights (names, dtypes, shapes and bytes), to tell bases apart."""
    h = hashlib.sha256()
    for k, v in sorted(base.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_diffusion(path) -> dict | None:
    """The diffusion section of the recipe a base file records (None: not recorded)."""
    if path is None or isinstance(path, nn.Module):
        return None
    try:
        _, meta = read_model(path)
    except LgframeError:
        return None
    return (meta.get("recipe") or {}).get("diffusion")


# ------------------------------------------------------------------ the task
class ControlTask(DiffusionTask):
    """Multi-condition training of a control branch on a frozen DiT: each sample of a batch
    draws one of `instructions`, its condition image is computed from the clean image, and
    the loss is the base's denoising loss of the controlled model plus `align_weight` times
    the alignment loss. `guards` (adaptation): parameters whose leading slices stay exactly
    as they are (the old tailor components)."""

    def __init__(self, recipe: dict, model: ControlledDiT, instructions: list[Instruction], align_weight: float = 0.0,
                 guards: list | None = None):
        super().__init__(recipe | {"constraint": "scratch"}, model)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise LgframeError("control trains on a noise-prediction base: diffusion.prediction must be epsilon, not "
                               f"{self.noise_scheduler.config.prediction_type!r}")
        self.instructions = list(instructions)
        table = embeddings(self.instructions) if self.instructions else torch.zeros(0, 2 * len(FAMILIES))
        self.register_buffer("embeds", table, persistent=False)
        self.align_weight = float(align_weight)
        if self.align_weight > 0 and model.align is None:
            raise LgframeError("control.align_weight > 0 needs a model with an alignment head")
        self.guards = guards or []
        self.history: list[dict] = []  # per training step: loss, mse, align

    def control_loss(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                     dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
        B, dev = len(x0), x0.device
        which = torch.randint(0, len(self.instructions), (B,), generator=generator).to(dev)
        cond = apply_each(self.instructions, which, x0)
        T = self.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        t = torch.randint(0, T, (B,), generator=generator).to(dev)
        y_in = y
        if dropout > 0:
            drop = torch.rand(B, generator=generator).to(dev) < dropout
            y_in = torch.where(drop, torch.full_like(y, self.null_class), y)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        eps, feats = self.model(x_t, t, y_in, cond, self.embeds[which], return_features=True)
        mse = F.mse_loss(eps[:, : x0.shape[1]], noise)
        parts = {"mse": mse}
        loss = mse
        if self.align_weight > 0:
            parts["align"] = self.model.alignment_loss(feats, x0, y)
            loss = loss + self.align_weight * parts["align"]
        return loss, parts

    @override
    def training_step(self, batch, batch_idx):
        x0, y = batch
        loss, parts = self.control_loss(x0, y, dropout=self.recipe["diffusion"]["label_dropout"])
        for k, v in parts.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=False)
        self.history.append({"step": self.global_step, "loss": float(loss.detach())}
                            | {k: float(v.detach()) for k, v in parts.items()})
        return self.total_loss(loss, "train")

    @override
    def validation_step(self, batch, batch_idx):
        """The control loss on the validation split, fixed conditions, noise and timesteps."""
        x0, y = batch
        g = torch.Generator().manual_seed(1000 + batch_idx)
        loss, parts = self.control_loss(x0, y, generator=g)
        for k, v in parts.items():
            self.log(f"val/{k}", v, on_epoch=True)
        self.total_loss(loss, "val")

    @override
    def configure_model(self) -> None:
        """Nothing to attach: the base is frozen, the branch carries its own constraint."""

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        restore_guards(self.guards)

    @torch.no_grad()
    def sample(self, labels, guidance=None, steps=None, scheduler=None, seed=None, progress=False,
               uncond_model=None, batch_size=500, cond=None, instruction=None):
        """Images (n, C, H, W) for `labels` under condition images `cond` (n, C, H, W) with
        instruction embeddings `instruction` (n, E); CFG over the class, the condition kept
        in both terms. Without `cond`: the base DiT's own samples."""
        if cond is None:
            return super().sample(labels, guidance, steps, scheduler, seed, progress, uncond_model, batch_size)
        s = self.recipe["sample"]
        guidance = s["guidance"] if guidance is None else guidance
        steps, kind = steps or s["steps"], scheduler or s["scheduler"]
        if kind not in SAMPLERS:
            raise LgframeError(f"sample scheduler {kind!r}; valid: {', '.join(SAMPLERS)}")
        seed = s["seed"] if seed is None else seed
        cfg = self.model.config
        g = torch.Generator().manual_seed(seed)
        x_all = torch.randn((len(labels), cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
        if instruction is None:
            instruction = torch.zeros(len(labels), len(FAMILIES) * 2)
        out = []
        was = self.model.training
        self.model.eval()
        for a in range(0, len(labels), batch_size):
            sl = slice(a, a + batch_size)
            out.append(self._sample_control(x_all[sl].to(self.device), labels[sl].to(self.device), cond[sl].to(self.device),
                                            instruction[sl].to(self.device), guidance, steps, kind))
        self.model.train(was)
        return torch.cat(out)

    def _sample_control(self, x, labels, cond, e, guidance, steps, kind):
        sched = SAMPLERS[kind].from_config(self.noise_scheduler.config,
                                           timestep_spacing=self.recipe["sample"].get("spacing", "leading"))
        sched.set_timesteps(steps)
        extra = {"use_clipped_model_output": True} if kind == "ddim" and sched.config.clip_sample else {}
        null = torch.full_like(labels, self.null_class)
        for t in sched.timesteps:
            tt = torch.full((len(labels),), int(t), device=x.device)
            if guidance == 1.0:
                eps = self.model(x, tt, labels, cond, e)[:, : x.shape[1]]
            else:
                both = self.model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]),
                                  torch.cat([cond, cond]), torch.cat([e, e]))[:, : x.shape[1]]
                c, u = both.chunk(2)
                eps = u + guidance * (c - u)
            x = sched.step(eps, t, x, **extra).prev_sample
        c = self.noise_scheduler.config
        return x.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x


# ------------------------------------------------------------------ adaptation
@dataclass
class Guard:
    """Parameter `param` keeps its first `n` entries along `axis` exactly (`saved`)."""

    param: nn.Parameter
    axis: int
    n: int
    saved: torch.Tensor


def restore_guards(guards: list[Guard]) -> None:
    with torch.no_grad():
        for gd in guards:
            gd.param.narrow(gd.axis, 0, gd.n).copy_(gd.saved.to(gd.param.device))


def with_new_family(model: ControlledDiT, family: str, seed: int = 0) -> ControlledDiT:
    """A copy of a DivControl model with one more tailor group, owned by `family`: new
    random orthonormal components at sigma 0, a gate row that routes `family`'s
    instructions to them (logit SOFT_LOGIT) and every other instruction away (-20),
    so the model computes what it did, to ~1e-8, for every instruction until trained."""
    from lgframe.strategies.kind import SOFT_LOGIT, random_columns

    if model.spec.method != "divcontrol":
        raise LgframeError("control adapt adds tailors: it needs a DivControl model (control.method=divcontrol), "
                           f"this one is method {model.spec.method!r}")
    if family in model.spec.groups:
        raise LgframeError(f"control adapt: family '{family}' already owns tailors in this model ({model.spec.groups}); "
                           "adapt to a family it has none for, or fine-tune with `lgframe control train`")
    spec = ControlSpec(**(model.spec.to_dict() | {"groups": list(model.spec.groups) + [family]}))
    new = ControlledDiT(model.base, spec, init="empty")
    old_state = model.state_dict()
    k = spec.tailor_rank
    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, t in new.state_dict().items():
            old = old_state[name]
            if old.shape == t.shape:
                state[name] = old.clone()
            elif name.endswith((".UT", ".VT")):
                state[name] = torch.cat([old, random_columns(t.shape[0], k).to(old)], 1)
            elif name.endswith(".sT"):
                state[name] = torch.cat([old, old.new_zeros(k)])
            elif name == "gate.proj.weight":
                row = old.new_zeros(1, old.shape[1])
                row[0, list(FAMILIES).index(family)] = NEW_GROUP_LOGIT + SOFT_LOGIT
                state[name] = torch.cat([old, row])
            elif name == "gate.proj.bias":
                state[name] = torch.cat([old, old.new_full((1,), -NEW_GROUP_LOGIT)])
            else:
                raise LgframeError(f"control adapt: tensor {name} changed shape {tuple(old.shape)} -> {tuple(t.shape)}")
    new.load_state_dict(state, strict=False)
    return new


def prepare_adaptation(model: ControlledDiT, n_old_groups: int) -> list[Guard]:
    """Only the tailors and the gate train: every other tensor frozen, and the old tailor
    components (the first n_old_groups * k_T) kept exactly (gradient masked, restored
    after each step)."""
    model.requires_grad_(False)
    k = model.spec.tailor_rank
    guards = []
    for _, p, axis in tailor_parameters(model):
        p.requires_grad_(True)
        n = n_old_groups * k
        mask = torch.ones(p.shape[axis], dtype=p.dtype)
        mask[:n] = 0
        shape = [1] * p.dim()
        shape[axis] = -1
        mask = mask.reshape(shape)
        p.register_hook(lambda grad, m=mask: grad * m.to(grad.device, grad.dtype))
        guards.append(Guard(p, axis, n, p.detach().narrow(axis, 0, n).clone()))
    model.gate.requires_grad_(True)
    return guards


# ------------------------------------------------------------------ files
def save_control(model: ControlledDiT, path: str | os.PathLike, base_path, instructions: list[Instruction],
                 recipe: dict, extra: dict | None = None) -> Path:
    """The branch, gate and alignment head (not the base) as one safetensors file, atomic;
    the metadata holds the spec, the branch's constraint, the base's config and weight
    fingerprint, the training instructions and the diffusion and sample settings."""
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("base.")}
    spec = attached_constraint(model.branch)
    meta = {"format": CONTROL_FORMAT, "spec": model.spec.to_dict(),
            "branch_constraint": spec.to_dict() if spec is not None else None,
            "base_config": model.base.config.to_dict(), "base_sha256": base_fingerprint(model.base),
            "base_path": None if base_path is None or isinstance(base_path, nn.Module) else str(base_path),
            "instructions": [str(i) for i in instructions],
            "diffusion": recipe["diffusion"], "sample": recipe["sample"]} | (extra or {})
    save_tensors(path, tensors, {CONTROL_META: json.dumps(meta)})
    return Path(path)


def read_control_meta(path: str | os.PathLike) -> tuple[dict, dict]:
    tensors, raw = read_safetensors(path, "control file")
    if CONTROL_META not in raw:
        raise LgframeError(f"'{path}' is not an lgframe control file (no '{CONTROL_META}' metadata); control files are "
                           "written by `lgframe control train` (control.safetensors in the run folder) and `adapt`")
    meta = json.loads(raw[CONTROL_META])
    if meta.get("format") != CONTROL_FORMAT:
        raise LgframeError(f"'{path}': control record of format {meta.get('format')!r}; this lgframe reads {CONTROL_FORMAT!r}")
    return meta, tensors


def load_control(path: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None) -> tuple[ControlledDiT, dict]:
    """A control file on its base (`base`, default the path it records). Refuses a base
    other than the one it was trained on (config or weights), naming both."""
    meta, tensors = read_control_meta(path)
    where = base if base is not None else meta.get("base_path")
    if where is None:
        raise LgframeError(f"control file '{path}' records no base path; give the base DiT (--base)")
    model = read_base(where)
    if model.config.to_dict() != meta["base_config"] or base_fingerprint(model) != meta["base_sha256"]:
        c, m = model.config, meta["base_config"]
        raise LgframeError(
            f"control file '{path}' was trained for another base: it records a DiT depth {m.get('depth')}, width "
            f"{m.get('width')}, {m.get('image_size')}x{m.get('image_size')} (weights sha256 {meta['base_sha256'][:12]}, "
            f"file {meta.get('base_path')}); the base given is depth {c.depth}, width {c.width}, "
            f"{c.image_size}x{c.image_size} (sha256 {base_fingerprint(model)[:12]}, {where}). Give the base it was trained on")
    control = ControlledDiT(model, ControlSpec(**meta["spec"]), init="empty")
    missing, unexpected = control.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith("base.")]
    if missing or unexpected:
        raise LgframeError(f"control file '{path}' does not fit its spec: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return control.eval(), meta


def sampling_recipe(meta: dict) -> dict:
    """A plain recipe for a ControlTask around a loaded control file (its diffusion and sample settings)."""
    from lgframe.training.recipes import to_plain

    plain = to_plain(load_recipe(None, ["trainer.progress=false"]))
    plain["diffusion"] |= meta.get("diffusion") or {}
    plain["sample"] |= meta.get("sample") or {}
    return plain


# ------------------------------------------------------------------ trainer and data
def check_trainer(recipe: dict) -> None:
    t = recipe["trainer"]
    d = t["devices"]
    if not (d in (1, "1") or (isinstance(d, (list, tuple)) and len(d) == 1)) or t["strategy"] != "auto" or t["num_nodes"] != 1:
        raise LgframeError(f"control trains on one device: trainer.devices={d!r}, strategy={t['strategy']!r}, "
                           f"num_nodes={t['num_nodes']!r}; valid: devices 1 (or [id]), strategy auto, num_nodes 1")
    if recipe["optim"]["name"] not in ("adamw", "sgd"):
        raise LgframeError(f"optim.name={recipe['optim']['name']!r}; valid: adamw, sgd")
    refuse_unhonoured(recipe, "control")


def control_trainer(recipe: dict, run_dir: Path, callbacks: list | None = None, label: str | None = None) -> pl.Trainer:
    """A one-device Lightning Trainer from fit's pieces (`single_device_trainer`); no
    checkpoints (a run writes its control file)."""
    check_trainer(recipe)
    return single_device_trainer(recipe, run_dir, callbacks, label=label)


# The frozen base stays in eval mode on purpose (Lightning warns about it at fit start).
EVAL_MODE = r".*module\(s\) in eval mode at the start of training.*"


def fit_task(task: ControlTask, recipe: dict, run_dir: Path, train_dl, val_dl=None, callbacks=None) -> None:
    trainer = control_trainer(recipe, run_dir, callbacks)
    with warnings.catch_warnings():
        for pattern in (*QUIET, EVAL_MODE):
            warnings.filterwarnings("ignore", message=pattern)
        if val_dl is not None:
            trainer.validate(task, val_dl, verbose=False)
        trainer.fit(task, train_dl, val_dl)


def check_data_fits(dm, base: DiT, where: str) -> None:
    c = base.config
    if (dm.image_size, dm.channels) != (c.image_size, c.in_channels):
        raise LgframeError(f"{where}: data '{dm.name}' gives {dm.image_size}x{dm.image_size}x{dm.channels} images, the base "
                           f"DiT takes {c.image_size}x{c.image_size}x{c.in_channels}; set data.image_size (or use the "
                           "data the base was trained on)")


def few_shot_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int) -> DataLoader:
    """Batches drawn with replacement from K examples, `steps` of them."""
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size,
                      sampler=RandomSampler(ds, replacement=True, num_samples=batch_size * steps,
                                            generator=torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------ grids and evaluation
def condition_grid(conditions: torch.Tensor, samples: torch.Tensor, out: str | os.PathLike, per_row: int,
                   min_pixels: int = 32) -> Path:
    """condition | sample pairs side by side, `per_row` pairs a row, enlarged by nearest neighbour."""
    from torchvision.utils import save_image  # deferred: torchvision (image grids only)

    pairs = torch.stack([conditions.float(), samples.float()], 1).flatten(0, 1)
    scale = max(1, -(-min_pixels // pairs.shape[-1]))
    if scale > 1:
        pairs = F.interpolate(pairs, scale_factor=scale, mode="nearest")
    with atomic_path(out) as tmp:
        save_image((pairs + 1) / 2, tmp, nrow=2 * per_row, padding=scale, pad_value=0.5, format="png")
    return Path(out)


@torch.no_grad()
def evaluate_instruction(task: ControlTask, instruction: Instruction, x: torch.Tensor, y: torch.Tensor,
                         steps: int | None = None, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Fidelity of samples generated from the conditions of images x (labels y) under
    `instruction`: (metrics, conditions, samples)."""
    cond = instruction.apply(x)
    e = instruction.embedding().expand(len(x), -1)
    samples = task.sample(y, cond=cond, instruction=e, steps=steps, seed=seed)
    return fidelity(instruction, samples, cond), cond, samples


# ------------------------------------------------------------------ the commands
@dataclass
class ControlResult:
    run_dir: Path
    control: Path
    samples: Path | None
    report: Path
    fidelity: dict
    history: list
    task: ControlTask | None = None


def _finish(task: ControlTask, instructions: list[Instruction], dm, run_dir: Path, n: int, title: str,
            lines: list[str]) -> tuple[Path | None, Path, dict]:
    """samples.png (condition | sample per instruction), report.md with the fidelity table."""
    fid, conds, samples = {}, [], []
    x, y = dm.val_set.tensors
    if n > 0:
        for ins in instructions:
            m, c, s = evaluate_instruction(task, ins, x[:n], y[:n])
            fid[str(ins)] = m
            conds.append(c)
            samples.append(s)
    grid = condition_grid(torch.cat(conds), torch.cat(samples), run_dir / "samples.png", n) if n > 0 else None
    rows = [(k, f"{v['mse']:.4f}", f"{v['f1']:.3f}" if "f1" in v else "-") for k, v in fid.items()]
    curve = [(h["step"], h.get("align", float("nan"))) for h in task.history]
    if any("align" in h for h in task.history):
        plot_curves({"alignment loss (train)": curve}, run_dir / "align.png", "1 - cosine", title)
    report = run_dir / "report.md"
    write_text(report, "\n".join([f"# {title}", "", *lines, "",
                                  f"Fidelity of {n} samples per condition (validation images; the operator re-applied "
                                  "to each sample, against its input condition):", "",
                                  *markdown_table(["condition", "MSE", "F1"], rows), "",
                                  "Condition | sample pairs:", "", "![samples](samples.png)" if grid else "", ""]))
    return grid, report, fid


def run_control_train(cfg: DictConfig, ctl: ControlCfg) -> ControlResult:
    """`lgframe control train RECIPE`: multi-condition training of a control branch."""
    recipe = OmegaConf.to_container(cfg, resolve=True)
    check_trainer(recipe)
    base = read_base(ctl.base)
    recipe["diffusion"] |= base_diffusion(ctl.base) or {}
    instructions = [parse_instruction(c, "control.conditions") for c in ctl.conditions]
    groups = tailor_groups(instructions, ctl.groups)
    spec = ControlSpec(method=ctl.method, blocks=ctl.blocks, groups=groups, learngene_rank=ctl.learngene_rank,
                       tailor_rank=ctl.tailor_rank, align=ctl.align_weight > 0, align_from=ctl.align_from,
                       align_block=ctl.align_block)
    dm = build_datamodule(cfg.data)
    check_data_fits(dm, base, "control train")
    dm.setup()
    pl.seed_everything(recipe["seed"], verbose=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = ControlledDiT(base, spec, init=ctl.init)
    task = ControlTask(recipe, model, instructions, ctl.align_weight)
    run_dir = unique_dir(Path(recipe["out_dir"]) / recipe["name"])
    run_dir.mkdir(parents=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg) + OmegaConf.to_yaml({"control": OmegaConf.structured(ctl)}))
    fit_task(task, recipe, run_dir, dm.train_dataloader(), dm.val_dataloader())
    path = save_control(model, run_dir / "control.safetensors", ctl.base, instructions, recipe)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curve = read_curve(run_dir, "val/loss")
    lines = [f"Base `{ctl.base}` (DiT depth {base.config.depth}, width {base.config.width}); method {ctl.method}, "
             f"{ctl.blocks} branch blocks, groups {groups}, learngene rank {ctl.learngene_rank}, tailor rank "
             f"{ctl.tailor_rank}, alignment weight {ctl.align_weight}; {trained:,} parameters trained; "
             f"{recipe['trainer']['max_steps']} steps, batch {recipe['data']['batch_size']}.", "",
             "Training conditions: " + ", ".join(f"`{i}`" for i in instructions), "",
             *markdown_table(["step", "val loss (control)"], [(s, f"{v:.4f}") for s, v in curve])]
    grid, report, fid = _finish(task, instructions, dm, run_dir, ctl.samples, f"Control: {recipe['name']}", lines)
    return ControlResult(run_dir, path, grid, report, fid, task.history, task)


def run_control_adapt(cfg: DictConfig, ctl: ControlCfg, out: str | os.PathLike, base=None,
                      overwrite: bool = False) -> ControlResult:
    """`lgframe control adapt`: few-shot adaptation to a new condition family: a tailor group
    for it, trained with the gate from `control.shots` examples; every other tensor is kept."""
    from lgframe.formats.files import check_output

    if ctl.checkpoint is None or ctl.instruction is None:
        raise LgframeError("control adapt needs the control file (control.checkpoint / CKPT) and the new condition "
                           "(control.instruction / --instruction, e.g. negative:contrast=1)")
    check_output(out, [ctl.checkpoint, base], overwrite=overwrite)
    recipe = OmegaConf.to_container(cfg, resolve=True)
    check_trainer(recipe)
    old, meta = load_control(ctl.checkpoint, base)
    ins = parse_instruction(ctl.instruction, "control.instruction")
    if len(set(ins.families)) != 1:
        raise LgframeError(f"control adapt: the new condition '{ins}' must name one family (it gets one tailor group)")
    family = ins.families[0]
    recipe["diffusion"] |= meta.get("diffusion") or {}
    dm = build_datamodule(cfg.data)
    check_data_fits(dm, old.base, "control adapt")
    dm.setup()
    x, y = dm.train_set.tensors
    if ctl.shots > len(x):
        raise LgframeError(f"control.shots={ctl.shots}: the training split has {len(x)} images")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe["seed"]))[: ctl.shots]
    pl.seed_everything(recipe["seed"], verbose=False)
    model = with_new_family(old, family, seed=recipe["seed"])
    guards = prepare_adaptation(model, len(old.spec.groups))
    task = ControlTask(recipe, model, [ins], ctl.align_weight if model.align is not None else 0.0, guards)
    run_dir = unique_dir(Path(recipe["out_dir"]) / recipe["name"])
    run_dir.mkdir(parents=True)
    bs = min(recipe["data"]["batch_size"], 64)
    fit_task(task, recipe, run_dir, few_shot_loader(x[pick], y[pick], bs, recipe["trainer"]["max_steps"], recipe["seed"]))
    instructions = [parse_instruction(i) for i in meta["instructions"]] + [ins]
    path = save_control(model, out, meta.get("base_path") if base is None else base, instructions, recipe,
                        {"adapted": {"instruction": str(ins), "shots": ctl.shots, "from": str(ctl.checkpoint)}})
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(g.saved.numel() for g in guards)
    lines = [f"Adapted `{ctl.checkpoint}` to `{ins}` from {ctl.shots} examples: a tailor group for '{family}' "
             f"({model.spec.tailor_rank} components per role) and the gate trained, {recipe['trainer']['max_steps']} steps; "
             f"{trained:,} parameters trained (the old tailor components kept exactly)."]
    grid, report, fid = _finish(task, [ins], dm, run_dir, ctl.samples, f"Control adapt: {ins}", lines)
    return ControlResult(run_dir, path, grid, report, fid, task.history, task)


def read_condition_image(path: str | os.PathLike, cfg) -> torch.Tensor:
    """(1, C, H, W) in [-1, 1] from an image file that is exactly the base's size and channels."""
    from PIL import Image, UnidentifiedImageError  # deferred: PIL (image files only)

    p = Path(path)
    if not p.is_file():
        raise LgframeError(f"condition image '{p}' does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            bands, size = len(img.getbands()), img.size
            mode = img.mode
            arr = torch.tensor(list(img.getdata()), dtype=torch.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise LgframeError(f"condition image '{p}' is not a readable image ({e})") from None
    want = (cfg.image_size, cfg.image_size)
    if size != want or bands != cfg.in_channels:
        kind = "grayscale (mode L)" if cfg.in_channels == 1 else f"{cfg.in_channels}-channel (mode RGB)"
        raise LgframeError(f"condition image '{p}' is {size[0]}x{size[1]} with {bands} channel(s) (mode {mode}); this "
                           f"control model takes {want[0]}x{want[1]} {kind} images, as its base DiT")
    arr = arr.reshape(size[1], size[0], bands).permute(2, 0, 1)
    top = 65535.0 if mode.startswith("I;16") else 255.0
    return (arr / top * 2 - 1).unsqueeze(0)


def run_control_sample(checkpoint, out, condition=None, source=None, instruction=None, label=None, n=8, base=None,
                       steps=None, seed=None, guidance=None, overwrite: bool = False) -> Path:
    """`lgframe control sample`: n samples under one condition image (given, or computed from a
    source image by the instruction's operator); PNG of condition | sample pairs."""
    from lgframe.formats.files import check_output

    check_output(out, [checkpoint, condition, source, base], overwrite=overwrite)
    if (condition is None) == (source is None):
        raise LgframeError("control sample: give either --condition IMG (a condition image) or --source IMG (an image "
                           "the instruction's operator turns into one)")
    if n < 1:
        raise LgframeError(f"--n {n}: the number of samples must be at least 1")
    model, meta = load_control(checkpoint, base)
    ins = parse_instruction(instruction, "--instruction") if instruction is not None else None
    if ins is None and model.gate is not None:
        raise LgframeError("control sample: a DivControl model routes by the instruction: give --instruction, e.g. "
                           f"'edges:threshold=0.3' (trained on: {', '.join(meta['instructions'])})")
    cfg = model.config
    if condition is not None:
        cond = read_condition_image(condition, cfg)
    else:
        src = read_condition_image(source, cfg)
        if ins is None:
            raise LgframeError("control sample --source needs --instruction (the operator to apply)")
        cond = ins.apply(src)
    C = cfg.num_classes
    lab = C if label is None else int(label)
    if not 0 <= lab <= C:
        raise LgframeError(f"--label {label}: valid class labels are 0..{C - 1}, or {C} (none: the null class)")
    task = ControlTask(sampling_recipe(meta), model, [ins] if ins is not None else [])
    e = (ins.embedding() if ins is not None else torch.zeros(2 * len(FAMILIES))).expand(n, -1)
    conds = cond.expand(n, -1, -1, -1)
    samples = task.sample(torch.full((n,), lab), cond=conds, instruction=e, steps=steps, seed=seed, guidance=guidance)
    return condition_grid(conds, samples, out, min(n, 8))


def command(args) -> int:
    """`lgframe control train|sample|adapt` (called by lgframe.cli)."""
    if args.control_command == "train":
        cfg, ctl = load_control_recipe(args.recipe, args.overrides)
        res = run_control_train(cfg, ctl)
        print(f"run directory: {res.run_dir}")
        print(f"control file: {res.control}; samples: {res.samples}; report: {res.report}")
        for k, v in res.fidelity.items():
            print(f"  {k}: fidelity MSE {v['mse']:.4f}" + (f", F1 {v['f1']:.3f}" if "f1" in v else ""))
        return 0
    if args.control_command == "adapt":
        cfg, ctl = load_control_recipe(args.recipe, [*args.overrides, f"control.checkpoint={args.checkpoint}",
                                                     f"control.instruction={args.instruction}",
                                                     *([f"control.shots={args.shots}"] if args.shots else [])])
        res = run_control_adapt(cfg, ctl, args.out, base=args.base, overwrite=args.overwrite)
        print(f"wrote {res.control} (run directory {res.run_dir}; report {res.report})")
        for k, v in res.fidelity.items():
            print(f"  {k}: fidelity MSE {v['mse']:.4f}" + (f", F1 {v['f1']:.3f}" if "f1" in v else ""))
        return 0
    out = run_control_sample(args.checkpoint, args.out, condition=args.condition, source=args.source,
                             instruction=args.instruction, label=args.label, n=args.n, base=args.base, steps=args.steps,
                             seed=args.seed, guidance=args.guidance, overwrite=args.overwrite)
    print(f"wrote {out} ({args.n} condition | sample pairs)")
    return 0
