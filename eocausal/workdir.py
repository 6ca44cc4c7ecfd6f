"""One `eocausal run` at a time per working folder.

Two runs on one working folder would interleave their lake writes and dbt builds (the warehouse
pool serialises writers only inside one Dagster instance). A run holds an exclusive ``flock`` on
``<workdir>/.eocausal-run.lock`` for its whole length; a second run finds it taken and stops with
a message naming the holder, before it touches anything. The runs of a study's tiles (its period x
tile partitions) write only their own tiles' files and the content-keyed chip store: they share
``.eocausal-tiles.lock`` with each other instead, and `eocausal run` holds both locks (:data:`ROLES`).
The kernel releases a lock when its holder exits, killed or not, so a crashed run never leaves the
folder locked.

A working folder that cannot be used — a file where the folder should be, a read-only folder, a
full disk — stops the run with :class:`WorkdirUnusable`, one line that names the folder (or the
file in its way) and what to do, before anything is written; a disk that fills up during the run
is named the same way (:func:`disk_problem`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from eocausal.faults import write_point

LOCK_NAME = ".eocausal-run.lock"
TILES_LOCK_NAME = ".eocausal-tiles.lock"
# The working folders this process holds (resolved): a Dagster run that `eocausal run` executes in
# this process finds its folder held by its own process and does not ask for it again.
_HELD_HERE: set[Path] = set()


class WorkdirBusy(RuntimeError):
    """Another run holds the working folder."""


class WorkdirUnusable(RuntimeError):
    """The working folder cannot be used: not a folder, not writable, or out of space."""


# What an OSError while writing into the working folder means, by errno.
_DISK_PROBLEMS = {
    errno.ENOSPC: "is out of space",
    errno.EDQUOT: "is over its disk quota",
    errno.EROFS: "is read-only (a read-only file system)",
    errno.EACCES: "is read-only (permission denied)",
    errno.EPERM: "is read-only (operation not permitted)",
}
_ADVICE = {
    errno.ENOSPC: "free some space or give the run another folder with --workdir",
    errno.EDQUOT: "free some space or give the run another folder with --workdir",
}
_READ_ONLY_ADVICE = "make it writable or give the run another folder with --workdir"
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
_FILE_IN_TEXT = re.compile(r"\[errno \d+\] [^:\n]*: '([^'\n]+)'", re.IGNORECASE)
# A full disk as other code says it without an errno: SQLite (the Dagster instance), DuckDB, dbt.
_SPACE_IN_TEXT = re.compile(r"no space left on device|database or disk is full|disk quota exceeded", re.IGNORECASE)
# A bare I/O error (SQLite says "disk I/O error" when a write finds the disk full) is a full disk
# only when the working folder's file system is in fact (nearly) full.
_IO_ERROR_IN_TEXT = re.compile(r"disk i/o error|\bio error\b|input/output error", re.IGNORECASE)
NEARLY_FULL_BYTES = 64 * 2**20


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_problem(workdir: Path, error: BaseException | str, path: str | os.PathLike | None = None,
                 doing: str | None = None) -> str | None:
    """One line saying that ``workdir`` is out of space or read-only, if ``error`` (an OSError, or
    the text of one from a step, another process or a library) says so; else None.

    It names ``path`` (by default the error's file name) or says what failed (``doing``). A
    permission error on a file outside the working folder (an input the run reads) is not the
    working folder's problem: None.
    """
    code = getattr(error, "errno", None) if isinstance(error, BaseException) else None
    if path is None and isinstance(error, BaseException):
        path = getattr(error, "filename", None)
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(error))
        code = int(found.group(1)) if found else None
        named = _FILE_IN_TEXT.search(str(error))
        if path is None and named:
            path = named.group(1)
        if code is None and _SPACE_IN_TEXT.search(str(error)):
            code = errno.EDQUOT if "quota" in str(error).lower() else errno.ENOSPC
        if code is None and _IO_ERROR_IN_TEXT.search(str(error)) and _nearly_full(Path(workdir)):
            code = errno.ENOSPC
    if code not in _DISK_PROBLEMS:
        return None
    if code not in _SPACE_ERRNOS and not doing:
        inside = path is not None and Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(workdir)))
        if not inside:
            return None
    where = f": {doing}" if doing else f": writing {path} failed" if path else ""
    return (f"working folder {workdir} {_DISK_PROBLEMS[code]}{where} "
            f"({os.strerror(code)}); {_ADVICE.get(code, _READ_ONLY_ADVICE)}")


def prepare_workdir(workdir: Path) -> Path:
    """Create ``workdir`` if needed, or raise :class:`WorkdirUnusable` saying why it cannot be."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirUnusable(
            f"working folder {workdir} is a file, not a folder: give the run a folder with --workdir "
            "(or move the file away)"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next((p for p in workdir.parents if p.exists() and not p.is_dir()), workdir)
        raise WorkdirUnusable(
            f"working folder {workdir} cannot be created: {in_the_way} is a file, not a folder; "
            "give the run another folder with --workdir"
        ) from None
    except OSError as exc:
        parent = next((p for p in workdir.parents if p.exists()), workdir.parent)
        problem = disk_problem(parent, exc, doing=f"the working folder {workdir} cannot be created in it")
        raise WorkdirUnusable(problem.replace("working folder", "folder", 1) if problem
                              else f"working folder {workdir} cannot be created: {exc}") from None
    # A folder that exists may still refuse new files (read-only, full): find out before any work.
    probe = workdir / f".eocausal-probe.{os.getpid()}"
    try:
        write_point(probe)  # fault tests: a read-only or full disk
        with open(probe, "wb") as fh:
            fh.write(b"probe\n")
    except OSError as exc:
        raise WorkdirUnusable(disk_problem(workdir, exc, doing="a new file cannot be created in it")
                              or f"working folder {workdir}: cannot write {probe}: {exc}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return workdir


# Set by `eocausal run` in the worker processes it runs a wave's tiles in: the folder its own
# process holds for them (role "all"), which the workers then do not ask for again.
HELD_BY_PARENT_ENV = "EOCAUSAL_WORKDIR_HELD_BY_PARENT"


def held_by_this_process(workdir: str | os.PathLike) -> bool:
    """Whether this process holds ``workdir`` (inside :func:`exclusive_workdir`), or the
    `eocausal run` that started it as a tile worker does (:data:`HELD_BY_PARENT_ENV`)."""
    path = Path(workdir).resolve()
    return path in _HELD_HERE or os.environ.get(HELD_BY_PARENT_ENV) == str(path)


# What each kind of run holds: a study-job run (it writes the lake's period tables and the
# warehouse) the run lock alone; a tile's run (its tile's files and the content-keyed chip store)
# the tiles lock, shared with the study's other tile runs, so tile runs and study-job runs of one
# study run side by side (the run queue keeps study-job runs to one at a time); `eocausal run`,
# which runs every kind in its process, both locks exclusively.
ROLES = {
    "run": ((LOCK_NAME, fcntl.LOCK_EX),),
    "tile": ((TILES_LOCK_NAME, fcntl.LOCK_SH),),
    "all": ((LOCK_NAME, fcntl.LOCK_EX), (TILES_LOCK_NAME, fcntl.LOCK_EX)),
}


@contextmanager
def exclusive_workdir(workdir: Path, role: str = "run") -> Iterator[Path]:
    """Hold ``workdir`` for this process in ``role`` (see :data:`ROLES` and the module docstring);
    raises :class:`WorkdirBusy`, or :class:`WorkdirUnusable` when the folder cannot be made or written."""
    workdir = prepare_workdir(workdir)
    with ExitStack() as stack:
        paths = [stack.enter_context(_locked(workdir, name, mode)) for name, mode in ROLES[role]]
        held = workdir.resolve()
        _HELD_HERE.add(held)
        try:
            yield paths[0]
        finally:
            _HELD_HERE.discard(held)


@contextmanager
def _locked(workdir: Path, name: str, mode: int) -> Iterator[Path]:
    path = workdir / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        message = disk_problem(workdir, exc, path) or f"working folder {workdir}: cannot open {path}: {exc}"
        raise WorkdirUnusable(message) from None
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise WorkdirBusy(
                f"another eocausal run ({holder}) is using the working folder {workdir}: "
                "wait for it to finish, or give this run its own working folder (--workdir)"
            ) from None
        try:
            who = "a tile run, e.g. " if mode == fcntl.LOCK_SH else ""
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{who}pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        except OSError as exc:
            raise WorkdirUnusable(disk_problem(workdir, exc, path) or f"working folder {workdir}: {exc}") from None
        yield path
    finally:
        os.close(fd)  # releases the lock
