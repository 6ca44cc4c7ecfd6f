"""One `eocausal run` at a time per working folder.

Two runs on one working folder would interleave their lake writes and dbt builds (the warehouse
pool serialises writers only inside one Dagster instance). A run holds an exclusive ``flock`` on
``<workdir>/.eocausal-run.lock`` for its whole length; a second run finds it taken and stops with
a message naming the holder, before it touches anything. The kernel releases the lock when the
holder exits, killed or not, so a crashed run never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".eocausal-run.lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the working folder."""


@contextmanager
def exclusive_workdir(workdir: Path) -> Iterator[Path]:
    """Hold ``workdir`` for this process (see the module docstring); raises :class:`WorkdirBusy`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise WorkdirBusy(
                f"another eocausal run ({holder}) is using the working folder {workdir}: "
                "wait for it to finish, or give this run its own working folder (--workdir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
