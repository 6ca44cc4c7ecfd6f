"""One published catalog for every study of a deployment: the SQL consumers' single DuckDB file.

Each study publishes its own warehouse copy (``<workdir>/published/warehouse.duckdb``, swapped in
atomically by :func:`eocausal.warehouse.publish`). The catalog gathers those copies' ``marts`` into
one file, so a consumer opens one database and compares studies:

- every mart of every study, as a table of the same name in schema ``marts``, rows of all studies
  together with a ``study`` column (added where the study's mart has none, e.g. analysis_units),
  columns matched by name (a covariate one study has is NULL for the others);
- ``marts.studies``: one row per study with its current estimate version and when it was published;
- the marts' table and column descriptions (dbt persist_docs) as DuckDB comments.

A rebuild reads every study's current published copy and writes a new catalog file beside the old
one, then swaps it in with ``os.replace``: a reader that opened the old file keeps a complete old
catalog, a reader that opens it afterwards sees the new one; no reader ever sees a study half
copied. Rebuilds are serialised by a lock file, so two studies finishing together both land.
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from eocausal.warehouse import quote_identifier, replace_duckdb_file

CATALOG_SCHEMA = "marts"
STUDIES_TABLE = "studies"
_TMP_PREFIX = ".catalog."
STUDIES_COMMENT = ("One row per study of the deployment: its published warehouse, when it was published "
                   "(NULL: not yet), and its current estimate version.")


class CatalogError(ValueError):
    """A study that cannot go into the catalog (named, with why)."""


@contextmanager
def _locked(catalog: Path):
    lock = catalog.with_name(catalog.name + ".lock")
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_catalog(published: Mapping[str, Path], catalog: Path) -> Path:
    """Rebuild ``catalog`` from each study's published warehouse (study name -> path); studies
    not yet published are left out (listed in ``marts.studies`` with published_at NULL)."""
    catalog = Path(catalog)
    catalog.parent.mkdir(parents=True, exist_ok=True)
    with _locked(catalog):
        return replace_duckdb_file(catalog, lambda tmp: _write(published, tmp), prefix=_TMP_PREFIX)


def _write(published: Mapping[str, Path], out: Path) -> None:
    con = duckdb.connect(str(out))
    try:
        con.execute(f"create schema {CATALOG_SCHEMA}")
        tables: dict[str, list[str]] = {}  # mart -> one select per study
        comments: dict[str, str] = {}
        column_comments: dict[tuple[str, str], str] = {}
        studies = []
        for i, (name, path) in enumerate(sorted(published.items())):
            path = Path(path)
            if not path.exists():
                studies.append((name, None, str(path), None))
                continue
            alias = f"s{i}"
            try:
                con.execute(f"attach {_literal(str(path))} as {alias} (read_only)")
            except duckdb.Error as exc:
                raise CatalogError(f"study {name!r}: published warehouse {path} cannot be opened: {exc}") from None
            marts = con.execute(
                "select table_name, comment from duckdb_tables() where database_name = ? and schema_name = ? "
                "union all select view_name, comment from duckdb_views() where database_name = ? and schema_name = ?",
                [alias, CATALOG_SCHEMA, alias, CATALOG_SCHEMA]).fetchall()
            for table, comment in marts:
                columns = [r[0] for r in con.execute(
                    "select column_name from duckdb_columns() where database_name = ? and schema_name = ? "
                    "and table_name = ? order by column_index", [alias, CATALOG_SCHEMA, table]).fetchall()]
                source = f"{alias}.{CATALOG_SCHEMA}.{quote_identifier(table)}"
                study_col = "" if "study" in columns else f"{_literal(name)} as study, "
                tables.setdefault(table, []).append(f"select {study_col}* from {source}")
                if comment:
                    comments.setdefault(table, comment)
                for column, text in con.execute(
                        "select column_name, comment from duckdb_columns() where database_name = ? and schema_name = ? "
                        "and table_name = ? and comment is not null", [alias, CATALOG_SCHEMA, table]).fetchall():
                    column_comments.setdefault((table, column), text)
            version = None
            if any(t == "current_estimate" for t, _ in marts):
                row = con.execute(f"select max(estimate_version) from {alias}.{CATALOG_SCHEMA}.current_estimate "
                                  "where study = ?", [name]).fetchone()
                version = row[0] if row else None
            stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            studies.append((name, stamp, str(path), version))
        for table, selects in sorted(tables.items()):
            target = f"{CATALOG_SCHEMA}.{quote_identifier(table)}"
            con.execute(f"create table {target} as " + " union all by name ".join(selects))
            if table in comments:
                con.execute(f"comment on table {target} is {_literal(comments[table])}")
        for (table, column), text in sorted(column_comments.items()):
            con.execute(f"comment on column {CATALOG_SCHEMA}.{quote_identifier(table)}.{quote_identifier(column)} "
                        f"is {_literal(text)}")
        con.execute(f"create table {CATALOG_SCHEMA}.{STUDIES_TABLE} (study varchar, published_at timestamptz, "
                    "published_warehouse varchar, estimate_version varchar)")
        if studies:
            con.executemany(f"insert into {CATALOG_SCHEMA}.{STUDIES_TABLE} values (?, ?, ?, ?)", studies)
        con.execute(f"comment on table {CATALOG_SCHEMA}.{STUDIES_TABLE} is {_literal(STUDIES_COMMENT)}")
        for i in range(len(published)):
            try:
                con.execute(f"detach s{i}")
            except duckdb.Error:
                pass
        con.execute("checkpoint")
    finally:
        con.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
