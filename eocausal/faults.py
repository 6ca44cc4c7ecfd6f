"""Crash points for the fault tests: inert unless a test switches one on.

The fault tests (tests/faults/) kill an ``eocausal run`` process with SIGKILL at a known place
inside a stage, then re-run it. To make "a known place" deterministic, a stage calls
:func:`crash_point` where a crash is most interesting (chips half stored, embeddings cached but
not yet in the lake, dbt mid-build, estimates computed but not written).

Switched on by two environment variables, both required::

    EOCAUSAL_CRASH_AT=<point>[@<n>]   # pause at the n-th time (default 1st) the point is reached
    EOCAUSAL_CRASH_DIR=<folder>       # where to announce the pause

At that moment the process writes ``<folder>/<point>.reached`` (its pid) and sleeps until the test
kills its process group. Without both variables a call is one dictionary lookup and returns.

Disk faults are simulated the same way: the writers of the working folder (the run lock, the lake,
the chip and embedding caches, the published copy) call :func:`write_point` before they write, and
with ``EOCAUSAL_FS_FAULT=<ERRNO>[@<n>]`` (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``) that
write and every later one fail with that error, as on a disk that filled up (or was read-only) at
the n-th write (default: the first). ``EOCAUSAL_FS_FAULT_PATH=<text>`` limits the fault (and the
count) to paths containing ``text``, e.g. ``cache/chips`` or ``published``.

A rendezvous shows that several processes were alive at the same time (ordering, not timing):
with ``EOCAUSAL_RENDEZVOUS_DIR=<folder>`` and ``EOCAUSAL_RENDEZVOUS_COUNT=<n>``, every process
reaching :func:`rendezvous` writes ``<folder>/<point>.<pid>`` and waits until ``n`` such files exist
(the deployment test: two runs started by the daemon meet at the start of their chips stage).
Waiting is bounded (``EOCAUSAL_RENDEZVOUS_TIMEOUT_S``, default 120 s), then it raises naming who
came. Without both variables a call returns at once.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from pathlib import Path

CRASH_AT_ENV = "EOCAUSAL_CRASH_AT"
CRASH_DIR_ENV = "EOCAUSAL_CRASH_DIR"
FS_FAULT_ENV = "EOCAUSAL_FS_FAULT"
FS_FAULT_PATH_ENV = "EOCAUSAL_FS_FAULT_PATH"
RENDEZVOUS_DIR_ENV = "EOCAUSAL_RENDEZVOUS_DIR"
RENDEZVOUS_COUNT_ENV = "EOCAUSAL_RENDEZVOUS_COUNT"
RENDEZVOUS_TIMEOUT_ENV = "EOCAUSAL_RENDEZVOUS_TIMEOUT_S"
_FS_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS", "EACCES")
# If nobody kills the paused process, give up rather than hang a pipeline forever.
_MAX_PAUSE_S = 600.0

_hits: Counter[str] = Counter()
_writes: Counter[str] = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_AT_ENV)
    if not spec or not os.environ.get(CRASH_DIR_ENV):
        return None
    point, _, nth = spec.partition("@")
    return point, int(nth) if nth else 1


def crash_point(point: str) -> None:
    """Pause here (to be killed) when the crash tests ask for this point; otherwise do nothing."""
    target = _target()
    if target is None or target[0] != point:
        return
    _hits[point] += 1
    if _hits[point] != target[1]:
        return
    folder = Path(os.environ[CRASH_DIR_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{point}.reached"
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    deadline = time.monotonic() + _MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
    raise RuntimeError(f"crash point {point!r} was reached but the process was not killed")


def _fs_fault() -> tuple[int, int] | None:
    spec = os.environ.get(FS_FAULT_ENV)
    if not spec:
        return None
    name, _, nth = spec.strip().partition("@")
    if name not in _FS_ERRNOS:
        raise ValueError(f"{FS_FAULT_ENV}={spec!r}: the error must be one of {list(_FS_ERRNOS)}")
    return getattr(errno, name), int(nth) if nth else 1


def write_point(path: str | os.PathLike) -> None:
    """Fail this write with the injected disk error when a test asks for one; otherwise do nothing."""
    fault = _fs_fault()
    if fault is None:
        return
    only = os.environ.get(FS_FAULT_PATH_ENV, "")
    if only and only not in str(path):
        return
    code, nth = fault
    _writes[only] += 1
    if _writes[only] >= nth:
        raise OSError(code, os.strerror(code), str(path))


def rendezvous(point: str) -> None:
    """Wait here until the asked number of processes have reached this point, when a test asks
    (see the module docstring); otherwise do nothing. Raises RuntimeError when the others do not
    come in time."""
    folder, count = os.environ.get(RENDEZVOUS_DIR_ENV), os.environ.get(RENDEZVOUS_COUNT_ENV)
    if not folder or not count:
        return
    folder_path, wanted = Path(folder), int(count)
    folder_path.mkdir(parents=True, exist_ok=True)
    mine = folder_path / f"{point}.{os.getpid()}"
    tmp = folder_path / f".{point}.{os.getpid()}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, mine)
    timeout = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV) or 120.0)
    deadline = time.monotonic() + timeout
    while True:
        came = sorted(p.name for p in folder_path.glob(f"{point}.*") if not p.name.startswith("."))
        if len(came) >= wanted:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"rendezvous {point!r}: {len(came)} of {wanted} processes came within {timeout:.0f} s "
                               f"({', '.join(came)} in {folder_path}); the others never started or are queued")
        time.sleep(0.2)
