"""The data sets: two embedded 10-class domains of 1x8x8 images in [-1, 1]
(background -1) and the user's own image folders.

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, no download);
* ``shapes``: procedurally drawn shapes, a second domain for transfer experiments;
* ``imagefolder``: a folder with one subfolder of images per class (sorted
  names are the labels), resized/cropped, held in memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from lgframe.errors import LgframeError

DATA_NAMES = ("digits", "shapes", "animals", "imagefolder", "latents")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CROPS = ("center", "resize")
SHAPES_SEED = 0
SHAPE_NAMES = (
    "filled square",
    "hollow square",
    "horizontal bar",
    "vertical bar",
    "plus",
    "x",
    "triangle",
    "two dots",
    "L",
    "T",
)


class DataError(LgframeError, ValueError):
    """A bad data argument: a ValueError for library callers, an LgframeError so
    the CLI prints it as a one-paragraph message."""


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: images float32 (1797, 1, 8, 8) in [-1, 1], labels int64 (1797,)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, read from disk

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 16 * 2 - 1
    return x, torch.from_numpy(d.target.astype(np.int64))


def image_folder_classes(root) -> tuple[Path, list[str]]:
    """The class subfolders of an ImageFolder-style directory (sorted; index = label)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist (expected a folder with one subfolder of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder '{root}' has no class subfolders; put each class's images in "
                        f"'{root}/<class name>/' (e.g. {root}/cat/001.png)")
    return root, classes


def read_image(path: Path, image_size: int, channels: int = 3, crop: str = "center") -> np.ndarray | None:
    """One image file as float32 (C, S, S) in [0, 255], or None when it does not decode.
    ``crop="center"`` resizes the short side to ``image_size`` (bicubic) and crops the
    centre; ``"resize"`` resizes to a square (aspect not kept)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            if crop == "center":
                k = image_size / min(w, h)
                im = im.resize((max(image_size, round(w * k)), max(image_size, round(h * k))), Image.BICUBIC)
                left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            else:
                im = im.resize((image_size, image_size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def load_image_folder(root, image_size: int, channels: int = 3, crop: str = "center"):
    """An ImageFolder-style directory as tensors: images float32 (N, C, S, S) in
    [-1, 1], labels int64 (N,), class names (sorted subfolder names; index =
    label). ``crop="center"`` resizes the short side to ``image_size`` and crops
    the centre; ``"resize"`` resizes to a square (aspect not kept). Files that
    are not images or do not decode are skipped with one warning that counts
    them; a folder without readable images is an error."""


    if crop not in CROPS:
        raise DataError(f"crop={crop!r}; valid: {', '.join(CROPS)}")
    if channels not in (1, 3):
        raise DataError(f"channels={channels}; valid: 1 (grayscale) or 3 (RGB)")
    if int(image_size) < 1:
        raise DataError(f"image_size={image_size} must be >= 1")
    root, classes = image_folder_classes(root)
    images, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        for f in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(f)
                continue
            a = read_image(f, image_size, channels, crop)
            if a is None:
                skipped.append(f)
                continue
            images.append(a)
            labels.append(label)
    if skipped:
        names = ", ".join(str(p.relative_to(root)) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"image folder '{root}': skipped {len(skipped)} file(s) that are not readable images ({names})",
                      stacklevel=2)
    if not images:
        raise DataError(f"image folder '{root}' has no readable images in its class subfolders {classes} "
                        f"(suffixes read: {', '.join(IMAGE_SUFFIXES)})")
    x = torch.from_numpy(np.stack(images)) / 127.5 - 1
    return x, torch.tensor(labels, dtype=torch.int64), classes


def make_shapes(n: int, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes of 10 classes (see SHAPE_NAMES) with random position, scale and
    intensity: images float32 (n, 1, size, size) in [-1, 1], labels int64 (n,).

    Classes are balanced (counts differ by at most one) and the result depends
    only on ``(n, seed, size)``.
    """
    if n < 0:
        raise DataError(f"make_shapes: n={n} must be >= 0")
    if size < 5:
        raise DataError(f"make_shapes: size={size} must be >= 5 (a shape spans at least 5 pixels)")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_NAMES))
    # Half-extent r: a shape spans 2r+1 pixels, 5 or 7 at size 8.
    r = rng.integers(max(2, round(size * 0.25)), max(2, round(size * 0.4)) + 1, size=n)
    # Centres within a pixel or so of the middle: thin strokes at 8x8 stop
    # overlapping across positions if they move further, and the class is lost.
    j = max(1, size // 8)
    lo = np.maximum(r, size // 2 - j)
    hi = np.minimum(size - 1 - r, size // 2 + j - 1)  # the shape stays on the canvas
    cy = rng.integers(lo, hi + 1)
    cx = rng.integers(lo, hi + 1)
    level = rng.uniform(0.3, 1.0, size=n)
    w = max(1, size // 8)  # stroke width

    yy, xx = np.mgrid[0:size, 0:size]
    dy = yy[None] - cy[:, None, None]  # (n, size, size)
    dx = xx[None] - cx[:, None, None]
    r3 = r[:, None, None]
    ay, ax = np.abs(dy), np.abs(dx)
    inside = np.maximum(ay, ax) <= r3
    dot = 2 * w  # dot side
    # Every class's mask for every sample is only 10 x n x size^2 booleans, and
    # computing them all keeps the code free of per-class indexing.
    masks = np.stack(
        [
            inside,
            inside & (np.maximum(ay, ax) > r3 - w),
            (ax <= r3) & (ay < w),
            (ay <= r3) & (ax < w),
            inside & ((ax < w) | (ay < w)),
            inside & (np.abs(ax - ay) < w),
            inside & (dy >= dx),
            inside & (((dy + r3 < dot) & (dx + r3 < dot)) | ((r3 - dy < dot) & (r3 - dx < dot))),
            inside & ((dx < -r3 + w) | (dy > r3 - w)),
            inside & ((dy < -r3 + w) | (ax < w)),
        ]
    )
    mask = masks[labels, np.arange(n)]
    img = np.where(mask, level[:, None, None], -1.0).astype(np.float32)
    return torch.from_numpy(img).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def random_shift(x: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of (B, C, H, W) by up to ``max_shift`` pixels in each
    direction, filling with the background value -1; returns (B, C, H, W)."""
    b, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    oy, ox = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class ShiftCollate:
    """Collate function that randomly shifts the batch's images.

    Uses the global torch RNG: seed_everything seeds it in the main process and
    the DataLoader seeds each worker from its own generator, so a class (not a
    closure) keeps it picklable for worker processes.
    """

    def __init__(self, max_shift: int = 1):
        self.max_shift = max_shift

    def __call__(self, items):
        x, y = default_collate(items)
        return random_shift(x, self.max_shift), y


