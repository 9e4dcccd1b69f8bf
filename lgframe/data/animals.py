"""The Animal-Shape data set: 10 classes of animal silhouettes, 28x28 grayscale.

The files ship inside the PyPI wheel `animal-shape-mnist` 0.39 (MIT; the optional
extra `lgframe[data]`) as two gzip-compressed numpy pickles. lgframe finds them
through the installed distribution's file list (it never imports the package,
whose loader imports tensorflow), checks each file's SHA-256 against the pinned
value, and unpickles them with an unpickler that rebuilds numpy arrays only.

10,000 images, 1,000 per class; 284 are exact copies of an earlier image (always
with the same label) and are dropped, leaving 9,716. The wheel does not say which
label is which animal; the names below are the ten animals it lists, in
alphabetical order, which is lgframe's reading of labels 0..9.
"""

from __future__ import annotations

import gzip
import importlib.metadata

import numpy as np
import torch
import torch.nn.functional as F

from lgframe.errors import LgframeError
from lgframe.formats.pickles import check_sha256, load_numpy_pickle

DISTRIBUTION = "animal-shape-mnist"
FILES = {  # name inside the wheel -> pinned SHA-256
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
NATIVE_SIZE = 28


def animal_files() -> dict[str, object]:
    """The two data files of the installed wheel (paths), or a sentence naming the extra to install."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LgframeError(f"data.name=animals needs the '{DISTRIBUTION}' wheel: pip install 'lgframe[data]'") from None
    found = {f.name: f.locate() for f in dist.files or () if f.name in FILES}
    missing = sorted(set(FILES) - set(found))
    if missing:
        raise LgframeError(f"the installed '{DISTRIBUTION}' {dist.version} lacks {missing}; lgframe reads version 0.39 "
                           f"(pip install '{DISTRIBUTION}==0.39')")
    return found


def load_animals_arrays(image_size: int = NATIVE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images float32 (N, 1, S, S) in [-1, 1] (background -1) and labels int64 (N,), the
    exact duplicates dropped (first copy kept, original order). S other than 28 is
    an area / bilinear resize of the native images."""
    arrays = {}
    for name, path in animal_files().items():
        check_sha256(path, FILES[name])
        with gzip.open(path, "rb") as f:
            arrays[name] = load_numpy_pickle(f.read(), f"Animal-Shape file '{path}'")
    x, y = arrays["animal_data_version_3.gz"], arrays["animal_label_version_3.gz"]
    if x.shape != (10000, NATIVE_SIZE, NATIVE_SIZE) or y.shape != (10000,):
        raise LgframeError(f"Animal-Shape files hold arrays {x.shape} and {y.shape}, expected (10000, 28, 28) and (10000,)")
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    images = torch.from_numpy(x[keep].astype(np.float32)).unsqueeze(1) / 127.5 - 1
    if image_size != NATIVE_SIZE:
        mode = "area" if image_size < NATIVE_SIZE else "bilinear"
        images = F.interpolate(images, size=(image_size, image_size), mode=mode,
                               **({"align_corners": False} if mode == "bilinear" else {})).clamp(-1, 1)
    return images.contiguous(), torch.from_numpy(y[keep].astype(np.int64))
