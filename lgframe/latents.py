"""Latent DiT data: encode an image folder with a local diffusers AutoencoderKL,
read the latents back for training, decode samples through the same VAE.

A latents folder (written by `lgframe encode`, atomically as a whole):

    latents.json                 format, count, latent shape, scaling factor,
                                 class names, image size, the VAE's folder
    latents-00000.safetensors    "latents" (n, C, h, w) float32, already times
    latents-00001.safetensors    the VAE's scaling factor; "labels" (n,) int64
    ...

Encoding takes the mean of the VAE's posterior (`latent_dist.mode()`), so a
folder encodes to the same latents every time; DiT training adds its own
noise. Nothing downloads: the VAE is a local folder saved by
`AutoencoderKL.save_pretrained` (e.g. the `vae/` folder of a Stable Diffusion
or DiT checkpoint you already have).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lgframe.errors import LgframeError

FORMAT = "lgframe-latents"
VERSION = 1
SHARD = 4096  # items per shard


def load_vae(path: str | os.PathLike):
    """A diffusers AutoencoderKL from a local folder (eval mode)."""
    from diffusers import AutoencoderKL

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise LgframeError(f"'{path}' is not a diffusers AutoencoderKL folder (no config.json); give a local folder "
                           "saved by AutoencoderKL.save_pretrained. Nothing is downloaded.")
    try:
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError, TypeError) as e:
        raise LgframeError(f"could not load the VAE in {path}: {e}") from None


def scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or 1.0)


@torch.no_grad()
def encode_folder(vae_dir: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                  image_size: int = 256, channels: int = 3, crop: str = "center", batch_size: int = 16,
                  progress: bool = True, overwrite: bool = False) -> dict:
    """Encodes an ImageFolder-style directory into a latents folder at `out`; returns its info."""
    from rich.progress import Progress

    from lgframe.data import load_image_folder
    from lgframe.io import atomic_dir, save_tensors

    if batch_size < 1:
        raise LgframeError(f"batch_size={batch_size} must be >= 1")
    vae = load_vae(vae_dir)
    want = int(vae.config.in_channels)
    if channels != want:
        raise LgframeError(f"the VAE takes {want}-channel images; channels={channels}")
    x, y, classes = load_image_folder(images, image_size, channels, crop)
    sf = scaling_factor(vae)
    chunks = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("encoding", total=len(x))
        for i in range(0, len(x), batch_size):
            chunks.append(vae.encode(x[i:i + batch_size]).latent_dist.mode() * sf)
            bar.advance(task, len(chunks[-1]))
    z = torch.cat(chunks).float().contiguous()
    info = {"format": FORMAT, "version": VERSION, "count": len(z), "latent_channels": z.shape[1],
            "latent_size": z.shape[2], "scaling_factor": sf, "class_names": classes, "image_size": image_size,
            "channels": channels, "vae": str(Path(vae_dir).expanduser().resolve()), "images": str(Path(images).resolve()),
            "shards": []}
    with atomic_dir(out, replace=overwrite) as tmp:
        for k, i in enumerate(range(0, len(z), SHARD)):
            name = f"latents-{k:05d}.safetensors"
            save_tensors(tmp / name, {"latents": z[i:i + SHARD], "labels": y[i:i + SHARD].contiguous()},
                         {"format": FORMAT, "scaling_factor": str(sf)})
            info["shards"].append(name)
        (tmp / "latents.json").write_text(json.dumps(info, indent=2))
    return info


def read_latents_info(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    f = path / "latents.json"
    if not f.is_file():
        raise LgframeError(f"'{path}' is not a latents folder (no latents.json); write one with "
                           "`lgframe encode --vae VAE_DIR --images FOLDER --out LATENTS`")
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LgframeError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LgframeError(f"{f}: format {info.get('format') if isinstance(info, dict) else None!r}, expected {FORMAT!r}")
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    checks = {
        "count": (positive, "an integer >= 1"),
        "latent_channels": (positive, "an integer >= 1"),
        "latent_size": (positive, "an integer >= 1"),
        "scaling_factor": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
        "class_names": (lambda v: isinstance(v, list) and len(v) >= 1 and all(isinstance(c, str) for c in v),
                        "a non-empty list of class names"),
        "shards": (lambda v: isinstance(v, list) and len(v) >= 1 and all(
            isinstance(n, str) and Path(n).name == n and n.endswith(".safetensors") for n in v),
            "a non-empty list of .safetensors file names inside the folder"),
    }
    for key, (ok, valid) in checks.items():
        if key not in info:
            raise LgframeError(f"{f}: key '{key}' is missing (latents format version {info.get('version')!r}); "
                               "re-encode the images with `lgframe encode`")
        if not ok(info[key]):
            raise LgframeError(f"{f}: '{key}' is {info[key]!r}; it must be {valid}")
    return info


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """All latents (N, C, h, w), labels (N,) and the info of a latents folder."""
    from lgframe.io import read_safetensors

    info = read_latents_info(path)
    zs, ys = [], []
    want = (info["latent_channels"], info["latent_size"], info["latent_size"])
    for name in info["shards"]:
        shard = Path(path).expanduser() / name
        t, _ = read_safetensors(shard, "latents shard")
        if "latents" not in t or "labels" not in t:
            raise LgframeError(f"latents shard '{shard}' must hold tensors 'latents' and 'labels'; it holds {sorted(t)}")
        z, y = t["latents"], t["labels"]
        if z.dim() != 4 or tuple(z.shape[1:]) != want or y.shape != (len(z),):
            raise LgframeError(
                f"latents shard '{shard}' holds latents {tuple(z.shape)} and labels {tuple(y.shape)}; latents.json "
                f"describes (N, {want[0]}, {want[1]}, {want[2]}) latents with N labels"
            )
        if not z.is_floating_point() or y.dtype != torch.int64 or (len(y) and (y.min() < 0 or y.max() >= len(info["class_names"]))):
            raise LgframeError(f"latents shard '{shard}': latents must be floating point and labels int64 in "
                               f"0..{len(info['class_names']) - 1}")
        zs.append(z)
        ys.append(y)
    z, y = torch.cat(zs), torch.cat(ys)
    if len(z) != info["count"]:
        raise LgframeError(f"{path}: the shards hold {len(z)} latents, latents.json says {info['count']}")
    return z, y, info


@torch.no_grad()
def decode(z: torch.Tensor, vae, batch_size: int = 16) -> torch.Tensor:
    """Latents (already times the scaling factor) -> images in [-1, 1]."""
    sf = scaling_factor(vae)
    out = [vae.decode(z[i:i + batch_size] / sf).sample for i in range(0, len(z), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def sample_decoder(data_cfg) -> str | None:
    """The VAE folder that decodes a latent DiT's samples: `data.vae`, else the one
    `lgframe encode` recorded; None for pixel data."""
    if data_cfg is None or data_cfg.get("name") != "latents":
        return None
    if data_cfg.get("vae"):
        return data_cfg["vae"]
    return read_latents_info(data_cfg["path"]).get("vae")
