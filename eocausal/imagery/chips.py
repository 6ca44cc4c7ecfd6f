"""Per-unit image chips with a content-addressed cache.

A chip's cache key hashes the imagery's content fingerprint, the chip size and the unit's
coordinates, so an unchanged input costs nothing on a re-run and a changed scene never serves a
stale chip. Every unit's verdict is cached, including "outside coverage" and "mostly nodata",
so a re-run reads no imagery at all.

Storage (:mod:`eocausal.imagery.chipstore` owns the layout): new chips go to Parquet parts,
``cache_dir/parts/<part>.parquet``, up to 4,096 chips each, each part written whole to a temp file
and renamed, so a killed run loses at most the part it was gathering. Chips are buffered as they
arrive and a part is written every 4,096 chips, after 30 s of gathering (slow streaming sources:
Earth Engine, STAC, remote COGs) and at the end of the run; a run that fails with an exception
writes what it gathered before re-raising. Pixels are kept exactly: [C, H, W] in the narrowest
dtype that holds the values exactly (uint16 for raw Landsat DNs), else float32.

Caches written before parts existed hold one ``cache_dir/<key[:2]>/<key>.npz`` per chip (arrays
``data``, ``valid``, ``source_file``, ``outside``, ``cloud_share`` - the last may be absent);
they are still read, under the same keys, so an existing cache is not fetched again. Nothing
writes them any more (:func:`_store` is kept for tests that build such a cache).

Sources other than local GeoTIFFs (see :mod:`eocausal.imagery.sources`) plug in here. A unit a
source fails to image (a :class:`~eocausal.imagery.sources.ChipFailure`) is recorded with reason
``fetch_failed`` and is not cached, so a re-run asks for it again. Temp files left by killed
writers (of parts, or of older per-chip files) are removed by the next run (at once when their
writer process on this host is gone, else after a day).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import atomic, progress
from eocausal.faults import crash_point, write_point
from eocausal.imagery import chipstore
from eocausal.imagery.chipstore import stored_chip_keys as stored_chip_keys  # the public count of a cache
from eocausal.imagery.geotiff import Chip, GeoTiffSource, ImageryError
from eocausal.imagery.sources import ChipFailure, ChipSource

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_EXCLUDED = "excluded"
REASON_OUTSIDE = "outside_coverage"
REASON_NODATA = "nodata_share_above_max"
REASON_FETCH_FAILED = "fetch_failed"
REASONS = (REASON_OUTSIDE, REASON_NODATA, REASON_FETCH_FAILED)

# cloud_share: NaN where the source does not know; detail: why a fetch failed, else None.
INDEX_COLUMNS = ["unit_id", "chip_key", "status", "reason", "valid_share", "source_file", "cloud_share", "detail"]
_CACHE_FORMAT = 1
# Local sources read chips in batches of at most _READ_BATCH chips and _READ_BATCH_PIXELS pixels
# per band (1024 x 3 x 64 x 64 float32 is 50 MB), in north-to-south order, so a batch's chips
# are close together and read as shared windows (see GeoTiffSource._read_windows).
# Remote files (COGs over HTTP) keep 256: a batch's reads of a file are retried as a whole.
_READ_BATCH = 1024
_READ_BATCH_REMOTE = 256
_READ_BATCH_PIXELS = 1024 * 64 * 64


@dataclass
class ChipExtraction:
    index: pd.DataFrame  # one row per unit, input order; columns INDEX_COLUMNS
    # Counted per distinct chip (units with identical coordinates share one).
    n_cached: int  # chips served from the cache
    n_extracted: int  # chips read from the imagery this time
    n_failed: int = 0  # chips the source failed to deliver (recorded, not cached)


def chip_key(source_fingerprint: str, size_px: int, lat: float, lon: float) -> str:
    """sha256 hex of the imagery fingerprint, chip size and coordinates (rounded to 1e-7 deg)."""
    # '+ 0.0' turns -0.0 into 0.0 so a coordinate that rounds to zero has one key.
    lat_s = f"{round(float(lat), 7) + 0.0:.7f}"
    lon_s = f"{round(float(lon), 7) + 0.0:.7f}"
    text = f"chip/{_CACHE_FORMAT}|{source_fingerprint}|{int(size_px)}|{lat_s}|{lon_s}"
    return hashlib.sha256(text.encode()).hexdigest()


def chip_path(cache_dir: Path, key: str) -> Path:
    """Where a cache written before parts existed holds the chip ``key`` (one .npz per chip)."""
    return Path(cache_dir) / key[:2] / f"{key}.npz"


def _compact(data: np.ndarray) -> np.ndarray:
    """The narrowest integer dtype that holds float32 values exactly, else float32 itself."""
    if data.size:
        # min/max are NaN when any value is NaN, and +-inf when any is: finite both = all finite.
        lo, hi = float(data.min()), float(data.max())
        if np.isfinite(lo) and np.isfinite(hi):
            for dtype in (np.uint8, np.uint16, np.int16):
                info = np.iinfo(dtype)
                if info.min <= lo and hi <= info.max:
                    narrow = data.astype(dtype)
                    # Exact only if every value is a whole number (in range: checked above).
                    return narrow if np.array_equal(narrow, data) else data.astype(np.float32)
    return data.astype(np.float32)


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that readers see either nothing or the whole file, even if killed (legacy layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_point(path)  # fault tests: a full or read-only disk
    with atomic.atomic_path(path, mode=chipstore.CHIP_FILE_MODE, prefix=chipstore.writer_temp_prefix(path.stem)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


_HOST_TAG = chipstore.HOST_TAG
_STALE_TEMP_SECONDS = 24 * 3600


def _writer_alive(host_tag: str, pid_text: str) -> bool:
    """Whether a temp file's writer may still be running (unknown hosts: assume so)."""
    if host_tag != _HOST_TAG or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def _sweep_stale_temp_files(cache_dir: Path) -> int:
    """Remove temp files of killed writers: of a dead process on this host, or older than a day."""
    removed = 0
    if not cache_dir.is_dir():
        return 0
    now = time.time()
    for shard in os.scandir(cache_dir):
        # <key[:2]>/ of the per-chip layout, parts/ of the Parquet parts
        if not (shard.is_dir() and (len(shard.name) == 2 or shard.name == chipstore.PARTS_DIR)):
            continue
        for entry in os.scandir(shard.path):
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            parts = entry.name.split(".")  # '', stem, host, pid, random, 'tmp'
            try:
                stale = now - entry.stat().st_mtime > _STALE_TEMP_SECONDS
            except FileNotFoundError:
                continue
            if stale or (len(parts) >= 6 and not _writer_alive(parts[2], parts[3])):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def _store(path: Path, chip: Chip | None) -> None:
    """Write one chip as a per-chip .npz (the layout before parts): only tests build such caches now."""
    if chip is None:
        arrays = {
            "data": np.zeros((0, 0, 0), dtype=np.float32),
            "valid": np.zeros((0, 0), dtype=bool),
            "source_file": np.array(""),
            "outside": np.array(True),
        }
    else:
        arrays = {
            "data": _compact(chip.data),
            "valid": chip.valid.astype(bool),
            "source_file": np.array(chip.source_file),
            "outside": np.array(False),
        }
    cloud_share = getattr(chip, "cloud_share", None)
    arrays["cloud_share"] = np.array(np.nan if cloud_share is None else float(cloud_share))
    _write_atomic(path, arrays)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(data float32 [C,H,W], valid bool [H,W], source_file, outside); raises on a bad file."""
    with np.load(path, allow_pickle=False) as z:
        data = z["data"].astype(np.float32)
        valid = z["valid"].astype(bool)
        source_file = str(z["source_file"])
        outside = bool(z["outside"])
    if not outside and (data.ndim != 3 or valid.shape != data.shape[1:]):
        raise ValueError(f"inconsistent shapes: data {data.shape}, valid {valid.shape}")
    return data, valid, source_file, outside


def _load_verdict(path: Path, size_px: int) -> tuple[float, str | None, bool, float]:
    """(valid_share, source_file, outside, cloud_share) of a cached chip, without decompressing its pixels."""
    with np.load(path, allow_pickle=False) as z:
        outside = bool(z["outside"])
        cloud_share = float(z["cloud_share"]) if "cloud_share" in z.files else float("nan")
        if outside:
            return 0.0, None, True, float("nan")
        valid = z["valid"]
        source_file = str(z["source_file"])
    if valid.shape != (size_px, size_px):
        raise ValueError(f"mask shape {valid.shape}, expected {(size_px, size_px)}")
    return float(valid.astype(bool).mean()), source_file or None, False, cloud_share


_LOAD_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError)


def extract_chips(
    units: pd.DataFrame,
    source: GeoTiffSource | ChipSource,
    size_px: int,
    cache_dir: Path,
    max_nodata_share: float,
) -> ChipExtraction:
    """Chips for every unit (columns unit_id, lat, lon), cached by content.

    A unit is excluded, with a recorded reason, when it lies outside the imagery or when more
    than ``max_nodata_share`` of its chip is nodata. A cached chip that cannot be read (e.g. a
    disk fault) is read again from the imagery and rewritten.
    """
    missing = [c for c in ("unit_id", "lat", "lon") if c not in units.columns]
    if missing:
        raise ValueError(f"units lack columns {missing}; have {list(units.columns)}")
    if not 0.0 <= max_nodata_share < 1.0:
        raise ValueError(f"max_nodata_share must be in [0, 1), got {max_nodata_share}")
    unit_ids = units["unit_id"].astype(str).tolist()
    lats = units["lat"].to_numpy(dtype=float)
    lons = units["lon"].to_numpy(dtype=float)
    bad = [u for u, la, lo in zip(unit_ids, lats, lons) if not (np.isfinite(la) and np.isfinite(lo))]
    if bad:
        raise ValueError(f"{len(bad)} units have missing or non-finite coordinates: {bad[:10]}")

    cache_dir = Path(cache_dir)
    _sweep_stale_temp_files(cache_dir)
    fingerprint = source.fingerprint()
    keys = [chip_key(fingerprint, size_px, la, lo) for la, lo in zip(lats, lons)]

    # Pass 1: what the cache already holds (one entry per key; units may share coordinates):
    # the parts' small columns, read once, then per-chip .npz files of an older cache.
    # key -> (valid_share, file, outside, cloud_share)
    verdicts: dict[str, tuple[float, str | None, bool, float]] = {}
    n_cached = 0
    to_read: dict[str, tuple[float, float]] = {}
    stored = chipstore.scan(cache_dir, set(keys))
    for part, why in stored.unreadable.items():
        log.warning("chip part %s unreadable (%s); its chips are read again", part, why)
    legacy = _has_legacy_chips(cache_dir)
    for key, la, lo in zip(keys, lats, lons):
        if key in verdicts or key in to_read:
            continue
        found = stored.found.get(key)
        if found is not None:
            verdicts[key] = (found.valid_share, found.source_file, found.outside, found.cloud_share)
            n_cached += 1
            continue
        path = chip_path(cache_dir, key) if legacy else None
        if path is not None and path.exists():
            try:
                verdicts[key] = _load_verdict(path, size_px)
            except _LOAD_ERRORS as exc:
                log.warning("cached chip %s unreadable (%s); reading it again", path, exc)
            else:
                n_cached += 1
                continue
        to_read[key] = (lo, la)

    # Pass 2: read the rest from the imagery, gathering chips into parts (see the module
    # docstring): memory stays bounded, and a killed run loses at most the part it was gathering.
    # Failures are recorded, never cached.
    failures: dict[str, ChipFailure] = {}
    n_chips = n_cached + len(to_read)
    progress.report("chips", n_cached, n_chips, "chips", f"{n_cached:,} cached" if n_cached else "")
    writer = chipstore.PartWriter(cache_dir)
    try:
        for done, (key, chip) in enumerate(_read_pending(source, list(to_read.items()), size_px), n_cached + 1):
            progress.report("chips", done, n_chips, "chips", f"{n_cached:,} cached" if n_cached else "")
            if isinstance(chip, ChipFailure):
                failures[key] = chip
                continue
            if chip is None:
                written = writer.add(key, None, None, "", None)
                verdicts[key] = (0.0, None, True, float("nan"))
            else:
                written = writer.add(key, _compact(chip.data), chip.valid, chip.source_file, chip.cloud_share)
                cloud = float("nan") if chip.cloud_share is None else float(chip.cloud_share)
                verdicts[key] = (writer.last_valid_share, chip.source_file, False, cloud)
            crash_point("chips.gathered")  # fault tests: a crash with a part half gathered
            if written:
                crash_point("chips.stored")  # fault tests: a crash after a part was stored
    except BaseException:
        # Keep what was gathered (a fetch error, an interrupt); a failing write must not hide
        # the original error.
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - reported, then the original error goes on
            log.warning("could not store the %d chips gathered before the error: %s", len(writer), exc)
        raise
    if writer.close():
        crash_point("chips.stored")

    rows = []
    nan = float("nan")
    for unit_id, key in zip(unit_ids, keys):
        if key in failures:
            failure = failures[key]
            rows.append((unit_id, None, STATUS_EXCLUDED, failure.reason, 0.0, None, nan, failure.detail))
            continue
        valid_share, source_file, outside, cloud_share = verdicts[key]
        if outside:
            rows.append((unit_id, None, STATUS_EXCLUDED, REASON_OUTSIDE, 0.0, None, nan, None))
        elif too_much_nodata(valid_share, max_nodata_share):
            rows.append((unit_id, key, STATUS_EXCLUDED, REASON_NODATA, valid_share, source_file, cloud_share, None))
        else:
            rows.append((unit_id, key, STATUS_OK, None, valid_share, source_file, cloud_share, None))
    return ChipExtraction(
        index=_index_frame(rows), n_cached=n_cached, n_extracted=len(to_read) - len(failures),
        n_failed=len(failures),
    )


def too_much_nodata(valid_share: float, max_nodata_share: float) -> bool:
    """The exclusion rule: more than ``max_nodata_share`` of the chip is nodata (up to float rounding)."""
    return 1.0 - valid_share > max_nodata_share + 1e-12


def _read_pending(source, pending: list[tuple[str, tuple[float, float]]], size_px: int):
    """(key, chip | None | ChipFailure) for every pending chip, as the source delivers them."""
    for i, chip in stream_chips(source, [point for _, point in pending], size_px):
        yield pending[i][0], chip


def stream_chips(source, points: list[tuple[float, float]], size_px: int):
    """(i, chip | None | ChipFailure) for every (lon, lat) in ``points``, as the source delivers
    them: a remote source in its own order, a local one in batches of nearby chips (see
    _READ_BATCH), each file opened once per batch. Nothing is stored."""
    if hasattr(source, "iter_chips"):
        yield from source.iter_chips(points, size_px)
        return
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    limit = _READ_BATCH_REMOTE if getattr(source, "remote", False) else _READ_BATCH
    per_batch = max(1, min(limit, _READ_BATCH_PIXELS // int(size_px) ** 2))
    for start in range(0, len(order), per_batch):
        batch = order[start : start + per_batch]
        chips = source.read_chips([points[i] for i in batch], size_px)
        yield from zip(batch, chips)


def reads_locally(source) -> bool:
    """Whether ``source`` reads local files (no network): reading a chip again costs less than
    storing it and reading it back."""
    return not hasattr(source, "iter_chips") and not getattr(source, "remote", False)


def _index_frame(rows: list[tuple]) -> pd.DataFrame:
    columns = list(zip(*rows)) if rows else [[] for _ in INDEX_COLUMNS]
    frame = {}
    for name, values in zip(INDEX_COLUMNS, columns):
        # Object dtype keeps None as None under both pandas 2 and 3.
        dtype = float if name in ("valid_share", "cloud_share") else object
        frame[name] = pd.Series(list(values), dtype=dtype)
    return pd.DataFrame(frame)


def _has_legacy_chips(cache_dir: Path) -> bool:
    """Whether the cache has per-chip folders (``<key[:2]>/``) of the layout before parts."""
    if not cache_dir.is_dir():
        return False
    return any(e.is_dir() and len(e.name) == 2 for e in os.scandir(cache_dir))


def load_chips(index: pd.DataFrame, cache_dir: Path,
               stored: chipstore.Scan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack the chips of the ``status == 'ok'`` rows, in index order.

    Returns float32 [N, C, H, W] and bool [N, H, W]. Raises :class:`ImageryError` naming the
    unit and file when a chip is missing, unreadable, or of a different shape than the others.
    ``stored``: the store's scan for (at least) these keys, when the caller has one (batches of
    one stage scan once).
    """
    cache_dir = Path(cache_dir)
    ok = index[index["status"] == STATUS_OK]
    pairs = list(zip(ok["unit_id"], ok["chip_key"]))
    for unit_id, key in pairs:
        if not isinstance(key, str) or not key:
            raise ImageryError(f"unit {unit_id}: status 'ok' but no chip_key in the index")
    keys = {key for _, key in pairs}
    if stored is None:
        stored = chipstore.scan(cache_dir, keys)
    try:
        pixels = chipstore.read_pixels({k: stored.found[k] for k in keys if k in stored.found})
    except chipstore.PartError as exc:
        unit_id = next(u for u, k in pairs if k in stored.found and stored.found[k].part == exc.part)
        raise ImageryError(f"unit {unit_id}: cached chip corrupt: {exc}") from exc
    legacy = _has_legacy_chips(cache_dir)
    datas: list[np.ndarray] = []
    valids: list[np.ndarray] = []
    for unit_id, key in pairs:
        if key in pixels:
            data, valid, outside = pixels[key]
            path = stored.found[key].part
        else:
            path = chip_path(cache_dir, key)
            if not (legacy and path.exists()):
                bad = ""
                if stored.unreadable:
                    bad = f"; or in a corrupt part: {', '.join(f'{p} ({why})' for p, why in stored.unreadable.items())}"
                raise ImageryError(
                    f"unit {unit_id}: cached chip missing: {key} is in no part of {chipstore.parts_dir(cache_dir)}"
                    f"{bad} (re-run chip extraction)"
                )
            try:
                data, valid, _, outside = _load(path)
            except _LOAD_ERRORS as exc:
                raise ImageryError(f"unit {unit_id}: cached chip corrupt: {path}: {exc}") from exc
        if outside:
            raise ImageryError(f"unit {unit_id}: cache marks the unit outside coverage: {path}")
        if datas and data.shape != datas[0].shape:
            raise ImageryError(
                f"unit {unit_id}: chip shape {data.shape} differs from {datas[0].shape}: {path}"
            )
        datas.append(data)
        valids.append(valid)
    if not datas:
        return np.zeros((0, 0, 0, 0), dtype=np.float32), np.zeros((0, 0, 0), dtype=bool)
    return np.stack(datas), np.stack(valids)
