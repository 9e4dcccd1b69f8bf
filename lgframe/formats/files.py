"""Files: atomic writes, outputs that never destroy what a user has, safetensors I/O.

Everything lgframe writes goes to a temporary file in the target directory, is
flushed and fsynced, then renamed over the target, so a crash mid-write leaves
the previous file intact; files get the mode a plain open() would (0666 less the
umask). `check_output` refuses an output that exists (unless overwriting was
asked for) or that is one of the command's inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lgframe.errors import LgframeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it over `path` on success.
    The file gets the mode a plain open() would give it (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it is renamed to `path`,
    so a failed export never leaves a half-written folder behind. An existing
    `path` is refused unless it is an empty folder, or `replace=True` (the CLI's
    --overwrite): then the old folder is moved aside, the new one renamed in, and
    the old one removed only after that."""

    path = Path(path)
    if not path.name or path.resolve() == Path.cwd().resolve() or path.resolve() in Path.cwd().resolve().parents:
        raise LgframeError(f"output folder '{path}' is the current folder or one above it; give a new folder name.")
    if path.exists() and not path.is_dir():
        raise LgframeError(f"output '{path}' is a file; give a folder path (the file is left as it is).")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise LgframeError(f"output folder '{path}' exists and is not empty; choose another --out, or pass "
                           "--overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out: str | os.PathLike, inputs: list = (), overwrite: bool = False, folder: bool = False,
                 what: str = "--out") -> Path:
    """Refuse an output that would destroy what the user has: an existing file or
    non-empty folder (unless `overwrite`), the current folder, or any of the
    command's `inputs` (a file, or a folder holding one), even with `overwrite`."""
    out = Path(out)
    if not str(out) or not out.name or out.resolve() == Path.cwd().resolve():
        raise LgframeError(f"{what} '{out}' is the current folder; give a new file or folder name.")
    r = out.resolve()
    for i in inputs:
        if i is None:
            continue
        ip = Path(i).resolve()
        if r == ip or r in ip.parents or (folder and ip in r.parents):
            raise LgframeError(f"{what} '{out}' is an input of this command ('{i}'); writing there would destroy it. "
                               "Give another output path.")
    if out.is_dir():
        if not folder:
            raise LgframeError(f"{what} '{out}' is a folder; give a file path.")
        if any(out.iterdir()) and not overwrite:
            raise LgframeError(f"{what} '{out}' is a folder that is not empty; choose another path, or pass "
                               "--overwrite to replace it.")
    elif out.exists():
        if folder:
            raise LgframeError(f"{what} '{out}' is a file; give a folder path (the file is left as it is).")
        if not overwrite:
            raise LgframeError(f"{what} '{out}' exists; choose another path, or pass --overwrite to replace it.")
    return out


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise LgframeError(f"{what} '{p}' does not exist (or is not a file).")
    return p


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = require_file(path, what)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(p)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise LgframeError(f"{what} '{p}' is not a readable safetensors file ({e}).") from None


