"""Atomic file writes: the one way eocausal replaces a file.

Write to a temporary file in the target's folder, then ``os.replace`` it onto the target, so a
reader (or a run killed midway) sees the old file or the new one, never half of one. On any error
the temporary file is removed and the target is left as it was. Files are made readable like
ordinary files (``0o644``; ``mkstemp`` would leave them private).

The chip store passes its own temp-name ``prefix`` (the writer's host and pid, so a later run can
sweep a dead writer's leftovers). The DuckDB swap in :mod:`eocausal.warehouse` keeps its own code:
its temp file must not exist before DuckDB creates it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int = FILE_MODE,
                prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces
    ``path``, otherwise it is removed. The folder is created if needed. ``prefix``: the temp
    file's name prefix (default ``.<name>.``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name[:24]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, default: Callable | None = None, **dump_options: Any) -> Path:
    return write_text(path, json.dumps(obj, default=default, **dump_options))


def write_with(path: str | os.PathLike, write: Callable[[Any], None], suffix: str = ".tmp") -> Path:
    """``write(fh)`` into a binary file handle, atomically (np.save, pickle.dump, ...)."""
    with atomic_path(path, suffix=suffix) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
    return Path(path)
