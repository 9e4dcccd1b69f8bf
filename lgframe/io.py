"""Files: atomic writes, model files (safetensors + config), checkpoints loaded safely.

Everything lgframe writes goes to a temporary file in the target directory,
is flushed and fsynced, then renamed over the target, so a crash mid-write
leaves the previous file intact. Nothing is ever unpickled: model files and
learngenes are safetensors; Lightning checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lgframe.errors import LgframeError

MODEL_FORMAT = "lgframe.model"


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
    import shutil

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
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(p)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise LgframeError(f"{what} '{p}' is not a readable safetensors file ({e}).") from None


TORCH_ADVICE = re.compile(r"\s*(Please file an issue|In PyTorch 2\.6|Re-running `torch\.load`|WeightsUnpickler error|Check the documentation|\(1\) |\(2\) |Alternatively)", re.S)


def _torch_load_reason(e: BaseException) -> str:
    """Why torch refused a file, in a sentence, without its advice to re-run with
    weights_only=False (lgframe never does: that would run the file's code)."""
    text = str(e).strip()
    if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it asks for '{m.group(1)}', which is code or a class, not tensor data"
    if re.search(r"Unsupported operand \d+", text):
        return "it is a pickle stream torch's safe loader does not accept (not a torch checkpoint)"
    first = TORCH_ADVICE.split(text)[0].strip().splitlines()
    return (first[0] if first else type(e).__name__)[:300]


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """A Lightning checkpoint or any torch file, loaded with weights_only=True: only
    tensors and plain containers are rebuilt, and a file that asks for anything else
    (code, classes) is refused without running it."""
    p = require_file(path, what)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise LgframeError(
            f"{what} '{p}' could not be loaded safely (weights_only=True): {_torch_load_reason(e)}. lgframe reads only tensors and plain "
            "values from torch files (weights_only=True) and never runs code from a file; it reads the .ckpt files it "
            "wrote, .safetensors model files and fsdp checkpoint folders."
        ) from None
    if not isinstance(obj, dict):
        raise LgframeError(f"{what} '{p}' holds a {type(obj).__name__}, not a checkpoint (a mapping of names to values).")
    return obj


# ------------------------------------------------------------------ distributed checkpoints
# A distributed-checkpoint (DCP) folder's `.metadata` is a pickle. torch reads it with
# plain pickle.load, so a crafted folder runs code: lgframe reads it with this
# allow-list instead (what torch.distributed.checkpoint itself writes), and reads
# non-tensor items with weights_only=True (torch's default planner does not).
DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "MetadataIndex", "TensorProperties", "ChunkStorageMetadata", "TensorStorageMetadata",
              "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not a distributed-checkpoint metadata type")


def read_dcp_metadata(path: str | os.PathLike):
    """The `.metadata` of a distributed-checkpoint folder, through the allow-list above."""
    p = Path(path) / ".metadata"
    if not p.is_file():
        raise LgframeError(f"'{path}' is a directory but not a distributed checkpoint (no .metadata file).")
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(p, "rb") as f:
            md = _DcpMetadataUnpickler(f).load()
    except Exception as e:
        raise LgframeError(
            f"distributed checkpoint '{path}': its .metadata was refused ({e}). lgframe reads only the metadata types "
            "torch.distributed.checkpoint writes and never runs code from a file."
        ) from None
    if not isinstance(md, Metadata):
        raise LgframeError(f"distributed checkpoint '{path}': .metadata holds a {type(md).__name__}, not DCP Metadata.")
    for info in (md.storage_data or {}).values():
        rel = Path(getattr(info, "relative_path", ""))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
            raise LgframeError(f"distributed checkpoint '{path}': its .metadata points outside the folder ('{rel}').")
    return md


def _safe_dcp_classes():
    """A FileSystemReader whose metadata goes through the allow-list, and load
    planners that read byte items with weights_only=True."""
    import io as _io

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise LgframeError("per-rank distributed-checkpoint metadata is not supported")
            md = read_dcp_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    def load_bytes(self, read_item, value: _io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    Planner = type("SafeLoadPlanner", (DefaultLoadPlanner,), {"load_bytes": load_bytes})
    EmptyPlanner = type("SafeEmptyLoadPlanner", (_EmptyStateDictLoadPlanner,), {"load_bytes": load_bytes})
    return SafeReader, Planner, EmptyPlanner


def dcp_load(state: dict, path: str | os.PathLike, no_dist: bool = False) -> None:
    """torch.distributed.checkpoint.load into `state` (sharded tensors in place), safely."""
    import torch.distributed.checkpoint as dcp

    reader, planner, _ = _safe_dcp_classes()
    dcp.load(state, storage_reader=reader(str(path)), planner=planner(), no_dist=no_dist)


def load_distributed_checkpoint(path: Path) -> dict:
    """A distributed-checkpoint folder (written under trainer.strategy=fsdp) as one
    checkpoint dict: Lightning's meta.pt plus the full tensors of the model (the
    optimizer shards are not read). No pickle from the folder is trusted."""
    path = Path(path)
    if not (path / "meta.pt").is_file():
        raise LgframeError(f"'{path}' is a directory but not an lgframe distributed checkpoint (no meta.pt).")
    read_dcp_metadata(path)
    ckpt = load_checkpoint(path / "meta.pt")
    # What torch's own dcp_to_torch_save does, with the safe reader and planner (dcp.load
    # would not fill an empty dict: it copies back only Stateful entries).
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader, _, empty = _safe_dcp_classes()
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=reader(str(path)), planner=empty(keys={"state_dict"}), no_dist=True)
    except LgframeError:
        raise
    except BaseException as e:  # CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        inner = dcp_inner_error(e)
        if isinstance(inner, LgframeError):
            raise inner from None
        raise LgframeError(f"distributed checkpoint '{path}' could not be read: {_torch_load_reason(inner)}") from None
    ckpt["state_dict"] = state.get("state_dict", {})
    return ckpt


def dcp_inner_error(e: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (else `e`)."""
    failures = getattr(e, "failures", None)
    if not failures:
        return e
    inner = next(iter(failures.values()))
    return inner[0] if isinstance(inner, tuple) else inner


def atomic_checkpoint_io():
    """Lightning CheckpointIO that writes each .ckpt beside its target, fsyncs and
    renames (Lightning's own goes through fsspec, whose local transaction stages
    the file in the system temp dir and then moves it: a copy across devices)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            try:
                with atomic_path(path) as tmp:
                    torch.save(checkpoint, tmp)
            except RuntimeError as e:  # torch's zip writer: "enforce fail at inline_container.cc ... file write failed"
                import shutil

                free = shutil.disk_usage(Path(path).parent).free
                raise LgframeError(
                    f"checkpoint '{path}' could not be written ({str(e).splitlines()[0][:120]}); is the disk full? "
                    f"{free / 2**20:,.0f} MiB are free there. The previous checkpoint, if any, is kept; free some space "
                    "and continue with resume=auto."
                ) from None

    return AtomicCheckpointIO()


# ------------------------------------------------------------------ model state
def model_meta(model: nn.Module) -> dict:
    """What is needed to rebuild `model`: its config, its constraint, frozen params."""
    from lgframe.constraint import attached_constraint

    spec = attached_constraint(model)
    return {
        "format": MODEL_FORMAT,
        "model": model.config.to_dict(),
        "constraint": spec.to_dict() if spec is not None else None,
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def check_model_meta(meta: Any, where) -> None:
    """The lgframe record of a model file or checkpoint: a missing or malformed key is named."""
    if not isinstance(meta, dict):
        raise LgframeError(f"'{where}': its lgframe record is a {type(meta).__name__}, not a mapping.")
    if meta.get("format", MODEL_FORMAT) != MODEL_FORMAT:
        raise LgframeError(f"'{where}': lgframe record of format {meta.get('format')!r}; this lgframe reads {MODEL_FORMAT!r}.")
    if not isinstance(meta.get("model"), dict) or "family" not in meta["model"]:
        raise LgframeError(f"'{where}': its lgframe record has no model config ('model' with a 'family'); the file was "
                           "changed or not written by lgframe.")
    c = meta.get("constraint")
    if c is not None and not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("options", {}), dict)):
        raise LgframeError(f"'{where}': its lgframe record's 'constraint' must be null or {{name, options}}, not {c!r}.")
    if not isinstance(meta.get("frozen", []), list):
        raise LgframeError(f"'{where}': its lgframe record's 'frozen' must be a list of parameter names.")


def build_model(meta: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model (with its constraint attached, if any) and load `state`."""
    from lgframe.constraint import get_constraint
    from lgframe.models import model_from_config

    model = model_from_config(meta["model"])
    if meta.get("constraint"):
        get_constraint(meta["constraint"]).attach(model, init="random")
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise LgframeError(f"weights do not fit the model described by their config: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise LgframeError(
                f"weights do not fit the model described by their config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    frozen = set(meta.get("frozen", []))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return model


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    meta = model_meta(model) | (extra or {})
    save_tensors(path, dict(model.state_dict()), {"lgframe": json.dumps(meta)})


CONSOLIDATED = "model.safetensors"  # what a sharded run writes into its run folder at its end


def consolidated_model(folder: Path) -> Path | None:
    """The run folder's consolidated model file when it was written from this very
    distributed checkpoint (same step): reading it needs no gather and no pickle."""
    candidate = folder.parent.parent / CONSOLIDATED
    if folder.parent.name != "checkpoints" or not candidate.is_file() or not (folder / "meta.pt").is_file():
        return None
    try:
        _, raw = read_safetensors(candidate, "consolidated model")
        step = json.loads(raw.get("lgframe", "{}")).get("global_step")
        return candidate if step is not None and step == load_checkpoint(folder / "meta.pt").get("global_step") else None
    except (LgframeError, ValueError):
        return None


def load_model(path: str | os.PathLike, ema: bool = True) -> tuple[nn.Module, dict]:
    """A model from a `.safetensors` model file or a Lightning `.ckpt` written by lgframe.
    Returns (model, meta). From a checkpoint, the EMA weights are used when present."""
    p = Path(path)
    if p.suffix == ".safetensors":
        tensors, raw = read_safetensors(p, "model file")
        if "lgframe" not in raw:
            raise LgframeError(
                f"'{p}' is a safetensors file without an lgframe model config; if it is a learngene, "
                "use `lgframe descend` on it."
            )
        try:
            meta = json.loads(raw["lgframe"])
        except json.JSONDecodeError as e:
            raise LgframeError(f"model file '{p}': its lgframe config is not valid JSON ({e}).") from None
        check_model_meta(meta, p)
        return build_model(meta, tensors), meta
    if p.is_dir():
        consolidated = consolidated_model(p)
        if consolidated is not None:
            return load_model(consolidated)
        ckpt = load_distributed_checkpoint(p)
    else:
        ckpt = load_checkpoint(p)
    if "lgframe" not in ckpt:
        raise LgframeError(f"checkpoint '{p}' was not written by lgframe (no 'lgframe' entry).")
    meta = dict(ckpt["lgframe"])
    check_model_meta(meta, p)
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    if not isinstance(ckpt.get(key), dict):
        raise LgframeError(f"checkpoint '{p}' has no '{key}' mapping of weights.")
    recipe = ckpt.get("hyper_parameters", {}).get("recipe")
    if recipe is not None:
        meta["recipe"] = recipe
    state = {k[len("model."):]: v for k, v in ckpt[key].items() if k.startswith("model.")}
    return build_model(meta, state), meta
