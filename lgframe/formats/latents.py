"""The latents folder format (written by `lgframe encode`, read for latent DiT training).

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
from lgframe.formats.files import read_safetensors

FORMAT = "lgframe-latents"
VERSION = 1
SHARD = 4096  # items per shard


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


