"""The Parquet lake the Python stages write and dbt reads (DESIGN §4).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a run killed
mid-write never leaves a truncated file where dbt or a later run would read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eocausal import atomic
from eocausal.embed import EmbeddingError
from eocausal.embed.reduce import PCAReduction
from eocausal.faults import write_point

# The tables written once per imagery period (merged from the period's tiles by image_components).
PERIOD_TABLES = ("image_chips", "image_embeddings")
# The fitted embedder of each period (image_embedder): which one, in the embedding cache (a JSON record).
EMBEDDER_TABLE = "image_embedder"
# The context windows' components of the analysis period's units (image_context), one version at a time.
CONTEXT_TABLE = "image_context"


def period_path(lake: Path, table: str, period: str, suffix: str = ".parquet") -> Path:
    """One imagery period's file of a per-period table: ``<lake>/<table>/period=<period>.parquet``.

    Each period has its own file, so materialising one period never rewrites another's.
    (Period names are checked by the study contract: letters, digits, '_', '.', '-'.)
    """
    tables = (*PERIOD_TABLES, EMBEDDER_TABLE, CONTEXT_TABLE)
    if table not in tables:
        raise ValueError(f"{table!r} is not a per-period lake table; those are {list(tables)}")
    if not period or "/" in period or "\\" in period or period in (".", ".."):
        raise ValueError(f"imagery period {period!r} cannot name a lake file")
    return Path(lake) / table / f"period={period}{suffix}"


# The tables written once per imagery period and tile (Dagster's period x tile partitions), merged
# per period into the period tables above by image_components.
TILE_TABLES = ("image_chips", "image_embeddings")


def tile_path(lake: Path, table: str, period: str, tile: str, suffix: str = ".parquet") -> Path:
    """One tile's file of a period: ``<lake>/<table>/period=<period>/tile=<tile>.parquet``.
    (Tiles are quadkeys, eocausal.tiles: digits 0-3.)"""
    if table not in TILE_TABLES:
        raise ValueError(f"{table!r} is not a per-tile lake table; those are {list(TILE_TABLES)}")
    folder = period_path(lake, table, period, suffix="")
    if not tile or not tile.isdigit():
        raise ValueError(f"tile {tile!r} is not a quadkey (digits 0-3)")
    return folder / f"tile={tile}{suffix}"


def embedder_path(lake: Path, period: str) -> Path:
    """A period's fitted-embedder record: ``<lake>/image_embedder/period=<period>.json``."""
    return period_path(lake, EMBEDDER_TABLE, period, suffix=".json")


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        write_point(path)  # fault tests: a full or read-only disk
        pq.write_table(table, tmp)
    return Path(path)


def write_frame(df: pd.DataFrame, path: Path) -> Path:
    return write_table_atomic(pa.Table.from_pandas(df, preserve_index=False), path)


def _float_lists(matrix: np.ndarray) -> pa.Array:
    """One float32 list per row of ``matrix``, built from its flat buffer (no per-row objects)."""
    n, dim = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, dim).cast(pa.list_(pa.float32()))


def embeddings_table(unit_ids: list[str], features: np.ndarray, components: np.ndarray | None = None,
                     **constant_columns: str) -> pa.Table:
    """Unit ids with one float32 list per unit (the column dbt reads as ``embedding``) and, when
    given, the units' leading principal components (``image_components``, what the marts hold)."""
    n = features.shape[0]
    columns = {
        "unit_id": pa.array(list(unit_ids), type=pa.string()),
        "embedding": _float_lists(features),
    }
    if components is not None:
        columns["image_components"] = _float_lists(components)
    for name, value in constant_columns.items():
        columns[name] = pa.array([value] * n, type=pa.string())
    return pa.table(columns)


def embedding_matrix(column: pd.Series) -> np.ndarray:
    """The (n, dim) float matrix from a column of per-unit float lists.

    A column kept in Arrow (pandas ``ArrowDtype``, as :func:`eocausal.warehouse.query_units`
    returns the marts' vectors) is read from its flat values buffer in one piece; a column of
    per-row arrays is stacked row by row."""
    if len(column) == 0:
        return np.zeros((0, 0))
    if isinstance(column.dtype, pd.ArrowDtype):
        return _list_rows(column.array.__arrow_array__().combine_chunks()).astype(np.float64, copy=False)
    return np.stack([np.asarray(v, dtype=np.float64) for v in column.to_numpy()])


def _list_rows(arr: pa.ListArray, where: str = "") -> np.ndarray:
    """The (n, dim) matrix of a non-empty Arrow list array, from its flat values buffer (their dtype)."""
    if arr.null_count:
        raise ValueError(f"{where}{arr.null_count} unit(s) have no vector (a null list)")
    lengths = pc.list_value_length(arr).to_numpy()
    if (lengths != lengths[0]).any():
        raise ValueError(f"{where}the units' vectors have different lengths")
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), int(lengths[0]))


def read_vectors(path: Path, column: str = "embedding", rows: int | None = None) -> tuple[list[str], np.ndarray]:
    """(unit ids, float32 [n, dim]) of a lake table's vector column (``image_embeddings``'
    ``embedding``), batch by batch into one preallocated matrix: no per-unit arrays, no float64
    copy, no whole decoded table (at 100,000 x 1,536 a pandas read took 5 GB, a whole-table Arrow
    read 2.6 GB and 11 s; this 1.3 GB and 3-5 s). ``rows``: only the first ``rows`` units."""
    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows if rows is None else min(rows, pf.metadata.num_rows)
    ids: list[str] = []
    out: np.ndarray | None = None
    for batch in pf.iter_batches(batch_size=max(min(n, 4096), 1), columns=["unit_id", column]):
        take = min(len(batch), n - len(ids))
        if take == 0:
            break
        block = _list_rows(batch.column(1).slice(0, take), where=f"{path} ({column}): ")
        if out is None:
            out = np.empty((n, block.shape[1]), dtype=np.float32)
        if block.shape[1] != out.shape[1]:
            raise ValueError(f"{path} ({column}): the units' vectors have different lengths")
        out[len(ids) : len(ids) + take] = block
        ids += [str(u) for u in batch.column(0).slice(0, take).to_pylist()]
        if len(ids) >= n:
            break
    return ids, out if out is not None else np.zeros((0, 0), dtype=np.float32)


def stored_pca(lake: Path, period: str, embedding_version: str) -> PCAReduction | None:
    """The PCA the embedding stage stored beside ``period``'s embeddings
    (``image_embeddings/period=<p>.pca.json``), if it belongs to ``embedding_version``; else None
    (none stored, another version's, or unreadable: the estimators then fit their own)."""
    path = period_path(lake, "image_embeddings", period, suffix=".pca.json")
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("embedding_version") != embedding_version:
            return None
        return PCAReduction.from_dict(doc["pca"])
    except (OSError, ValueError, KeyError, TypeError, EmbeddingError):
        return None


def write_context(path: Path, unit_ids: list[str], components: np.ndarray, version: str) -> Path:
    """The units' context components (NaN rows where a unit's window is unusable) under ``version``."""
    table = pa.table({"unit_id": pa.array(list(unit_ids), type=pa.string()),
                      "context_components": _float_lists(components),
                      "context_version": pa.array([version] * len(unit_ids), type=pa.string())})
    return write_table_atomic(table, path)


def read_context(path: Path, version: str, unit_ids: list[str]) -> np.ndarray | None:
    """The stored context components of ``unit_ids`` (float [n, k], in their order), if the file
    holds ``version`` for every one of them; else None (none stored, another version, other units)."""
    try:
        table = pq.read_table(path, columns=["unit_id", "context_components", "context_version"])
    except (OSError, pa.ArrowInvalid, KeyError):
        return None
    if table.num_rows == 0 or set(table.column("context_version").unique().to_pylist()) != {version}:
        return None
    rows = pd.Index(table.column("unit_id").to_pylist()).get_indexer(list(unit_ids))
    if (rows < 0).any():
        return None
    return _list_rows(table.column("context_components").combine_chunks()).astype(float)[rows]


# Per study, the estimate version its last estimates run selected (dbt: marts.current_estimate).
CURRENT_ESTIMATE_FILE = "current_estimate.parquet"


def current_estimate_frame(path: Path, study: str, version: str) -> pd.DataFrame:
    """The current-estimate table with ``study``'s row set to ``version`` (other studies' rows
    kept: one lake may serve several studies)."""
    columns = ["study", "estimate_version", "selected_at"]
    row = pd.DataFrame({"study": [study], "estimate_version": [version],
                        "selected_at": [pd.Timestamp.now(tz="UTC").floor("s")]})
    if Path(path).exists():
        old = pd.read_parquet(path, columns=columns)
        row = pd.concat([old[old["study"] != study], row], ignore_index=True)
    return row.sort_values("study", ignore_index=True)
