"""Sample-quality metrics that need no download.

- A small feature classifier per built-in data set and image size (digits,
  shapes, animals), trained once on that data's training split (deterministic,
  seconds on a CPU) and cached in the user cache directory as safetensors with
  a SHA-256 beside it; a missing or corrupt cache is rebuilt.
- FID through torchmetrics' `FrechetInceptionDistance` with that classifier's
  penultimate features (`DigitsFeatures`) in place of Inception.
- Class accuracy of generated samples: does the classifier read back the label
  the sample was generated for (a conditional-generation check).
- Inception FID through torchmetrics/torch-fidelity only from a local weights
  file (`inception_weights=PATH`): nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torchmetrics.image.fid import FrechetInceptionDistance

from lgframe.data.datamodule import ImageDataModule
from lgframe.data.datasets import random_shift
from lgframe.errors import LgframeError
from lgframe.formats.files import save_tensors, write_json

CLASSIFIER_VERSION = 1
log = logging.getLogger("lgframe")


def cache_dir() -> Path:
    root = os.environ.get("LGFRAME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lgframe"
    )
    return Path(root)


FEATURE_DATA = ("digits", "shapes", "animals")  # the data sets with a feature classifier


class DigitsClassifier(nn.Module):
    """(N, 1, S, S) in [-1, 1] -> logits (N, 10); `features` gives the 64-d penultimate
    layer. Two convolutions, then an average pool to 4x4 (a no-op for 8x8 digits)."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 64), nn.GELU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _train_classifier(data: str = "digits", image_size: int = 8, steps: int = 600) -> DigitsClassifier:

    dm = ImageDataModule(data, seed=0, image_size=image_size)
    dm.setup()
    x, y = dm.train_set.tensors
    # enable_grad: the first use may come from inside a no_grad evaluation.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(0)
        model = DigitsClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (256,), generator=g)
            loss = F.cross_entropy(model(random_shift(x[idx], 1, generator=g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digits_classifier() -> DigitsClassifier:
    """The cached 8x8 digits classifier; trained and cached on first use or when the cache is bad."""
    return feature_classifier("digits", 8)


def feature_classifier(data: str = "digits", image_size: int = 8) -> DigitsClassifier:
    """The cached classifier of a built-in data set at one image size; trained (a few
    seconds to a minute, logged) and cached on first use or when the cache is bad."""
    if data not in FEATURE_DATA:
        raise LgframeError(f"no feature classifier for data '{data}'; FID and class accuracy exist for "
                           f"{', '.join(FEATURE_DATA)}")
    stem = "digits" if (data, image_size) == ("digits", 8) else f"{data}{image_size}"
    path = cache_dir() / f"{stem}_classifier_v{CLASSIFIER_VERSION}.safetensors"
    sidecar = path.with_suffix(".json")
    model = DigitsClassifier()
    try:
        if json.loads(sidecar.read_text())["sha256"] != _sha(path):
            raise ValueError("hash mismatch")
        model.load_state_dict(load_file(path))
        return model.eval()
    except Exception:  # missing, corrupt or changed: rebuild
        pass
    log.warning("first use: training the %s feature classifier (%dx%d) for FID and class accuracy (under a minute; cached in %s)",
             data, image_size, image_size, path)
    model = _train_classifier(data, image_size)
    save_tensors(path, dict(model.state_dict()), {"lgframe": f"{data} classifier", "image_size": str(image_size)})
    write_json(sidecar, {"sha256": _sha(path), "version": CLASSIFIER_VERSION})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class DigitsFeatures(nn.Module):
    """FID feature extractor for torchmetrics (images in [0, 1] with normalize=True)."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.max() > 1.5:  # uint8 input
            x = x / 255.0
        return self.classifier.features(x * 2 - 1)


def digits_fid(real: torch.Tensor, fake: torch.Tensor, data: str = "digits") -> float:
    """FID between two image sets (N, 1, S, S) in [-1, 1], in the feature space of
    `data`'s classifier at size S (digits by default)."""
    fid = FrechetInceptionDistance(feature=DigitsFeatures(feature_classifier(data, real.shape[-1])), normalize=True)
    fid.update((real + 1) / 2, real=True)
    fid.update((fake + 1) / 2, real=False)
    return float(fid.compute())


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, data: str = "digits") -> float:
    """Share of images (in [-1, 1]) `data`'s classifier (digits by default) assigns to their label."""
    return float((feature_classifier(data, images.shape[-1])(images).argmax(1) == labels).float().mean())


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights: str | None) -> float:
    """Inception FID from a local weights file (torchmetrics' FeatureExtractorInceptionV3 format)."""
    if not weights or not Path(weights).is_file():
        raise LgframeError(
            "Inception FID needs a local weights file: download 'pt_inception-2015-12-05-6726825d.pth' (the "
            "torch-fidelity / torchmetrics Inception) on a machine with network access and pass its path as "
            f"eval.inception_weights (given: {weights!r}). The digits FID needs no file."
        )

    def rgb(x):
        return ((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)

    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    fid.update(rgb(real), real=True)
    fid.update(rgb(fake), real=False)
    return float(fid.compute())


