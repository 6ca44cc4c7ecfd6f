"""The DuckDB warehouse as SQL consumers see it: a published read-only copy.

dbt writes ``warehouse.duckdb``; after a successful refresh, :func:`publish` checkpoints it and
swaps a copy into place with ``os.replace``. A consumer that opened the old copy keeps reading it;
the next one opens the new copy; nobody sees a half-written state or blocks the writer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import duckdb
import pandas as pd


def publish(warehouse_path: Path, published_path: Path) -> Path:
    warehouse_path, published_path = Path(warehouse_path), Path(published_path)
    if not warehouse_path.exists():
        raise FileNotFoundError(f"no warehouse to publish at {warehouse_path}")
    # Fold the write-ahead log into the file so the copy is complete on its own.
    with duckdb.connect(str(warehouse_path)) as con:
        con.execute("CHECKPOINT")
    published_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".publish.", suffix=".duckdb", dir=published_path.parent)
    os.close(fd)
    try:
        shutil.copyfile(warehouse_path, tmp)
        os.replace(tmp, published_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return published_path


def query(db_path: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    """Run a read-only query on a warehouse file (short-lived connection)."""
    with duckdb.connect(str(db_path), read_only=True) as con:
        return con.execute(sql, params or []).df()
