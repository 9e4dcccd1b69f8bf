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
samples at s_max.
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
from lgframe.formats.files import atomic_path, read_safetensors, save_tensors, write_text
from lgframe.models.dit import DiT, sincos_at, sincos_pos_embed
from lgframe.models.files import read_model
from lgframe.models.registry import model_from_config
from lgframe.training.stages import make_loggers, plot_curves, read_curve, unique_dir
from lgframe.training.tasks import DiffusionTask, warmup

LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_FORMAT = "lgframe-lora/1"


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


def crop_positions(dim: int, patch: int, s_min: int, boxes: list) -> torch.Tensor:
    """(B, (s_min/patch)^2, dim): each token's position in the full-resolution patch grid
    (the centre of the pixels it covers), so a crop keeps the positions of its place."""
    g = s_min // patch
    centre = (torch.arange(g, dtype=torch.float64) + 0.5) * patch  # token centres in the s_min crop, pixels
    out = []
    for top, left, side in boxes:
        scale = side / s_min
        ys, xs = (top + centre * scale) / patch - 0.5, (left + centre * scale) / patch - 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(sincos_at(dim, gy, gx))
    return torch.stack(out)


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
    optionally, per-sample token positions `pos` (B, N, width) (patch sampling's crops).
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
class PersonalizeTask(DiffusionTask):
    """LoRA personalization of a DiT (see the module docstring). `model` already
    carries the subject class and the LoRA adapters."""

    def __init__(self, recipe: dict, model: DiT, subject: int):
        super().__init__(recipe, model)
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
        table = model.y_embedder.embedding_table.weight
        table.requires_grad_(True)  # only the subject's row learns (the hook zeroes the others' gradient)
        mask = torch.zeros(table.shape[0], 1)
        mask[subject] = 1.0
        table.register_hook(lambda g: g * mask.to(g.device, g.dtype))

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
                cfg = self.model.config
                pos = crop_positions(cfg.width, cfg.patch_size, self.s_min, boxes).to(x.device)
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
        losses = []
        for _ in range(4):
            t = torch.randint(0, T, (x0.shape[0],), generator=g).to(x0.device)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            y = torch.full((x0.shape[0],), self.subject, device=x0.device)
            eps = dit_forward(self.model, self.noise_scheduler.add_noise(x0, noise, t), t, y)
            losses.append(F.mse_loss(eps, noise))
        self.total_loss(torch.stack(losses).mean(), "val")

    @override
    def configure_model(self) -> None:
        """Nothing to attach: the base is dense and frozen, the adapters are in place."""

    @override
    def configure_optimizers(self):
        o = self.recipe["optim"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=0.0)  # no decay: frozen rows must not move
        warm = o["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup(s, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------ files
def lora_state(model: nn.Module, subject: int) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict  # deferred: peft (imports transformers)

    state = {f"lora/{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state["subject/embedding"] = model.y_embedder.embedding_table.weight[subject].detach().cpu().clone()
    return state


def save_lora(model: nn.Module, subject: int, path: str | os.PathLike, base_config: dict, p: dict, blocks: range) -> Path:
    """The LoRA weights and the subject's embedding (safetensors, atomic), with what is
    needed to apply them to the base: its config, the rank, alpha, blocks and class."""
    meta = {"format": LORA_FORMAT, "base_config": base_config, "subject": subject, "rank": p["lora_rank"],
            "alpha": p["lora_alpha"], "blocks": list(blocks)}
    save_tensors(path, lora_state(model, subject), {"lgframe_lora": json.dumps(meta)})
    return Path(path)


def load_personalized(base: str | os.PathLike | DiT, lora: str | os.PathLike, image_size: int | None = None) -> tuple[DiT, int]:
    """The base DiT with the LoRA file merged in: a plain DiT with the subject class
    (optionally rebuilt at another image side, e.g. s_max for sampling)."""
    from peft import set_peft_model_state_dict  # deferred: peft (imports transformers)

    tensors, raw = read_safetensors(lora, "LoRA file")
    if "lgframe_lora" not in raw:
        raise LgframeError(f"'{lora}' is not an lgframe LoRA file (no 'lgframe_lora' metadata)")
    meta = json.loads(raw["lgframe_lora"])
    model = read_model(base)[0] if not isinstance(base, nn.Module) else base
    model = plain_dit(model)
    if model.config.to_dict() != meta["base_config"]:
        raise LgframeError(f"LoRA file '{lora}' was trained on another base model: {meta['base_config']} vs {model.config.to_dict()}")
    model, subject = with_subject_class(model)
    model = add_lora(model, meta["rank"], meta["alpha"], range(0) if not meta["blocks"] else meta["blocks"])
    res = set_peft_model_state_dict(model, {k[len("lora/"):]: v for k, v in tensors.items() if k.startswith("lora/")})
    if getattr(res, "unexpected_keys", None):
        raise LgframeError(f"LoRA file '{lora}' has keys the model does not: {res.unexpected_keys[:3]}")
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[subject] = tensors["subject/embedding"]
    model = merge_lora(model)
    model.requires_grad_(True)
    return (at_image_size(model, image_size) if image_size else model), subject


def plain_dit(model: nn.Module) -> DiT:
    """A dense DiT: a constrained base is materialized (its dense weights are what LoRA adapts)."""

    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(model)
    if not isinstance(model, DiT):
        raise LgframeError(f"personalization needs an lgframe DiT, got {type(model).__name__}")
    return model


def at_image_size(model: DiT, size: int) -> DiT:
    """The same weights at another image side (only the fixed sin-cos positions change)."""
    new = model_from_config(model.config.to_dict() | {"image_size": size})
    state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"pos_embed"}:
        raise LgframeError(f"cannot rebuild the DiT at side {size}: missing {missing}, unexpected {unexpected}")
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


def step_memory(task: PersonalizeTask, x0: torch.Tensor) -> dict:
    """Counted bytes of one training step: parameters, gradients, AdamW state and the
    tensors autograd saves for backward (what the two savers change)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        try:
            s = tensor.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return tensor

    model = task.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x_t, t, noise, pos = task.training_inputs(x0, g)
    y = torch.full((x0.shape[0],), task.subject)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.mse_loss(dit_forward(model, x_t, t, y, task.front, task.back, pos), noise)
    grads = torch.autograd.grad(loss, trainable)
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g_bytes = sum(gr.numel() * gr.element_size() for gr in grads)
    opt_bytes = 2 * g_bytes  # AdamW: two moments per trainable parameter
    act = sum(seen.values())
    return {"params": p_bytes, "grads": g_bytes, "optimizer": opt_bytes, "activations": act,
            "total": p_bytes + g_bytes + opt_bytes + act}


def run_personalize(cfg) -> PersonalizeResult:
    """`lgframe personalize RECIPE`: LoRA on the subject, samples, report."""


    recipe = OmegaConf.to_container(cfg, resolve=True)
    p = recipe["personalize"]
    if not p["base"]:
        raise LgframeError("personalize.base is required: a pretrained DiT model file or checkpoint (e.g. a run's last.ckpt)")
    pl.seed_everything(recipe["seed"], workers=True, verbose=False)
    base = plain_dit(read_model(p["base"])[0])
    base_config = base.config.to_dict()
    s_min = p["s_min"] or base.config.image_size
    model, subject = with_subject_class(at_image_size(base, s_min))
    _, middle, _ = block_ranges(base.config.depth, p["skip_front"], p["skip_back"])
    model = add_lora(model, p["lora_rank"], p["lora_alpha"], middle)
    recipe["constraint"] = "scratch"
    task = PersonalizeTask(recipe, model, subject)
    images = subject_images(p["subject"], p["n_images"] + p["val_images"], p["image_size"], base.config.in_channels, recipe["seed"])
    train, val = images[: p["n_images"]], images[p["n_images"]:]
    if not len(val):
        raise LgframeError("personalize.val_images must be >= 1 (held-out subject images for the validation loss)")
    bs = recipe["data"]["batch_size"]
    train_dl = DataLoader(TensorDataset(train), batch_size=bs,
                          sampler=RandomSampler(TensorDataset(train), replacement=True, num_samples=bs * recipe["trainer"]["max_steps"]))
    val_dl = DataLoader(TensorDataset(val), batch_size=len(val))
    run_dir = unique_dir(Path(recipe["out_dir"]) / recipe["name"])
    run_dir.mkdir(parents=True)
    memory = step_memory(task, train[: min(bs, len(train))].repeat(math.ceil(bs / len(train)), 1, 1, 1)[:bs])
    t = recipe["trainer"]
    trainer = pl.Trainer(max_steps=t["max_steps"], val_check_interval=t["val_every"], check_val_every_n_epoch=None,
                         accelerator=t["accelerator"], devices=1, logger=make_loggers(t["logger"], run_dir, recipe["name"]),
                         enable_checkpointing=False, enable_progress_bar=t["progress"], log_every_n_steps=t["log_every"],
                         gradient_clip_val=recipe["optim"]["grad_clip"], num_sanity_val_steps=0, enable_model_summary=False)
    trainer.validate(task, val_dl, verbose=False)
    trainer.fit(task, train_dl, val_dl)
    lora = save_lora(task.model, subject, run_dir / "lora.safetensors", base_config, p, middle)
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
        f"LoRA file: `lora.safetensors` ({lora.stat().st_size / 1024:.1f} KiB).",
        "",
        "![loss](loss.png)", "",
        "Top row: training images; then samples of the subject class (full model, LoRA merged, CFG):", "",
        "![samples](samples.png)", "",
    ]))
    return PersonalizeResult(run_dir, lora, samples, report, curve, memory)
