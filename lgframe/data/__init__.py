"""Data: the data sets (`datasets`: the embedded digits and shapes, image folders),
the Lightning data module that serves them with a resumable loader (`datamodule`),
and VAE encoding and decoding for a latent DiT (`latents`). Import from the
submodules; `ImageDataModule` and `build_datamodule` are also reachable here (loaded
on first use: the data module pulls in Lightning).
"""

import importlib

__all__ = ["ImageDataModule", "build_datamodule"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("lgframe.data.datamodule"), name)
    raise AttributeError(f"module 'lgframe.data' has no attribute {name!r}")
