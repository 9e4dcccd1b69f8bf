"""Data shipped as a pickle, read without trusting it: a pinned SHA-256 first, then an
unpickler that rebuilds numpy arrays and nothing else (never plain `pickle.load`)."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

from lgframe.errors import LgframeError

# numpy's array reconstruction, under its numpy 1 and numpy 2 module names
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class NumpyUnpickler(pickle.Unpickler):
    """Allows only what a pickled numpy array needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of a numpy array")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise LgframeError(f"'{path}' has SHA-256 {got}, but lgframe pins {expected} for it; the file was changed or "
                           "is another version. Reinstall the package it came from.")


def load_numpy_pickle(data: bytes, what: str) -> np.ndarray:
    """A numpy array from pickle bytes, through `NumpyUnpickler`."""
    try:
        obj = NumpyUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise LgframeError(f"{what}: refused to unpickle it ({e}); lgframe reads only numpy arrays from pickles") from None
    if not isinstance(obj, np.ndarray):
        raise LgframeError(f"{what}: the pickle holds a {type(obj).__name__}, not a numpy array")
    return obj
