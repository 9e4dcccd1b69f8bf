"""Run folders: their names, one writer at a time, and cleanup after a kill.

A run folder (`out_dir/name`) is written by one training process tree at a time.
`RunLock` holds `lgframe.lock` in it, a small JSON file naming the host, the PID
and the start time of the writer; a second writer fails with a sentence naming
the running one. A lock whose process is gone (killed, the machine rebooted) is
stale: on the same host it is detected and replaced, with a log line; from
another host it cannot be checked, so the message says which file to remove.

Lightning's DDP launcher re-runs the command in child processes: they inherit
`LGFRAME_RUN_LOCK` (the holder's PID) and do not take the lock again. Under
torchrun or SLURM, where every rank starts on its own, only global rank 0 takes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from lgframe.errors import LgframeError

log = logging.getLogger("lgframe")

LOCK_NAME = "lgframe.lock"
LOCK_ENV = "LGFRAME_RUN_LOCK"


def unique_dir(base: Path) -> Path:
    """`base`, or `base-N` with the first N that does not exist."""
    if not base.exists():
        return base
    i = 1
    while (base.parent / f"{base.name}-{i}").exists():
        i += 1
    return base.parent / f"{base.name}-{i}"


def resolve_run_dir(base: Path, multi_process: bool) -> Path:
    """The run directory: `base`, or `base-N` if it exists. Every process of a
    multi-process run must agree: Lightning's DDP launcher re-runs the command
    in child processes, which inherit LGFRAME_RUN_DIR from the launching one;
    under torchrun (WORLD_SIZE) or SLURM (SLURM_NTASKS) all use `base` as is."""
    if not multi_process:
        return unique_dir(base)
    if "LGFRAME_RUN_DIR" in os.environ:
        return Path(os.environ["LGFRAME_RUN_DIR"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return base  # torchrun / SLURM started every rank: no launcher to agree with
    run_dir = unique_dir(base)
    os.environ["LGFRAME_RUN_DIR"] = str(run_dir)
    return run_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _independent_rank() -> int:
    """This process's global rank when every rank was started on its own (torchrun, SLURM)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
            return int(os.environ[key])
    return 0


def lock_is_live(path: Path) -> bool:
    """Whether a run-folder lock file is held by a running process (another host's: assumed so)."""
    try:
        other = json.loads(Path(path).read_text())
        host, pid = other["host"], int(other["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return host != socket.gethostname() or _alive(pid)


class RunLock:
    """Context manager: hold the run folder's lock for the life of a training run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def __enter__(self) -> RunLock:
        if os.environ.get(LOCK_ENV) or _independent_rank() != 0:
            return self  # a child of the holder (DDP launcher), or a rank other than 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            os.environ[LOCK_ENV] = str(os.getpid())
            return self
        raise LgframeError(f"could not take the run-folder lock '{self.path}'")

    def _handle_existing(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            host, pid = other["host"], int(other["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("removed an unreadable run-folder lock %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _alive(pid):
            log.warning("run folder %s: removed a stale lock of process %d (no longer running)", self.path.parent, pid)
            self.path.unlink(missing_ok=True)
            return
        where = "this machine" if host == socket.gethostname() else f"host {host}"
        raise LgframeError(
            f"run folder '{self.path.parent}' is being written by process {pid} on {where} (started "
            f"{other.get('started', '?')}); wait for it to finish or stop it. If that process is gone, remove "
            f"'{self.path}'."
        )

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            os.environ.pop(LOCK_ENV, None)
            self.held = False


def remove_partial_files(folder: Path) -> list[str]:
    """`.NAME.*.tmp` files an atomic write left when it was killed."""
    done = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink()
                done.append(p.name)
    return done
