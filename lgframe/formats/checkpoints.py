"""Torch checkpoints and distributed-checkpoint folders, read without running code.

A torch file (a Lightning .ckpt, a .pt, a .bin) loads with `weights_only=True`:
only tensors and plain containers are rebuilt, and a file that asks for anything
else is refused. A distributed-checkpoint (DCP) folder's `.metadata` is a
pickle that torch reads with plain `pickle.load`; lgframe reads it with an
allow-list of what torch.distributed.checkpoint writes, and reads its byte
items with `weights_only=True` (torch's default planner does not).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what torch's DCP-to-file converter uses

from lgframe.errors import LgframeError
from lgframe.formats.files import require_file

TORCH_ADVICE = re.compile(r"\s*(Please file an issue|In PyTorch 2\.6|Re-running `torch\.load`|WeightsUnpickler error|Check the documentation|\(1\) |\(2\) |Alternatively)", re.S)


def _torch_load_reason(e: BaseException) -> str:
    """Why torch refused a file, in a sentence, without its advice to re-run with
    the weights-only guard off (lgframe never does: that would run the file's code)."""
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


    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise LgframeError("per-rank distributed-checkpoint metadata is not supported")
            md = read_dcp_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    Planner = type("SafeLoadPlanner", (DefaultLoadPlanner,), {"load_bytes": load_bytes})
    EmptyPlanner = type("SafeEmptyLoadPlanner", (_EmptyStateDictLoadPlanner,), {"load_bytes": load_bytes})
    return SafeReader, Planner, EmptyPlanner


def dcp_load(state: dict, path: str | os.PathLike, no_dist: bool = False) -> None:
    """torch.distributed.checkpoint.load into `state` (sharded tensors in place), safely."""
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
    # What torch's own DCP-to-file converter does, with the safe reader and planner (dcp.load
    # would not fill an empty dict: it copies back only Stateful entries).
    reader, _, empty = _safe_dcp_classes()
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=reader(str(path)), planner=empty(keys={"state_dict", "current_model_state"}),
                         no_dist=True)
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
    if "current_model_state" in state:  # written with ShardedEMA: state_dict is the average
        ckpt["current_model_state"] = state["current_model_state"]
    return ckpt


def dcp_inner_error(e: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (else `e`)."""
    failures = getattr(e, "failures", None)
    if not failures:
        return e
    inner = next(iter(failures.values()))
    return inner[0] if isinstance(inner, tuple) else inner


