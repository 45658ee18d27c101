"""A run among other processes: its workers end with their launcher, and one run at a time owns an output_dir.

Both guard the output_dir. A worker left training after its `accelerate launch` was killed keeps appending to
metrics.jsonl and writing checkpoints while the restarted run does the same; two runs started on one folder
interleave their records and overwrite each other's checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The parent when dit.train was first imported (early in `dit train`): a launcher that dies before
# die_with_launcher runs leaves us reparented, which only a comparison with this pid reveals.
_PARENT_AT_IMPORT = os.getppid()


def die_with_launcher() -> None:
    """Have the kernel send this worker SIGTERM when its launcher dies (Linux; elsewhere a no-op).

    Only under a launcher (torchrun and `accelerate launch` set LOCAL_RANK): a plain `dit train` must survive
    its shell (nohup). The signal comes when the thread that started us ends; torchrun starts its workers from
    its main thread."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # best effort: a kernel without prctl leaves us as we were
    if os.getppid() != _PARENT_AT_IMPORT:  # the launcher died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def lock_output_dir(folder: Path) -> int:
    """An exclusive flock on folder/.lock, held until the returned descriptor is closed (or the process dies,
    so a killed run never leaves it held). The holder's pid is written into it for the next run's error."""
    path = Path(folder) / LOCK_FILE
    try:  # O_NOFOLLOW: a link planted at .lock must not make us create or lock a file elsewhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; remove it (dit train keeps its lock there)") from None
        raise
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"output_dir {folder} is in use by another dit train run (pid {holder}); wait for it "
                         f"or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def exclusive_output_dir(folder: Path, is_main: bool, device=None,
                         prepare: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the output_dir's lock for the body. Only the main process takes it (creating the folder), then runs
    `prepare`; every rank learns the outcome, so all raise together instead of the others waiting in a
    collective for a main process that has failed."""
    fd, error = None, None
    if is_main:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd = lock_output_dir(folder)
            if prepare is not None:
                prepare()
        except (OSError, ValueError) as e:
            error = e
    message = _from_main(None if error is None else str(error), device)
    try:
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _from_main(value: str | None, device=None) -> str | None:
    """The main process's value on every rank: a collective, so every rank calls it (rank 0 is accelerate's main)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
