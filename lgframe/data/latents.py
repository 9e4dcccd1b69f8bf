"""Latent DiT data: encode an image folder with a local diffusers AutoencoderKL into a
latents folder (lgframe/formats/latents.py), decode samples through the same VAE.

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
from rich.progress import Progress

from lgframe.data.datasets import load_image_folder
from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_dir, save_tensors
from lgframe.formats.latents import FORMAT, SHARD, VERSION, read_latents_info


def load_vae(path: str | os.PathLike):
    """A diffusers AutoencoderKL from a local folder (eval mode)."""
    from diffusers import AutoencoderKL  # deferred: diffusers (seconds to import)

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
