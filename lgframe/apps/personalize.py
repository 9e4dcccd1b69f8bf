"""DiT-BlockSkip: memory-efficient personalization of a pretrained DiT.

A pretrained DiT learns one subject (a few images) as a new class, like a
DreamBooth identifier: the class-embedding table gains a row (initialized at
the mean of the class rows; the null class moves one index up), and LoRA
(peft) trains the attention and MLP projections of the middle blocks with the
base weights frozen. Two memory savers, each a recipe switch:

**Dynamic patch sampling** (`patch_sampling`): for a sample drawn at timestep
t, a random square crop of side s(t) = s_min + (t / (T - 1)) (s_max - s_min),
rounded, is taken from the full-resolution image (side s_max) and resized to
s_min (area averaging), so the token count is always that of s_min: wide crops
at high noise (global structure), tight crops at low noise (detail). With
`patch_positions: crop` (default) each token keeps the sin-cos position of
the place it covers in the full-resolution grid (fractional for a resized
crop), so the model sees where a crop comes from; `grid` gives every crop the
positions of an s_min image. Off: the whole image resized to s_min. With s_min = s_max and no skipping this is plain
LoRA fine-tuning at full resolution.

**Block skipping with a residual cache** (`skip_front` n, `skip_back` m): of L
blocks, the first n run under no_grad (no activations kept) and the last m do
not run in the trained path at all. Their effect is a residual computed by the
frozen base (adapters off, no_grad) for the same noisy input, timestep and
label: delta = f_L - f_(L-m), the change the back blocks make to the base's
features. The trained path is then front (no_grad) -> middle blocks (LoRA, with
grad) -> + delta -> final layer. The cache is computed for each drawn (sample,
t, noise) at the start of the training step and used once, so it is never
stale; that costs one no-grad pass of the middle and back blocks, and keeps
no activations of them. With a zero LoRA update the trained path reproduces the
full model exactly (tested).

Sampling uses the full model (all blocks, LoRA merged) at s_max with
classifier-free guidance. The positional embedding is the DiT's fixed
sin-cos table, computed for any grid, so one set of weights trains at s_min and
samples at s_max. A base whose table is not that sin-cos one (inherited from an
ancestor of another width, learned, converted) keeps its own table at its own
grid; other grids and crops read it by bilinear interpolation over the image
(`PositionTable`).

Training runs on one device under the recipe's `optim` (adamw | sgd, lr,
weight_decay, warmup, schedule: LgTask's optimizer), `ema` (fit's WarmupEMA),
`trainer.precision` and `trainer.activation_checkpointing`; settings personalize
cannot honour (several devices, `compile`, `checkpoint_every`) are refused
(`check_settings`). The run writes the LoRA as a PEFT adapter folder
(`adapter_config.json` + `adapter_model.safetensors`, loadable with
`peft.PeftModel.from_pretrained` onto the base DiT that has the subject class,
see `subject_base`), with the subject's class embedding and what the adapter
needs beside it (`subject.safetensors`, `subject.json`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from lgframe.apps.report import markdown_table
from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import get_constraint
from lgframe.data.datasets import IMAGE_SUFFIXES, SHAPE_NAMES, make_shapes, read_image
from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_dir, atomic_path, read_safetensors, save_tensors, write_json, write_text
from lgframe.models.dit import DiT, sincos_at, sincos_pos_embed
from lgframe.models.files import read_model
from lgframe.models.registry import model_from_config
from lgframe.training.speed import set_activation_checkpointing
from lgframe.training.stages import QUIET, plot_curves, read_curve, refuse_unhonoured, single_device_trainer, unique_dir
from lgframe.training.tasks import DiffusionTask

LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_FORMAT = "lgframe-lora/1"  # the single lora.safetensors file of earlier versions (still read)
ADAPTER_FORMAT = "lgframe-lora/2"  # a PEFT adapter folder with subject.safetensors + subject.json
SUBJECT_TENSORS, SUBJECT_META = "subject.safetensors", "subject.json"
OPTIMIZERS = ("adamw", "sgd")
# The DiT computes its timestep embedding in float32: bf16-true, 16-true and 64-true do not run it.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's


# ------------------------------------------------------------------ geometry
def crop_side(t: torch.Tensor, num_timesteps: int, s_min: int, s_max: int) -> torch.Tensor:
    """s(t) = s_min + t / (T - 1) * (s_max - s_min), rounded: wide at high noise, tight at low noise."""
    frac = t.double() / max(1, num_timesteps - 1)
    return torch.round(s_min + frac * (s_max - s_min)).long().clamp(s_min, s_max)


def patch_batch(x: torch.Tensor, t: torch.Tensor, num_timesteps: int, s_min: int, s_max: int,
                generator: torch.Generator | None = None, boxes: list | None = None) -> torch.Tensor:
    """Per sample a random crop of side s(t) from x (B, C, s_max, s_max), resized to s_min.
    `boxes`, when given, receives each crop's (top, left, side) in pixels."""
    if x.shape[-1] != s_max or x.shape[-2] != s_max:
        raise LgframeError(f"patch sampling: images are {tuple(x.shape[-2:])}, expected {s_max}x{s_max} (s_max)")
    sides = crop_side(t.cpu(), num_timesteps, s_min, s_max)
    out = []
    for img, s in zip(x, sides.tolist()):
        i, j = (int(torch.randint(0, s_max - s + 1, (1,), generator=generator)) for _ in range(2))
        crop = img[:, i:i + s, j:j + s].unsqueeze(0)
        out.append(crop if s == s_min else F.interpolate(crop, size=(s_min, s_min), mode="area"))
        if boxes is not None:
            boxes.append((i, j, s))
    return torch.cat(out)


def crop_coords(patch: int, s_min: int, box: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(gy, gx), each (g, g) with g = s_min/patch: the tokens of a crop `box` (top, left, side)
    at their place in the full-resolution patch grid (the centre of the pixels each covers)."""
    top, left, side = box
    centre = (torch.arange(s_min // patch, dtype=torch.float64) + 0.5) * patch  # token centres in the s_min crop, pixels
    scale = side / s_min
    ys, xs = (top + centre * scale) / patch - 0.5, (left + centre * scale) / patch - 0.5
    return torch.meshgrid(ys, xs, indexing="ij")


def crop_positions(dim: int, patch: int, s_min: int, boxes: list) -> torch.Tensor:
    """(B, (s_min/patch)^2, dim): each token's sin-cos position in the full-resolution patch
    grid, so a crop keeps the positions of its place."""
    return torch.stack([sincos_at(dim, *crop_coords(patch, s_min, box)) for box in boxes])


class PositionTable:
    """The token positions of a base DiT at any grid. A base whose `pos_embed` is DiT's
    fixed sin-cos table (to 1e-5) gets the sin-cos table at any grid and fractional
    sin-cos positions for crops, in patch units of the grid (as DiT computes it). Any
    other table (inherited from an ancestor of another width, learned, converted) is
    kept: exactly at its own grid, and read by bilinear interpolation over the image
    at other grids and for crops (a full-resolution image covers the table's extent)."""

    def __init__(self, model: DiT):
        c = model.config
        self.dim, self.patch, self.grid = c.width, c.patch_size, c.image_size // c.patch_size
        table = model.pos_embed.detach().float().cpu().reshape(self.grid, self.grid, self.dim)
        sincos = sincos_pos_embed(self.dim, self.grid).view(self.grid, self.grid, self.dim)
        self.table = None if torch.allclose(table, sincos, atol=1e-5) else table.clone()

    @property
    def inherited(self) -> bool:
        """True: the base's table is not the sin-cos one, and is kept."""
        return self.table is not None

    def _read(self, gy: torch.Tensor, gx: torch.Tensor, full_grid: int) -> torch.Tensor:
        """Bilinear reads of the table at full-resolution grid coordinates (gy, gx) of a
        `full_grid` x `full_grid` image: (number of points, dim)."""
        norm = torch.stack([2 * (gx + 0.5) / full_grid - 1, 2 * (gy + 0.5) / full_grid - 1], dim=-1)
        src = self.table.permute(2, 0, 1).unsqueeze(0).double()  # (1, dim, grid, grid)
        out = F.grid_sample(src, norm.reshape(1, 1, -1, 2).double(), mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[0, :, 0].T.float()

    def at_grid(self, grid: int) -> torch.Tensor:
        """(1, grid^2, dim): the positions of a whole image of grid x grid tokens."""
        if self.table is None:
            return sincos_pos_embed(self.dim, grid).unsqueeze(0)
        if grid == self.grid:
            return self.table.reshape(1, -1, self.dim).clone()
        coords = torch.arange(grid, dtype=torch.float64)
        return self._read(*torch.meshgrid(coords, coords, indexing="ij"), grid).unsqueeze(0)

    def at_boxes(self, s_min: int, s_max: int, boxes: list) -> torch.Tensor:
        """(B, (s_min/patch)^2, dim): the positions of crops `boxes` of an s_max image."""
        if self.table is None:
            return crop_positions(self.dim, self.patch, s_min, boxes)
        return torch.stack([self._read(*crop_coords(self.patch, s_min, box), s_max // self.patch) for box in boxes])


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


# ------------------------------------------------------------------ the model
def with_subject_class(model: DiT) -> tuple[DiT, int]:
    """A copy of `model` with one more class (the subject, index C); the null class moves to C + 1.
    The subject's embedding starts at the mean of the class rows."""
    if not isinstance(model, DiT):
        raise LgframeError(f"personalization needs an lgframe DiT, got {type(model).__name__}")
    cfg = model.config.to_dict()
    C = cfg["num_classes"]
    new = model_from_config(cfg | {"num_classes": C + 1})
    state = model.state_dict()
    table = state["y_embedder.embedding_table.weight"]  # (C + 1, D), row C = null
    state["y_embedder.embedding_table.weight"] = torch.cat([table[:C], table[:C].mean(0, keepdim=True), table[C:]])
    new.load_state_dict(state)
    return new, C


def block_ranges(depth: int, front: int, back: int) -> tuple[range, range, range]:
    if front < 0 or back < 0 or front + back >= depth:
        raise LgframeError(
            f"skip_front={front}, skip_back={back} for a DiT of depth {depth}: both >= 0 and at least one block "
            f"left to train (front + back <= {depth - 1})"
        )
    return range(front), range(front, depth - back), range(depth - back, depth)


def add_lora(model: DiT, rank: int, alpha: float, blocks: range) -> DiT:
    """LoRA (peft) on the projections of `blocks`; every base weight frozen."""
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft (imports transformers)

    if rank < 1:
        raise LgframeError(f"lora_rank={rank}; valid: an int >= 1")
    model.requires_grad_(False)
    ids = "|".join(str(i) for i in blocks)
    targets = "|".join(t.replace(".", r"\.") for t in LORA_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=rf"blocks\.({ids})\.({targets})")
    return inject_adapter_in_model(config, model)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # deferred: peft (imports transformers)

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The frozen base: every LoRA adapter disabled inside the block."""
    layers = lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(model: nn.Module) -> DiT:
    """Fold every LoRA update into its base Linear; returns a plain lgframe DiT."""
    for name, m in list(model.named_modules()):
        if m in lora_layers(model):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


_POS: dict[tuple[int, int], torch.Tensor] = {}


def pos_embed(model: DiT, size: int, device) -> torch.Tensor:
    grid = size // model.config.patch_size
    if grid * model.config.patch_size != size:
        raise LgframeError(f"image side {size} is not a multiple of the patch size {model.config.patch_size}")
    if grid == model.config.image_size // model.config.patch_size:
        return model.pos_embed
    key = (model.config.width, grid)
    if key not in _POS:
        _POS[key] = sincos_pos_embed(model.config.width, grid).unsqueeze(0).float()
    return _POS[key].to(device)


def dit_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, front: int = 0, back: int = 0,
                pos: torch.Tensor | None = None) -> torch.Tensor:
    """The DiT at any resolution, with block skipping (see the module docstring) and,
    optionally, token positions `pos` (B or 1, N, width) (patch sampling's crops, or an
    inherited table at another grid; default: `pos_embed`).
    front = back = 0 and no `pos`: exactly the model's own forward (at its own resolution)."""
    blocks = model.blocks
    first, middle, last = block_ranges(len(blocks), front, back)
    c = model.t_embedder(t) + model.y_embedder(y)
    with torch.no_grad() if front else contextlib.nullcontext():
        h = model.x_embedder(x) + (pos_embed(model, x.shape[-1], x.device) if pos is None else pos.to(x.device))
        for i in first:
            h = blocks[i](h, c)
    h = h.detach() if front else h
    delta = None
    if back:
        with torch.no_grad(), adapters_off(model):  # the residual cache: f_L - f_(L-m) of the frozen base
            hb = h
            for i in middle:
                hb = blocks[i](hb, c)
            f_split = hb
            for i in last:
                hb = blocks[i](hb, c)
            delta = hb - f_split
    for i in middle:
        h = blocks[i](h, c)
    if delta is not None:
        h = h + delta
    return model.unpatchify(model.final_layer(h, c))


# ------------------------------------------------------------------ data
def subject_images(spec: str, n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    """(n, channels, size, size) in [-1, 1]: `shapes:K` (generated shapes of class K,
    the embedded demo subject) or a folder of image files."""
    if spec.startswith("shapes:"):

        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = -1
        if not 0 <= k < len(SHAPE_NAMES):
            raise LgframeError(f"subject {spec!r}: valid: shapes:K with K in 0..{len(SHAPE_NAMES) - 1} ({', '.join(SHAPE_NAMES)})")
        x, y = make_shapes(max(40 * n, 200), seed=seed, size=size)
        x = x[y == k][:n]
        if len(x) < n:
            raise LgframeError(f"subject {spec!r}: only {len(x)} images of that shape were drawn, {n} asked")
        return x.expand(-1, channels, -1, -1).contiguous()
    folder = Path(spec)
    if not folder.is_dir():
        raise LgframeError(f"subject {spec!r}: not a folder of images and not shapes:K")

    # the same reader (and the same suffixes, centre crop and resampling) as image-folder data
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    imgs, bad = [], 0
    for p in files:
        a = read_image(p, size, channels, "center")
        if a is None:
            bad += 1
            continue
        imgs.append(torch.from_numpy(a) / 127.5 - 1)
    if bad:

        warnings.warn(f"subject folder {folder}: skipped {bad} unreadable image file(s)", stacklevel=2)
    if len(imgs) < n:
        raise LgframeError(f"subject folder {folder}: {len(imgs)} readable images ({', '.join(IMAGE_SUFFIXES)}), {n} needed")
    return torch.stack(imgs[:n])


# ------------------------------------------------------------------ training
def precision_of(recipe: dict) -> str:
    """`trainer.precision` in Lightning's canonical spelling (32 -> 32-true, ...)."""
    value = str(recipe["trainer"]["precision"])
    return PRECISION_ALIASES.get(value, value)


def check_settings(recipe: dict) -> None:
    """The optimizer and trainer keys personalize honours take values it can honour;
    anything else fails here, naming what is valid."""
    o, t = recipe["optim"], recipe["trainer"]
    if o["name"] not in OPTIMIZERS:
        raise LgframeError(f"optim.name={o['name']!r}; valid for personalize: {', '.join(OPTIMIZERS)}")
    wd = o["weight_decay"]
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise LgframeError(f"optim.weight_decay={wd!r}; valid: a finite number >= 0 (0: no decay)")
    if precision_of(recipe) not in PRECISIONS:
        raise LgframeError(f"trainer.precision={t['precision']!r}; valid for personalize: {', '.join(PRECISIONS)} "
                           "(the DiT computes its timestep embedding in float32: bf16-true, 16-true and 64-true "
                           "do not run it)")
    d = t["devices"]
    one = d in (1, "1") or (isinstance(d, (list, tuple)) and len(d) == 1)
    if not one:
        raise LgframeError(f"trainer.devices={d!r}: personalize trains on one device; valid: 1, or a list of one "
                           "device id (e.g. [0])")
    if t["strategy"] != "auto":
        raise LgframeError(f"trainer.strategy={t['strategy']!r}: personalize trains on one device; valid: auto")
    if t["num_nodes"] != 1:
        raise LgframeError(f"trainer.num_nodes={t['num_nodes']!r}: personalize trains on one device; valid: 1")
    refuse_unhonoured(recipe, "personalize", honoured=("activation_checkpointing",))


def personalize_trainer(recipe: dict, run_dir: Path, callbacks: list | None = None) -> pl.Trainer:
    """The Lightning Trainer of a personalization run: fit's pieces (`single_device_trainer`),
    one device, no checkpoints (the run writes the adapter folder)."""
    check_settings(recipe)
    return single_device_trainer(recipe, run_dir, callbacks, precision=precision_of(recipe))


class PersonalizeTask(DiffusionTask):
    """LoRA personalization of a DiT (see the module docstring). `model` already
    carries the subject class and the LoRA adapters; `table` holds the base's token
    positions (default: read from `model`)."""

    def __init__(self, recipe: dict, model: DiT, subject: int, table: PositionTable | None = None):
        check_settings(recipe)
        super().__init__(recipe, model)
        self.table = table if table is not None else PositionTable(model)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise LgframeError("personalize trains noise prediction: diffusion.prediction must be epsilon, "
                               f"not {self.noise_scheduler.config.prediction_type!r}")
        p = recipe["personalize"]
        self.subject = subject
        self.front, self.back = p["skip_front"], p["skip_back"]
        self.s_max = p["image_size"]
        self.s_min = p["s_min"] or model.config.image_size
        self.patch = p["patch_sampling"]
        self.positions = p["patch_positions"]
        if self.positions not in ("crop", "grid"):
            raise LgframeError(f"personalize.patch_positions={self.positions!r}; valid: crop, grid")
        block_ranges(len(model.blocks), self.front, self.back)
        if self.s_min > self.s_max:
            raise LgframeError(f"s_min={self.s_min} > image_size (s_max) {self.s_max}")
        classes = model.y_embedder.embedding_table.weight
        classes.requires_grad_(True)  # only the subject's row learns (the hook zeroes the others' gradient)
        mask = torch.zeros(classes.shape[0], 1)
        mask[subject] = 1.0
        classes.register_hook(lambda g: g * mask.to(g.device, g.dtype))
        # and the other rows are put back after each step: weight decay (and SGD's, coupled) moves them too
        self._other_rows = mask == 0
        self._class_rows = classes.detach().clone()

    def training_inputs(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """(x_t, t, noise, pos): the noisy (cropped) inputs at s_min and, for crops with
        `patch_positions: crop`, each token's position in the full-resolution grid."""
        T = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(x0.device)
        pos = None
        if self.patch:
            boxes: list = []
            x = patch_batch(x0, t, T, self.s_min, self.s_max, generator, boxes)
            if self.positions == "crop":
                pos = self.table.at_boxes(self.s_min, self.s_max, boxes).to(x.device)
        else:
            x = resize(x0, self.s_min)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return self.noise_scheduler.add_noise(x, noise, t), t, noise, pos

    @override
    def training_step(self, batch, batch_idx):
        (x0,) = batch
        x_t, t, noise, pos = self.training_inputs(x0)
        y = torch.full((x0.shape[0],), self.subject, device=x0.device)
        eps = dit_forward(self.model, x_t, t, y, self.front, self.back, pos)
        return self.total_loss(F.mse_loss(eps, noise), "train")

    @override
    def validation_step(self, batch, batch_idx):
        """Held-out subject images at full resolution, all blocks, fixed noise and timesteps."""
        (x0,) = batch
        g = torch.Generator().manual_seed(1000 + batch_idx)
        T = self.noise_scheduler.config.num_train_timesteps
        pos = None
        if self.table.inherited and x0.shape[-1] != self.model.config.image_size:  # the base's table at s_max
            pos = self.table.at_grid(x0.shape[-1] // self.model.config.patch_size)
        losses = []
        for _ in range(4):
            t = torch.randint(0, T, (x0.shape[0],), generator=g).to(x0.device)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            y = torch.full((x0.shape[0],), self.subject, device=x0.device)
            eps = dit_forward(self.model, self.noise_scheduler.add_noise(x0, noise, t), t, y, pos=pos)
            losses.append(F.mse_loss(eps, noise))
        self.total_loss(torch.stack(losses).mean(), "val")

    @override
    def configure_model(self) -> None:
        """Nothing to attach: the base is dense and frozen, the adapters are in place.
        `trainer.activation_checkpointing`: every block keeps only its inputs and recomputes
        itself in the backward (only the middle blocks have a backward: the skipped ones
        run under no_grad)."""
        if self.recipe["trainer"].get("activation_checkpointing"):
            set_activation_checkpointing(self.model)

    # configure_optimizers: LgTask's (fit's) optimizer over the trainable parameters (LoRA A, B and the
    # class table): optim.name adamw | sgd, lr, weight_decay, warmup_steps, schedule.

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.restore_class_rows()

    @torch.no_grad()
    def restore_class_rows(self) -> None:
        """Every class row but the subject's back to the base's values (bit for bit)."""
        w = self.model.y_embedder.embedding_table.weight
        keep = self._other_rows.to(w.device)
        w.copy_(torch.where(keep, self._class_rows.to(w.device, w.dtype), w))


# ------------------------------------------------------------------ files
def lora_state(model: nn.Module, subject: int) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict  # deferred: peft (imports transformers)

    state = {f"lora/{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state["subject/embedding"] = model.y_embedder.embedding_table.weight[subject].detach().cpu().clone()
    return state


def save_lora(model: nn.Module, subject: int, path: str | os.PathLike, base_config: dict, p: dict, blocks: range) -> Path:
    """The earlier single-file format (lgframe-lora/1, still read by `load_personalized`):
    the LoRA weights and the subject's embedding in one safetensors file (atomic), with
    the base's config, the rank, alpha, blocks and class in its metadata. Runs write
    `save_adapter`'s folder."""
    meta = {"format": LORA_FORMAT, "base_config": base_config, "subject": subject, "rank": p["lora_rank"],
            "alpha": p["lora_alpha"], "blocks": list(blocks)}
    save_tensors(path, lora_state(model, subject), {"lgframe_lora": json.dumps(meta)})
    return Path(path)


def save_adapter(model: nn.Module, subject: int, folder: str | os.PathLike, base_config: dict, p: dict, blocks: range,
                 overwrite: bool = False) -> Path:
    """The LoRA as a PEFT adapter folder, written by peft's `save_pretrained`
    (`adapter_config.json`, `adapter_model.safetensors`, peft's README.md), with the
    subject beside it: `subject.safetensors` (its class embedding row) and
    `subject.json` (format, the base's config, the subject's class index, rank, alpha,
    blocks). Written into a temporary folder beside `folder`, then renamed: a failed
    save leaves no half-written folder. `peft.PeftModel.from_pretrained(subject_base(base,
    folder)[0], folder)` loads it onto the base."""
    from peft import get_peft_model  # deferred: peft (imports transformers)

    config = model.peft_config["default"]
    # peft's PeftModel over a skeleton on the meta device (no memory for the base weights),
    # holding the trained adapter tensors themselves; save_pretrained reads only those.
    with torch.device("meta"):
        skeleton = model_from_config(model.config.to_dict())
    wrapped = get_peft_model(skeleton, copy_config(config), low_cpu_mem_usage=True)
    state = {f"base_model.model.{n}": t.detach() for n, t in model.named_parameters() if ".lora_" in n}
    res = wrapped.load_state_dict(state, strict=False, assign=True)
    lora_keys = {n for n, _ in wrapped.named_parameters() if ".lora_" in n}
    if res.unexpected_keys or lora_keys - set(state):
        raise LgframeError(f"save_adapter: the adapters do not match a fresh peft model: {res.unexpected_keys[:3]} "
                           f"{sorted(lora_keys - set(state))[:3]}")
    meta = {"format": ADAPTER_FORMAT, "base_config": base_config, "subject": subject,
            "num_classes": model.config.num_classes, "rank": p["lora_rank"], "alpha": p["lora_alpha"],
            "blocks": list(blocks), "targets": list(LORA_TARGETS)}
    with atomic_dir(folder, replace=overwrite) as tmp:
        wrapped.save_pretrained(str(tmp))
        row = model.y_embedder.embedding_table.weight[subject]
        save_tensors(tmp / SUBJECT_TENSORS, {"embedding": row}, {"lgframe_lora": json.dumps(meta)})
        write_json(tmp / SUBJECT_META, meta)
    return Path(folder)


def copy_config(config):
    """A fresh LoraConfig with the same settings (peft keeps state on the one it is given)."""
    from peft import LoraConfig  # deferred: peft (imports transformers)

    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules)


def read_adapter_meta(folder: Path) -> tuple[dict, torch.Tensor]:
    """subject.json and the subject's embedding row of an adapter folder, checked."""
    for name in ("adapter_config.json", "adapter_model.safetensors", SUBJECT_TENSORS, SUBJECT_META):
        if not (folder / name).is_file():
            raise LgframeError(f"'{folder}' is not an lgframe personalization folder: {name} is missing (it holds "
                               f"adapter_config.json, adapter_model.safetensors, {SUBJECT_TENSORS}, {SUBJECT_META})")
    try:
        meta = json.loads((folder / SUBJECT_META).read_text())
    except (OSError, ValueError) as e:
        raise LgframeError(f"'{folder / SUBJECT_META}' is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise LgframeError(f"'{folder / SUBJECT_META}' is not an {ADAPTER_FORMAT} record "
                           f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    tensors, _ = read_safetensors(folder / SUBJECT_TENSORS, "subject embedding file")
    if "embedding" not in tensors:
        raise LgframeError(f"'{folder / SUBJECT_TENSORS}' has no 'embedding' tensor")
    return meta, tensors["embedding"]


def subject_base(base: str | os.PathLike | DiT, folder: str | os.PathLike) -> tuple[DiT, int]:
    """The base DiT (dense, a copy) with the subject class of an adapter folder: its
    class table gains the subject's saved row (the null class moves one index up).
    What `peft.PeftModel.from_pretrained(model, folder)` loads the adapter onto."""
    folder = Path(folder)
    meta, row = read_adapter_meta(folder)
    model = plain_dit(read_model(base)[0] if not isinstance(base, nn.Module) else base)
    if model.config.to_dict() != meta["base_config"]:
        raise LgframeError(f"LoRA folder '{folder}' was trained on another base model: {meta['base_config']} vs "
                           f"{model.config.to_dict()}")
    model, subject = with_subject_class(model)
    if subject != meta["subject"]:
        raise LgframeError(f"LoRA folder '{folder}': subject class {meta['subject']}, but the base gives {subject}")
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[subject] = row.to(model.y_embedder.embedding_table.weight)
    return model, subject


def load_personalized(base: str | os.PathLike | DiT, lora: str | os.PathLike, image_size: int | None = None) -> tuple[DiT, int]:
    """The base DiT with the LoRA merged in: a plain DiT with the subject class
    (optionally rebuilt at another image side, e.g. s_max for sampling). `lora` is a
    run's adapter folder (`save_adapter`, loaded with peft's PeftModel.from_pretrained)
    or an earlier single lora.safetensors file (lgframe-lora/1)."""
    base_model = read_model(base)[0] if not isinstance(base, nn.Module) else base
    if Path(lora).is_dir():
        from peft import PeftModel  # deferred: peft (imports transformers)

        model, subject = subject_base(base_model, lora)
        table = PositionTable(model)
        model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
    else:
        model, subject = load_lora_file(base_model, lora)
        table = PositionTable(model)
    model.requires_grad_(True)
    return (at_image_size(model, image_size, table) if image_size else model), subject


def load_lora_file(base: DiT, lora: str | os.PathLike) -> tuple[DiT, int]:
    """The base with a single-file LoRA (lgframe-lora/1) merged in."""
    from peft import set_peft_model_state_dict  # deferred: peft (imports transformers)

    tensors, raw = read_safetensors(lora, "LoRA file")
    if "lgframe_lora" not in raw:
        raise LgframeError(f"'{lora}' is not an lgframe LoRA file (no 'lgframe_lora' metadata)")
    meta = json.loads(raw["lgframe_lora"])
    if meta.get("format") != LORA_FORMAT:
        raise LgframeError(f"'{lora}' is an lgframe LoRA record of format {meta.get('format')!r}, not a single "
                           f"{LORA_FORMAT} file (a {ADAPTER_FORMAT} record is a folder: give the folder)")
    model = plain_dit(base)
    if model.config.to_dict() != meta["base_config"]:
        raise LgframeError(f"LoRA file '{lora}' was trained on another base model: {meta['base_config']} vs {model.config.to_dict()}")
    model, subject = with_subject_class(model)
    model = add_lora(model, meta["rank"], meta["alpha"], range(0) if not meta["blocks"] else meta["blocks"])
    res = set_peft_model_state_dict(model, {k[len("lora/"):]: v for k, v in tensors.items() if k.startswith("lora/")})
    if getattr(res, "unexpected_keys", None):
        raise LgframeError(f"LoRA file '{lora}' has keys the model does not: {res.unexpected_keys[:3]}")
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[subject] = tensors["subject/embedding"]
    return merge_lora(model), subject


def plain_dit(model: nn.Module) -> DiT:
    """A dense DiT: a constrained base is materialized (its dense weights are what LoRA adapts)."""

    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(model)
    if not isinstance(model, DiT):
        raise LgframeError(f"personalization needs an lgframe DiT, got {type(model).__name__}")
    return model


def at_image_size(model: DiT, size: int, table: PositionTable | None = None) -> DiT:
    """The same weights at another image side; only the position table changes, to
    `table`'s (default: `model`'s own) at the new grid: sin-cos for a sin-cos base, an
    inherited table itself at its own grid and interpolated at others."""
    table = table if table is not None else PositionTable(model)
    if size % model.config.patch_size:
        raise LgframeError(f"image side {size} is not a multiple of the patch size {model.config.patch_size}")
    new = model_from_config(model.config.to_dict() | {"image_size": size})
    state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"pos_embed"}:
        raise LgframeError(f"cannot rebuild the DiT at side {size}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        new.pos_embed.copy_(table.at_grid(size // model.config.patch_size).to(new.pos_embed))
    return new


# ------------------------------------------------------------------ the command
@dataclass
class PersonalizeResult:
    run_dir: Path
    lora: Path
    samples: Path
    report: Path
    val_curve: list
    memory: dict
    task: PersonalizeTask | None = None  # the trained task (its trainer, optimizer and model)


def saved_bytes(fn, exclude=()) -> tuple[object, int]:
    """fn() and the bytes of the distinct storages autograd saves for its backward,
    except storages of the tensors in `exclude` (a model's parameters and buffers:
    F.linear saves its weight to compute the input's gradient, frozen or not, and that
    weight is the parameter itself, already counted, not an activation)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        try:
            s = tensor.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def step_memory(task: PersonalizeTask, x0: torch.Tensor) -> dict:
    """Counted bytes of one training step: parameters, gradients, optimizer state
    (AdamW: two moments per trainable parameter; SGD: one momentum buffer), the EMA
    copy of the module (`ema.enabled`: every parameter and buffer once more), and the
    activations: the tensors autograd saves for backward, the model's own parameters
    and buffers excluded (what the two savers change). Under a mixed precision, run it
    inside the autocast context (run_personalize uses the trainer's precision plugin):
    the half-precision copies of the weights autograd saves then count as activations."""
    model = task.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x_t, t, noise, pos = task.training_inputs(x0, g)
    y = torch.full((x0.shape[0],), task.subject, device=x0.device)
    weights = [*model.parameters(), *model.buffers()]

    def forward():
        eps = dit_forward(model, x_t, t, y, task.front, task.back, pos)
        return F.mse_loss(eps, noise.to(eps.dtype))

    loss, act = saved_bytes(forward, weights)
    grads = torch.autograd.grad(loss, trainable)
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g_bytes = sum(gr.numel() * gr.element_size() for gr in grads)
    opt_bytes = (1 if task.recipe["optim"]["name"] == "sgd" else 2) * g_bytes
    ema = task.recipe.get("ema", {}).get("enabled", False)
    ema_bytes = sum(w.numel() * w.element_size() for w in weights) if ema else 0
    return {"params": p_bytes, "grads": g_bytes, "optimizer": opt_bytes, "ema": ema_bytes, "activations": act,
            "total": p_bytes + g_bytes + opt_bytes + ema_bytes + act}


def personalize_model(base: DiT, p: dict) -> tuple[DiT, int, range, PositionTable]:
    """What a run trains: the (dense) base at s_min with the subject class and LoRA on
    the middle blocks, the subject's class, those blocks and the base's positions."""
    table = PositionTable(base)
    s_min = p["s_min"] or base.config.image_size
    model, subject = with_subject_class(at_image_size(base, s_min, table))
    _, middle, _ = block_ranges(base.config.depth, p["skip_front"], p["skip_back"])
    return add_lora(model, p["lora_rank"], p["lora_alpha"], middle), subject, middle, table


def run_personalize(cfg) -> PersonalizeResult:
    """`lgframe personalize RECIPE`: LoRA on the subject, samples, report."""


    recipe = OmegaConf.to_container(cfg, resolve=True)
    p = recipe["personalize"]
    if not p["base"]:
        raise LgframeError("personalize.base is required: a pretrained DiT model file or checkpoint (e.g. a run's last.ckpt)")
    check_settings(recipe)
    pl.seed_everything(recipe["seed"], workers=True, verbose=False)
    base = plain_dit(read_model(p["base"])[0])
    base_config = base.config.to_dict()
    s_min = p["s_min"] or base.config.image_size
    model, subject, middle, table = personalize_model(base, p)
    recipe["constraint"] = "scratch"
    task = PersonalizeTask(recipe, model, subject, table)
    images = subject_images(p["subject"], p["n_images"] + p["val_images"], p["image_size"], base.config.in_channels, recipe["seed"])
    train, val = images[: p["n_images"]], images[p["n_images"]:]
    if not len(val):
        raise LgframeError("personalize.val_images must be >= 1 (held-out subject images for the validation loss)")
    bs = recipe["data"]["batch_size"]
    t = recipe["trainer"]
    batches = t["max_steps"] * t.get("accumulate_grad_batches", 1)
    train_dl = DataLoader(TensorDataset(train), batch_size=bs,
                          sampler=RandomSampler(TensorDataset(train), replacement=True, num_samples=bs * batches))
    val_dl = DataLoader(TensorDataset(val), batch_size=len(val))
    run_dir = unique_dir(Path(recipe["out_dir"]) / recipe["name"])
    run_dir.mkdir(parents=True)
    trainer = personalize_trainer(recipe, run_dir)
    x_mem = train[: min(bs, len(train))].repeat(math.ceil(bs / len(train)), 1, 1, 1)[:bs]
    with trainer.precision_plugin.forward_context():  # the recipe's precision (mixed: autocast) for the counted step
        memory = step_memory(task, x_mem)
    with warnings.catch_warnings():
        for pattern in QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer.validate(task, val_dl, verbose=False)
        trainer.fit(task, train_dl, val_dl)
    lora = save_adapter(task.model, subject, run_dir / "lora", base_config, p, middle)
    full, _ = load_personalized(base, lora, image_size=p["image_size"])
    sampler = DiffusionTask(recipe, full)
    n = p["samples"]
    imgs = sampler.sample(torch.full((n,), subject), progress=t["progress"])
    samples = run_dir / "samples.png"
    from torchvision.utils import save_image  # deferred: torchvision (image grids only)

    with atomic_path(samples) as tmp:
        grid = torch.cat([((train[: min(n, len(train))] + 1) / 2), ((imgs + 1) / 2)])
        save_image(grid, tmp, nrow=max(len(train[:n]), 1) if n <= len(train) else n, padding=1, pad_value=0.5, format="png")
    curve = read_curve(run_dir, "val/loss")
    plot_curves({"val/loss (held-out subject, full resolution)": curve}, run_dir / "loss.png", "denoising loss",
                f"personalize: skip {p['skip_front']}+{p['skip_back']}, s {s_min}->{p['image_size']}")
    mb = {k: v / 2**20 for k, v in memory.items()}
    report = run_dir / "report.md"
    write_text(report, "\n".join([
        f"# Personalization: {p['subject']} as class {subject}",
        "",
        f"Base: `{p['base']}` (DiT depth {base.config.depth}, width {base.config.width}); LoRA rank {p['lora_rank']}, "
        f"alpha {p['lora_alpha']} on blocks {list(middle)}; skip front {p['skip_front']}, back {p['skip_back']}; "
        f"patch sampling {'on' if p['patch_sampling'] else 'off'}, s_min {s_min}, s_max {p['image_size']}; "
        f"{p['n_images']} training images, {len(val)} held out; {t['max_steps']} steps.",
        "",
        *markdown_table(["step", "val loss"], [(s, f"{v:.4f}") for s, v in curve]),
        "",
        "Counted memory of one training step (MiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mb.items()),
        "",
        f"LoRA: `lora/`, a PEFT adapter folder ({folder_bytes(lora) / 1024:.1f} KiB; "
        "`peft.PeftModel.from_pretrained` loads it onto the base with the subject class, "
        "`lgframe.apps.personalize.load_personalized(base, folder)` merges it). Optimizer "
        f"{recipe['optim']['name']} (weight decay {recipe['optim']['weight_decay']}), EMA "
        f"{'on' if recipe['ema']['enabled'] else 'off'}, precision {precision_of(recipe)}.",
        "",
        "![loss](loss.png)", "",
        "Top row: training images; then samples of the subject class (full model, LoRA merged, CFG):", "",
        "![samples](samples.png)", "",
    ]))
    return PersonalizeResult(run_dir, lora, samples, report, curve, memory, task)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
