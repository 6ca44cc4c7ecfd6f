"""The chip store's on-disk layout: Parquet parts of many chips each, written atomically.

One module owns the layout; :mod:`eocausal.imagery.chips` decides what to store and when.

Layout: ``cache_dir/parts/<part>.parquet``, each part up to :data:`PART_ROWS` chips (fewer when
:data:`PART_MAX_BYTES` of pixels or :data:`PART_MAX_SECONDS` of work come first, and at the end of
a run), one row per chip key (:data:`SCHEMA`):

- ``chip_key``: the content-addressed key (:func:`eocausal.imagery.chips.chip_key`);
- ``outside``: True for a unit outside every file's footprint (then data/valid are empty);
- ``dtype``, ``shape``, ``data``: the [C, H, W] pixels as raw bytes in the narrowest dtype that
  holds the values exactly (``numpy`` dtype string with its byte order, e.g. ``<u2``);
- ``valid``: the [H, W] validity mask, one byte per pixel (0/1);
- ``valid_share``: the mask's mean, so a verdict is read without touching pixels;
- ``source_file``: the file the chip came from ('' when outside);
- ``cloud_share``: share of observations flagged cloud/shadow, NaN where not known.

A part is written to a temp file in the same folder and renamed (``os.replace``) to a name unique
to its writer, so readers see a whole part or none, and concurrent writers never collide. A part
is never modified after the rename. A key stored in more than one part (two runs fetched it at
once) holds the same chip in each; the reader takes any. Lookups read each part's small columns
once per call (key -> part, row), then only the row groups (:data:`ROW_GROUP_ROWS` chips) that
hold the requested chips.

Chip caches written before parts existed (``cache_dir/<key[:2]>/<key>.npz``, one chip per file)
are still read by :mod:`eocausal.imagery.chips`; new chips always go to parts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eocausal import atomic
from eocausal.faults import crash_point, write_point

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
PART_SUFFIX = ".parquet"
PART_ROWS = 4096  # chips per part: a killed run loses at most this many
PART_MAX_BYTES = 256 << 20  # ... or this many bytes of pixels, whichever comes first
PART_MAX_SECONDS = 30.0  # ... or the chips gathered in this long (slow streaming sources)
ROW_GROUP_ROWS = 256  # the unit a reader decompresses
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 1

SCHEMA = pa.schema([
    ("chip_key", pa.string()),
    ("outside", pa.bool_()),
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int32())),
    ("data", pa.large_binary()),
    ("valid", pa.large_binary()),
    ("valid_share", pa.float64()),
    ("source_file", pa.string()),
    ("cloud_share", pa.float64()),
])
VERDICT_COLUMNS = ["chip_key", "outside", "valid_share", "source_file", "cloud_share"]
_PIXEL_COLUMNS = ["chip_key", "outside", "dtype", "shape", "data", "valid"]

HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def parts_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / PARTS_DIR


def part_paths(cache_dir: Path) -> list[Path]:
    """The store's finished parts, oldest name first (temp files are not parts)."""
    folder = parts_dir(cache_dir)
    if not folder.is_dir():
        return []
    names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(PART_SUFFIX) and not e.name.startswith("."))
    return [folder / n for n in names]


@dataclass(frozen=True)
class Verdict:
    part: Path
    row: int
    outside: bool
    valid_share: float
    source_file: str | None
    cloud_share: float


@dataclass
class Scan:
    found: dict[str, Verdict]  # requested key -> where it is and its verdict
    unreadable: dict[Path, str]  # part -> why it could not be read (its chips count as missing)


def scan(cache_dir: Path, keys: set[str] | None = None) -> Scan:
    """Find ``keys`` (all keys when None) in the store, reading only each part's small columns."""
    found: dict[str, Verdict] = {}
    unreadable: dict[Path, str] = {}
    wanted = None if keys is None else pa.array(sorted(keys), type=pa.string())
    for path in part_paths(cache_dir):
        try:
            table = pq.ParquetFile(path).read(columns=VERDICT_COLUMNS)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, pa.ArrowException) as exc:
            unreadable[path] = f"{type(exc).__name__}: {exc}"
            continue
        if wanted is None:
            rows = list(range(table.num_rows))
        else:  # only the requested rows become Python objects
            rows = pc.indices_nonzero(pc.is_in(table.column("chip_key"), value_set=wanted)).to_pylist()
            if not rows:
                continue
            table = table.take(rows)
        cols = {name: table.column(name).to_pylist() for name in VERDICT_COLUMNS}
        for i, row in enumerate(rows):
            outside = bool(cols["outside"][i])
            cloud = cols["cloud_share"][i]
            found[cols["chip_key"][i]] = Verdict(
                part=path, row=row, outside=outside,
                valid_share=0.0 if outside else float(cols["valid_share"][i]),
                source_file=(cols["source_file"][i] or None) if not outside else None,
                cloud_share=float("nan") if outside or cloud is None else float(cloud),
            )
    return Scan(found, unreadable)


def stored_chip_keys(cache_dir: Path) -> set[str]:
    """Every chip key the store holds: in parts, and in per-chip ``.npz`` files of older caches."""
    keys = set(scan(cache_dir).found)
    cache_dir = Path(cache_dir)
    if cache_dir.is_dir():
        for shard in os.scandir(cache_dir):
            if shard.is_dir() and len(shard.name) == 2:
                keys.update(e.name[:-4] for e in os.scandir(shard.path)
                            if e.name.endswith(".npz") and not e.name.startswith("."))
    return keys


class PartError(Exception):
    """A part's pixels could not be read; ``part`` names it."""

    def __init__(self, part: Path, reason: str):
        super().__init__(f"{part}: {reason}")
        self.part = part


def read_pixels(where: dict[str, Verdict]) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """key -> (data float32 [C,H,W], valid bool [H,W], outside), reading only the row groups needed.

    Raises :class:`PartError` for a part that cannot be read or holds an inconsistent chip.
    """
    by_part: dict[Path, list[tuple[int, str]]] = defaultdict(list)
    for key, v in where.items():
        by_part[v.part].append((v.row, key))
    out: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
    for part, wanted in by_part.items():
        try:
            out.update(_read_part_rows(part, wanted))
        except PartError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise PartError(part, f"{type(exc).__name__}: {exc}") from exc
    return out


def _read_part_rows(part: Path, wanted: list[tuple[int, str]]):
    pf = pq.ParquetFile(part)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    by_group: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for row, key in wanted:
        by_group[int(np.searchsorted(starts, row, side="right")) - 1].append((row, key))
    result = {}
    # One row group at a time: memory holds ROW_GROUP_ROWS chips' bytes, not every needed group of
    # the part (a random sample touches most of them: a whole part, 0.8 GB of 128 px 6-band chips).
    for g in sorted(by_group):
        table = pf.read_row_group(g, columns=_PIXEL_COLUMNS)
        keys, outs, dtypes = table.column("chip_key"), table.column("outside"), table.column("dtype")
        shapes, datas, valids = table.column("shape"), table.column("data"), table.column("valid")
        for row, key in by_group[g]:
            i = row - int(starts[g])
            if keys[i].as_py() != key:
                raise PartError(part, f"row {row} holds {keys[i].as_py()!r}, expected {key!r}")
            if outs[i].as_py():
                result[key] = (np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), bool), True)
                continue
            shape = tuple(shapes[i].as_py())
            if len(shape) != 3:
                raise PartError(part, f"chip {key}: shape {shape} is not [C, H, W]")
            data = np.frombuffer(datas[i].as_buffer(), dtype=np.dtype(dtypes[i].as_py())).reshape(shape)
            valid = np.frombuffer(valids[i].as_buffer(), dtype=np.uint8).reshape(shape[1:]).astype(bool)
            result[key] = (data.astype(np.float32), valid, False)
        del table
    return result


class PartWriter:
    """Buffers chips and writes them as parts: every PART_ROWS chips (or PART_MAX_BYTES, or
    PART_MAX_SECONDS after the first buffered chip), and on :meth:`close`."""

    def __init__(self, cache_dir: Path):
        self.folder = parts_dir(cache_dir)
        self._rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._bytes = 0
        self._since: float | None = None
        self.n_parts = 0
        self.n_rows = 0
        self.last_valid_share = 0.0  # the valid share of the chip added last

    def __len__(self) -> int:
        return len(self._rows["chip_key"])

    def add(self, key: str, data: np.ndarray | None, valid: np.ndarray | None, source_file: str,
            cloud_share: float | None) -> int:
        """Buffer one chip (``data is None``: outside coverage); returns the chips written now (0 or a part)."""
        r = self._rows
        r["chip_key"].append(key)
        r["outside"].append(data is None)
        if data is None:
            r["dtype"].append("")
            r["shape"].append([])
            r["data"].append(b"")
            r["valid"].append(b"")
            r["valid_share"].append(0.0)
            r["source_file"].append("")
            self.last_valid_share = 0.0
        else:
            assert valid is not None
            mask = np.ascontiguousarray(valid, dtype=bool)
            r["dtype"].append(data.dtype.str)
            r["shape"].append(list(data.shape))
            r["data"].append(np.ascontiguousarray(data).tobytes())
            r["valid"].append(mask.tobytes())
            # == mask.mean(), exactly: a count over the size, both exact in float64
            self.last_valid_share = np.count_nonzero(mask) / mask.size if mask.size else float("nan")
            r["valid_share"].append(self.last_valid_share)
            r["source_file"].append(source_file)
            self._bytes += data.nbytes + mask.nbytes
        r["cloud_share"].append(float("nan") if cloud_share is None else float(cloud_share))
        if self._since is None:
            self._since = time.monotonic()
        if (len(self) >= PART_ROWS or self._bytes >= PART_MAX_BYTES
                or time.monotonic() - self._since >= PART_MAX_SECONDS):
            return self.flush()
        return 0

    def flush(self) -> int:
        """Write the buffered chips as one part (atomically); returns how many. The buffer is
        emptied even when the write fails: those chips are fetched again by the next run."""
        n = len(self)
        if n == 0:
            return 0
        table = pa.table(self._rows, schema=SCHEMA)
        self._rows = {name: [] for name in SCHEMA.names}
        self._bytes = 0
        self._since = None
        _write_part(self.folder, table)
        self.n_parts += 1
        self.n_rows += n
        return n

    def close(self) -> int:
        return self.flush()


# Chip files (parts and legacy .npz) stay private, the mode they had before the shared atomic writer.
CHIP_FILE_MODE = 0o600


def writer_temp_prefix(stem: str) -> str:
    """A chip file's temp-name prefix: the writer's host and pid let a later run tell a dead writer's
    leftover from a live writer's file (chips._sweep_stale_temp_files)."""
    return f".{stem[:16]}.{HOST_TAG}.{os.getpid()}."


def _write_part(folder: Path, table: pa.Table) -> Path:
    """Write ``table`` as a new part so that readers see the whole part or nothing, even if killed."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.time_ns():020d}-{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path = folder / f"{stem}{PART_SUFFIX}"
    write_point(path)  # fault tests: a full or read-only disk
    with atomic.atomic_path(path, mode=CHIP_FILE_MODE, prefix=writer_temp_prefix(stem)) as tmp:
        with open(tmp, "wb") as fh:
            pq.write_table(
                table, fh, row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION,
                compression_level=COMPRESSION_LEVEL, use_dictionary=["dtype", "source_file"],
                write_statistics=False,
            )
        crash_point("chips.part_written")  # fault tests: the part whole, not yet under its name
    return path
