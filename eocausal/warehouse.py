"""The DuckDB warehouse as SQL consumers see it: a published read-only copy.

dbt writes ``warehouse.duckdb``; after a successful refresh, :func:`publish` checkpoints it and
swaps a copy into place with ``os.replace``. A consumer that opened the old copy keeps reading it;
the next one opens the new copy; nobody sees a half-written state or blocks the writer.

The copy holds the ``marts`` schema only. Staging and intermediate models are views over the live
Parquet lake: in a copy they would show the lake as it is at query time (a refresh in progress,
or a survey that a later check rejected) rather than what was published, and they would break
when the working folder moves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import duckdb
import pandas as pd

from eocausal.faults import crash_point, write_point
from eocausal.study import StudyError


def publish(warehouse_path: Path, published_path: Path) -> Path:
    warehouse_path, published_path = Path(warehouse_path), Path(published_path)
    if not warehouse_path.exists():
        raise FileNotFoundError(f"no warehouse to publish at {warehouse_path}")
    # Fold the write-ahead log into the file so the copy is complete on its own.
    with duckdb.connect(str(warehouse_path)) as con:
        con.execute("CHECKPOINT")
    published_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_copies(published_path.parent)

    def fill(tmp: Path) -> None:
        write_point(published_path)  # fault tests: a full or read-only disk
        shutil.copyfile(warehouse_path, tmp)
        _keep_only_published_schemas(tmp)
        crash_point("publish.copied")  # fault tests: copy made, not yet swapped in

    # The pid in the name tells a later publish whether the copy's writer is gone.
    return replace_duckdb_file(published_path, fill, prefix=f"{_COPY_PREFIX}{os.getpid()}.")


def replace_duckdb_file(target: Path, fill, prefix: str) -> Path:
    """Swap a new DuckDB file in at ``target``: ``fill(tmp)`` writes it at a temporary path in the
    same folder (which does not exist yet), then ``os.replace``; readers see the old file or the
    new one, never a partial one. The temporary file and its WAL are removed on any error."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".duckdb", dir=Path(target).parent)
    os.close(fd)
    os.unlink(name)  # fill creates it (DuckDB cannot open an empty file)
    tmp = Path(name)
    try:
        fill(tmp)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, Path(name + ".wal")):
            if leftover.exists():
                leftover.unlink()
    return Path(target)


PUBLISHED_SCHEMAS = ("marts",)
_COPY_PREFIX = ".publish."


def quote_identifier(name: str) -> str:
    """A DuckDB identifier in double quotes (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _keep_only_published_schemas(db_path: Path) -> None:
    with duckdb.connect(str(db_path)) as con:
        schemas = [r[0] for r in con.execute(
            "select schema_name from duckdb_schemas() where database_name = current_database() and not internal"
        ).fetchall()]
        for schema in schemas:
            if schema not in PUBLISHED_SCHEMAS and schema != "main":
                con.execute(f"DROP SCHEMA {quote_identifier(schema)} CASCADE")
        con.execute("CHECKPOINT")


def _remove_dead_copies(folder: Path) -> None:
    """Delete copies left by a publish that was killed before its swap (its process is gone)."""
    for entry in folder.glob(f"{_COPY_PREFIX}*"):
        pid = entry.name[len(_COPY_PREFIX):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            entry.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WarehousePathError(StudyError):
    """A working folder that cannot hold a warehouse (reported like a study error by the CLI)."""


def check_sql_safe_path(path: Path) -> Path:
    """Reject a path that cannot be embedded in SQL text as a quoted literal.

    dbt-duckdb reads the lake through SQL (``read_parquet('<lake>/...')``), so the working
    folder's path becomes part of a statement: a quote or a control character in it would end
    the literal early (a broken statement at best, injected SQL at worst).
    """
    text = str(path)
    bad = sorted({c for c in text if c in "'\"`;" or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise WarehousePathError(
            f"working folder path {text!r} contains characters not allowed in warehouse paths: {bad}")
    return path


def query(db_path: Path, sql: str, params: list | None = None) -> pd.DataFrame:
    """Run a read-only query on a warehouse file (short-lived connection)."""
    with duckdb.connect(str(db_path), read_only=True) as con:
        return con.execute(sql, params or []).df()


def query_units(db_path: Path, sql: str) -> pd.DataFrame:
    """As :func:`query`, with list columns (the units' image components) kept in Arrow: a pandas
    ``ArrowDtype`` column over DuckDB's flat buffer instead of one numpy array per row, which
    :func:`eocausal.lake.embedding_matrix` reads in one piece."""
    import pyarrow as pa

    with duckdb.connect(str(db_path), read_only=True) as con:
        table = con.sql(sql).to_arrow_table()
    vectors = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
    frame = table.drop_columns(vectors).to_pandas()
    for name in vectors:
        frame[name] = pd.Series(pd.arrays.ArrowExtensionArray(table.column(name)), index=frame.index)
    return frame[table.column_names]
