"""Earth Engine at scale: per-block composites exported as Cloud-Optimised GeoTIFFs, then cut locally.

Opt in with ``imagery.export`` (source ``earthengine`` only). Instead of one ``computePixels``
request per chip, the units' chips are grouped into blocks, each block's composite is exported by
one batch task (``ee.batch.Export.image.toCloudStorage``, ``cloudOptimized``), the tasks are
polled until they finish, and each unit's chip is cut from its block's COG by the GeoTIFF source
(:meth:`eocausal.imagery.geotiff.GeoTiffSource.read_chips_at`).

**Same chips as the interactive path.** A chip's grid is the one :func:`chip_grids` gives (the
unit's UTM zone or the study CRS, pixels aligned to multiples of ``scale_m`` from the CRS origin).
A block is a cell of a fixed lattice on that same pixel grid: ``block_px`` x ``block_px`` centre
pixels, per CRS. Its export grid covers every chip centred in it (the block padded by half a chip
on each side: ``block_px + chip_size_px - 1`` pixels square) on the same lattice, so a chip cut
from the COG is the same pixels, decoded by the same code (:func:`chip_from_stack`), as the chip
``computePixels`` returns: the chip keys (the source's fingerprint) are the interactive path's, and
either path may fill a cache the other reads. Where Earth Engine computes an export's pixels
differently from a request's on the same grid (tiling of a large computation), chips would differ
in those pixels; the fake client computes both identically, and the tests check equality there.

**Blocks and tiles.** A block's export name depends only on the recipe, scale, CRS, chip size,
block size and block index (``<prefix>/<fingerprint[:16]>/<crs>/s<chip>_b<block>/x<bx>_y<by>.tif``):
an export finished by an earlier run, or by the run of a neighbouring tile (a block straddling
quadkey tiles), is found in the bucket and reused instead of exported again. Errors name the
block, the quadkey tiles (:mod:`eocausal.tiles`) of its units and Earth Engine's message.

**Tasks.** At most ``max_tasks_in_flight`` tasks are started and not yet finished; Earth Engine
queues them and runs a few per project at a time. Each is polled every ``poll_interval_s``
(``READY`` -> ``RUNNING`` -> ``COMPLETED``); ``FAILED``/``CANCELLED``, or no finish within
``task_timeout_s``, fails the block. Chips of the blocks that succeed are delivered first; then the
run stops with one :class:`EarthEngineExportError` listing every failed block, so a re-run exports
only those (the others' chips are stored, and their COGs are in the bucket).

The client boundary grows four calls (:class:`EarthEngineExporter`): ``start_export``,
``export_status``, ``export_exists`` and ``fetch_export`` (a local path or http(s) URL of the
finished COG that the GeoTIFF source reads). :class:`~eocausal.imagery.earthengine.EarthEngineApi`
implements them with ``ee.batch`` and Cloud Storage; the tests' fake client runs tasks over polls
and writes real COGs into a local folder standing for the bucket.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.errors import RasterioError

from eocausal.imagery.earthengine import (
    FATAL,
    PERMANENT,
    QUALITY_BANDS,
    ChipDecodeError,
    EarthEngineClient,
    EarthEngineError,
    EarthEngineSource,
    _describe,
    chip_from_stack,
    chip_grids,
    classify_error,
)
from eocausal.imagery.fetching import chip_request
from eocausal.imagery.geotiff import Chip, GeoTiffSource, ImageryError
from eocausal.imagery.sources import ChipFailure

if TYPE_CHECKING:
    from eocausal.study import ImagerySpec, PeriodSpec

log = logging.getLogger(__name__)

# Earth Engine task states (ee.batch.Task.State).
STATE_COMPLETED = "COMPLETED"
FAILED_STATES = ("FAILED", "CANCELLED", "CANCEL_REQUESTED")


class EarthEngineExportError(EarthEngineError):
    """One or more export tasks failed: the message names each block, its tiles and Earth Engine's error."""


class EarthEngineExporter(EarthEngineClient, Protocol):
    """The client boundary of the export path (the real one is ``EarthEngineApi``)."""

    def start_export(self, recipe: Any, grid: dict, bucket: str, object_name: str, description: str) -> str: ...

    def export_status(self, task_id: str) -> dict: ...

    def export_exists(self, bucket: str, object_name: str) -> bool: ...

    def fetch_export(self, bucket: str, object_name: str) -> Any: ...


@dataclass(frozen=True)
class ExportSettings:
    bucket: str
    prefix: str = "eocausal-exports"
    block_px: int = 1024
    poll_interval_s: float = 30.0
    task_timeout_s: float = 6 * 3600.0
    max_tasks_in_flight: int = 20


@dataclass
class ExportStats:
    blocks: int = 0
    tasks_started: int = 0
    exports_reused: int = 0  # found in the bucket: no task
    polls: int = 0
    tasks_failed: int = 0
    chips: int = 0
    seconds: float = 0.0
    start_retries: dict[str, int] = field(default_factory=dict)

    def to_metadata(self) -> dict:
        return {
            "blocks": self.blocks,
            "tasks_started": self.tasks_started,
            "exports_reused": self.exports_reused,
            "polls": self.polls,
            "tasks_failed": self.tasks_failed,
            "chips": self.chips,
            "start_retries": dict(sorted(self.start_retries.items())),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Block:
    """One export: a lattice cell of centre pixels on one CRS's pixel grid."""

    crs: str
    bx: int
    by: int

    @property
    def label(self) -> str:
        return f"{self.crs} x{self.bx} y{self.by}"


def block_of(grid: dict, size_px: int, block_px: int) -> Block:
    """The block holding a chip grid's centre pixel (see :func:`chip_grids`)."""
    t = grid["affineTransform"]
    scale = t["scaleX"]
    half = size_px // 2
    col = round(t["translateX"] / scale) + half  # the unit's pixel, counted from the CRS origin
    row_top = round(t["translateY"] / scale) - half  # its top edge, in pixels
    return Block(grid["crsCode"], math.floor(col / block_px), math.floor(row_top / block_px))


def block_grid(block: Block, size_px: int, block_px: int, scale_m: float) -> dict:
    """The export grid of a block: every chip centred in it, on the chips' pixel lattice."""
    half = size_px // 2
    side = block_px + size_px - 1
    return {
        "dimensions": {"width": side, "height": side},
        "affineTransform": {
            "scaleX": scale_m,
            "shearX": 0.0,
            "translateX": (block.bx * block_px - half) * scale_m,
            "shearY": 0.0,
            "scaleY": -scale_m,
            "translateY": (block.by * block_px + block_px - 1 + half) * scale_m,
        },
        "crsCode": block.crs,
    }


def _tiles_of(points: list[tuple[float, float]]) -> list[str]:
    from eocausal.tiles import assign_tiles

    lons = np.array([p[0] for p in points], dtype=float)
    lats = np.array([p[1] for p in points], dtype=float)
    return [str(t) for t in assign_tiles(lats, lons)]


class EarthEngineExportSource(EarthEngineSource):
    """An Earth Engine source whose chips come from per-block batch exports (``imagery.export``).

    Same recipe, grid, fingerprint (chip keys) and chip decoding as :class:`EarthEngineSource`.
    """

    def __init__(self, *args, export: ExportSettings, clock: Callable[[], float] = time.monotonic, **kwargs):
        super().__init__(*args, **kwargs)
        if export.block_px < 1:
            raise ValueError(f"block_px must be positive, got {export.block_px}")
        self.export = export
        self._clock = clock
        self.export_stats = ExportStats()

    @classmethod
    def from_spec(cls, spec: "ImagerySpec", period: "PeriodSpec", client: EarthEngineClient,
                  **kwargs) -> "EarthEngineExportSource":
        if spec.export is None:
            raise ImageryError("imagery.export is not set: use EarthEngineSource")
        missing = [m for m in ("start_export", "export_status", "export_exists", "fetch_export")
                   if not callable(getattr(client, m, None))]
        if missing:
            raise EarthEngineError(f"imagery.export needs an Earth Engine client that can export; "
                                   f"{type(client).__name__} lacks {missing}")
        e = spec.export
        settings = ExportSettings(bucket=e.bucket, prefix=e.prefix.strip("/"), block_px=e.block_px,
                                  poll_interval_s=e.poll_interval_s, task_timeout_s=e.task_timeout_s,
                                  max_tasks_in_flight=e.max_tasks_in_flight)
        return super().from_spec(spec, period, client, export=settings, **kwargs)  # type: ignore[return-value]

    def check_request_size(self, size_px: int) -> None:
        return  # no computePixels request: an export's size is bounded by block_px instead

    def provenance(self) -> dict:
        out = super().provenance()
        out["mode"] = "export"
        out["export"] = {"bucket": self.export.bucket, "prefix": self.export.prefix,
                         "block_px": self.export.block_px, **self.export_stats.to_metadata()}
        out.pop("fetch", None)
        return out

    def object_name(self, block: Block, size_px: int) -> str:
        crs = block.crs.replace(":", "_")
        return (f"{self.export.prefix}/{self.fingerprint()[:16]}/{crs}/s{size_px}_b{self.export.block_px}/"
                f"x{block.bx}_y{block.by}.tif").lstrip("/")

    # -- fetching -----------------------------------------------------------------------------

    def iter_chips(
        self, points: list[tuple[float, float]], size_px: int
    ) -> Iterator[tuple[int, Chip | ChipFailure | None]]:
        """(index, chip) block by block as exports finish; raises :class:`EarthEngineExportError` at the end
        when any block failed (after delivering every other block's chips)."""
        points, size_px = chip_request(points, size_px)
        if not points:
            return
        grids = chip_grids(points, size_px, self.scale_m, self.crs)
        members: dict[Block, list[int]] = {}
        for i, grid in enumerate(grids):
            members.setdefault(block_of(grid, size_px, self.export.block_px), []).append(i)
        blocks = sorted(members, key=lambda b: (b.crs, b.by, b.bx))
        self.export_stats.blocks += len(blocks)
        log.info("Earth Engine export: %d chips in %d blocks of %d px", len(points), len(blocks), self.export.block_px)
        self._ensure_initialized()
        started = time.perf_counter()
        exporter: Any = self.client
        failures: dict[Block, str] = {}
        queue = deque(blocks)
        running: dict[Block, tuple[str, float]] = {}
        try:
            while queue or running:
                while queue and len(running) < self.export.max_tasks_in_flight:
                    block = queue.popleft()
                    name = self.object_name(block, size_px)
                    try:
                        if self._call(lambda: exporter.export_exists(self.export.bucket, name), block, "look up"):
                            chips = self._cut(block, members[block], grids, size_px)
                            self.export_stats.exports_reused += 1
                        else:
                            running[block] = (self._start(block, size_px), self._clock())
                            continue
                    except EarthEngineExportError as exc:
                        failures[block] = str(exc)
                        continue
                    yield from chips
                if not running:
                    continue
                self._pause(self.export.poll_interval_s, _NEVER)
                for block, (task_id, since) in list(running.items()):
                    status = self._poll(task_id)
                    state = str((status or {}).get("state", "UNKNOWN"))
                    if state == STATE_COMPLETED:
                        del running[block]
                        try:
                            chips = self._cut(block, members[block], grids, size_px)
                        except EarthEngineExportError as exc:
                            failures[block] = f"task {task_id} COMPLETED, but {exc}"
                            continue
                        yield from chips
                    elif state in FAILED_STATES:
                        del running[block]
                        message = " ".join(str(status.get("error_message") or "no error message").split())
                        failures[block] = f"task {task_id} {state}: {message}"
                    elif self._clock() - since > self.export.task_timeout_s:
                        del running[block]
                        failures[block] = (f"task {task_id} not finished after {self.export.task_timeout_s:g} s "
                                           f"(state {state}; imagery.export.task_timeout_s)")
        finally:
            self.export_stats.seconds += time.perf_counter() - started
        if failures:
            self.export_stats.tasks_failed += len(failures)
            raise EarthEngineExportError(self._failure_message(failures, members, points))

    def _failure_message(self, failures: dict[Block, str], members: dict[Block, list[int]],
                         points: list[tuple[float, float]]) -> str:
        # Quadkey tiles as the survey assigns them (eocausal.tiles), over the units asked for in this run:
        # the survey's own tiles when no chip was cached before.
        all_tiles = _tiles_of(points)
        lines = []
        for block, why in sorted(failures.items(), key=lambda kv: (kv[0].crs, kv[0].by, kv[0].bx)):
            idx = members[block]
            tiles = sorted({all_tiles[i] for i in idx})
            shown = ", ".join(tiles[:5]) + (f" and {len(tiles) - 5} more" if len(tiles) > 5 else "")
            lines.append(f"tile {shown} (block {block.label}, {len(idx)} units): {why}")
        total = self.export_stats.blocks
        return (f"Earth Engine export of {len(failures)} of {total} blocks failed ({self.source_label}); the other "
                f"blocks' chips were delivered, and a re-run exports only the failed ones: " + "; ".join(lines))

    def _call(self, fn: Callable[[], Any], block: Block, what: str) -> Any:
        """``fn()`` retried on transient errors; a refusal stops the run, anything else fails the block."""
        last: BaseException | None = None
        for attempt in range(self.retry.max_attempts):
            try:
                return fn()
            except EarthEngineError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = classify_error(exc)
                if kind is None:
                    raise
                if kind == FATAL:
                    raise EarthEngineError(f"Earth Engine refused to {what} the export of block {block.label}: "
                                           f"{_describe(exc)}") from None
                if kind == PERMANENT:
                    raise EarthEngineExportError(f"could not {what} the export: {_describe(exc)}") from None
                last = exc
                kind_name = type(exc).__name__
                self.export_stats.start_retries[kind_name] = self.export_stats.start_retries.get(kind_name, 0) + 1
                if attempt + 1 < self.retry.max_attempts:
                    self._pause(self.retry.delay(attempt, self._rng), _NEVER)
        raise EarthEngineExportError(f"could not {what} the export after {self.retry.max_attempts} attempts; "
                                     f"last error {_describe(last) if last else 'none'}")

    def _start(self, block: Block, size_px: int) -> str:
        grid = block_grid(block, size_px, self.export.block_px, self.scale_m)
        name = self.object_name(block, size_px)
        description = f"eocausal {self.recipe.collection} {self.period_name} {block.label}"
        exporter: Any = self.client
        task_id = self._call(
            lambda: exporter.start_export(self.recipe, grid, self.export.bucket, name, description), block, "start")
        self.export_stats.tasks_started += 1
        log.info("Earth Engine export started: block %s -> gs://%s/%s (task %s)", block.label, self.export.bucket,
                 name, task_id)
        return str(task_id)

    def _poll(self, task_id: str) -> dict | None:
        self.export_stats.polls += 1
        exporter: Any = self.client
        try:
            return exporter.export_status(task_id)
        except Exception as exc:  # noqa: BLE001 - a refusal stops the run; anything else: ask again next poll
            if classify_error(exc) == FATAL:
                raise EarthEngineError(f"Earth Engine refused the status of task {task_id}: {_describe(exc)}") from None
            log.warning("Earth Engine task %s: status unavailable (%s); asking again", task_id, _describe(exc))
            return None

    def _cut(self, block: Block, idx: list[int], grids: list[dict], size_px: int
             ) -> list[tuple[int, Chip | ChipFailure | None]]:
        """The block's chips, cut from its finished COG by the GeoTIFF source (all or none: an
        unreadable export fails the block with :class:`EarthEngineExportError`)."""
        exporter: Any = self.client
        name = self.object_name(block, size_px)
        location = self._call(lambda: exporter.fetch_export(self.export.bucket, name), block, "fetch")
        corners = self._corners(location, block, [grids[i] for i in idx])
        try:
            source = GeoTiffSource(location)
            cut = source.read_chips_at(corners, size_px)
        except ImageryError as exc:
            raise EarthEngineExportError(f"the export of block {block.label} ({name}) is unreadable: {exc}") from None
        out: list[tuple[int, Chip | ChipFailure | None]] = []
        for i, chip in zip(idx, cut):
            try:
                out.append((i, chip_from_stack(chip.data, self.n_bands, self.source_label)))
            except ChipDecodeError as exc:
                raise EarthEngineExportError(f"the export of block {block.label} ({name}): {exc}") from None
        self.export_stats.chips += len(out)
        self.stats.chips += len(out)
        return out

    def _corners(self, location: Any, block: Block, grids: list[dict]) -> list[tuple[int, int]]:
        """Top-left (row, col) of each chip grid in the exported COG, which must lie on the chips' lattice."""
        try:
            with rasterio.open(location) as ds:
                crs, transform, count = ds.crs, ds.transform, ds.count
        except RasterioError as exc:
            raise EarthEngineExportError(f"the export of block {block.label} cannot be opened ({location}): {exc}"
                                         ) from None
        n = self.n_bands + len(QUALITY_BANDS)
        if count != n:
            raise EarthEngineExportError(f"the export of block {block.label} has {count} bands, expected {n}")
        if crs is None or CRS.from_user_input(crs) != CRS.from_user_input(block.crs):
            raise EarthEngineExportError(f"the export of block {block.label} is in {crs}, not {block.crs}")
        s = self.scale_m
        if not (math.isclose(transform.a, s, rel_tol=1e-9) and math.isclose(transform.e, -s, rel_tol=1e-9)
                and transform.b == 0 and transform.d == 0):
            raise EarthEngineExportError(f"the export of block {block.label} has pixels of "
                                         f"{tuple(transform)[:6]}, not {s} m north-up")
        out = []
        for grid in grids:
            t = grid["affineTransform"]
            col = (t["translateX"] - transform.c) / s
            row = (transform.f - t["translateY"]) / s
            if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
                raise EarthEngineExportError(f"the export of block {block.label} is not on the chips' pixel lattice "
                                             f"(offset {col:.3f}, {row:.3f} px)")
            out.append((int(round(row)), int(round(col))))
        return out

    def __repr__(self) -> str:
        return (f"EarthEngineExportSource({self.recipe.collection!r}, period={self.period_name!r}, "
                f"bucket={self.export.bucket!r}, block_px={self.export.block_px})")


class _Never:
    """A stop event that is never set (the export loop waits its full poll interval)."""

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        time.sleep(seconds)
        return False


_NEVER: Any = _Never()

__all__ = [
    "Block",
    "EarthEngineExportError",
    "EarthEngineExportSource",
    "EarthEngineExporter",
    "ExportSettings",
    "ExportStats",
    "block_grid",
    "block_of",
]
