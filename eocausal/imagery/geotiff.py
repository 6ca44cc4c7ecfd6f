"""Local GeoTIFF / COG imagery: one file or a folder of them, in any CRS.

A :class:`GeoTiffSource` turns a unit's WGS84 coordinates into a square chip of pixels centred
on the unit's pixel. Files are opened only while reading (no handles are kept between calls),
so a source can be pickled to another process and used as one partition of a larger job.

Validity of a pixel, in order of precedence:

1. ``nodata`` given to the source: a pixel is invalid when any band equals it;
2. else the file's declared nodata (per band): invalid when any band equals its band's value;
   or the file's internal mask / alpha band, when it has one;
3. else zero-fill detection: invalid when *all* bands are 0 — the undeclared black border of
   many real scenes (e.g. Landsat Level-1 products exported without a nodata tag).

NaN is always invalid. Pixels outside the raster are invalid. Invalid pixels read as 0.

A folder may also hold one-file-per-band scenes (Landsat's ``<scene>_SR_B2.TIF`` ...); they are
stacked into one scene each (see :mod:`eocausal.imagery.bandfiles`), and a scene's
``<scene>_QA_PIXEL.TIF`` gives each chip a cloud share (of its valid pixels).

Reading is windowed (only the tiles under the chips are decompressed, which suits Cloud
Optimized GeoTIFFs): chips close to each other are cut from one read of the window around them,
and windows are visited in row-major order so that each tile is decompressed about once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from eocausal.imagery.bandfiles import (
    QA_S2_SCL,
    BandFileError,
    BandFileScene,
    BandStack,
    aligned_factor,
    group_band_files,
    is_s2_band_file,
)
from eocausal.imagery.remote import (
    DEFAULT_REMOTE_RETRY,
    RemoteFile,
    gdal_env,
    is_url,
    list_folder,
    remote_identity,
    with_retries,
)
from eocausal.imagery.retry import GaveUp, RetryStats

# Bump when the way chips are read changes, so content-addressed caches built on
# :meth:`GeoTiffSource.fingerprint` are invalidated.
READER_VERSION = "geotiff-chip/1"

_TIFF_SUFFIXES = (".tif", ".tiff")


class ImageryError(ValueError):
    """Imagery that cannot be used: the message names the file and the problem."""


@dataclass(frozen=True)
class Chip:
    data: np.ndarray  # float32 [C, H, W]; scale/offset applied; invalid pixels are 0
    valid: np.ndarray  # bool [H, W]
    source_file: str  # file name (relative to the source folder) the chip was read from
    # Share of the chip's observations flagged cloud or cloud shadow; None where not known.
    cloud_share: float | None = None


@dataclass(frozen=True)
class _FileInfo:
    """What the reader needs to know about one file, read once from its header."""

    path: Path
    name: str
    crs_wkt: str
    transform: Affine
    width: int
    height: int
    band_indexes: tuple[int, ...]  # 1-based, the bands this source reads
    nodata: tuple[float | None, ...]  # per read band: declared (or overridden) nodata
    mask_mode: str  # 'nodata' | 'internal_mask' | 'zero_fill'
    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    band_files: tuple[Path, ...] = ()  # a one-file-per-band scene: one file per read band
    qa_file: Path | None = None  # its QA file (Landsat QA_PIXEL, Sentinel-2 SCL: cloud share), if any
    band_factors: tuple[int, ...] = ()  # per band file: its pixel size / the grid's (1 = on the grid)
    qa_factor: int = 1
    qa_kind: str = "landsat_qa_pixel"


def valid_mask(raw: np.ndarray, nodata: Sequence[float | None] | None) -> np.ndarray:
    """Valid pixels of a [C, H, W] block by the nodata rules of this module (no file masks).

    ``nodata`` holds one value (or None) per band; when it is None or holds no value at all the
    zero-fill rule applies (a pixel is invalid when all bands are 0). NaN is always invalid.
    """
    if raw.ndim != 3:
        raise ValueError(f"expected a [C, H, W] array, got shape {raw.shape}")
    values = list(nodata) if nodata is not None else []
    if any(v is not None for v in values):
        if len(values) != raw.shape[0]:
            raise ValueError(f"{len(values)} nodata values for {raw.shape[0]} bands")
        invalid = np.zeros(raw.shape[1:], dtype=bool)
        for band, value in zip(raw, values):
            if value is not None and not math.isnan(value):
                invalid |= band == value
    else:
        invalid = np.all(raw == 0, axis=0)
    if np.issubdtype(raw.dtype, np.floating):
        invalid |= np.isnan(raw).any(axis=0)
    return ~invalid


# Content hashes keyed by (resolved path, inode, size, mtime, ctime): re-hashing a large scene
# for every fingerprint call would dominate a cached re-run. A file modified in the last
# seconds is not cached: a second write within the filesystem's timestamp granularity could
# keep size and mtime (git's "racy clean" problem).
_CONTENT_HASHES: dict[tuple, str] = {}
_CONTENT_HASHES_LOCK = threading.Lock()
_RACY_SECONDS = 2.0


def _content_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    with _CONTENT_HASHES_LOCK:
        cached = _CONTENT_HASHES.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if time.time() - stat.st_mtime_ns / 1e9 > _RACY_SECONDS:
        with _CONTENT_HASHES_LOCK:
            _CONTENT_HASHES[key] = value
    return value


# A bucket of nearby chips is read as one window when that window is at most this many times
# the chips' own area; else chip by chip.
_REGION_MAX_AREA_RATIO = 4


def _cloud_share(cloudy: np.ndarray | None, valid: np.ndarray) -> float | None:
    """Share of a chip's valid pixels flagged cloud/shadow; None without a QA band or valid pixel."""
    if cloudy is None:
        return None
    n_valid = int(valid.sum())
    return float((cloudy & valid).sum() / n_valid) if n_valid else None


def _find_remote_tiffs(url: str) -> list[RemoteFile]:
    """One remote COG, or the GeoTIFFs of a remote folder listing."""
    from urllib.parse import urlsplit

    try:
        if urlsplit(url).path.lower().endswith(_TIFF_SUFFIXES):
            return [RemoteFile(url)]
        files = list_folder(url, _TIFF_SUFFIXES)
    except GaveUp as exc:
        raise ImageryError(f"imagery path {url}: {exc}") from None
    if not files:
        raise ImageryError(f"no GeoTIFF (*.tif, *.tiff) linked from the folder listing {url}")
    return files


def find_imagery_files(location: Path | str) -> list:
    """The files a GeoTIFF source reads: one file, a folder's GeoTIFFs (and Sentinel-2 band files), or a
    remote COG or folder listing (as :class:`~eocausal.imagery.remote.RemoteFile`, which rasterio opens)."""
    return _find_tiffs(location)


def _find_tiffs(path: Path | str) -> list:
    if isinstance(path, str):
        return _find_remote_tiffs(path)
    if not path.exists():
        raise ImageryError(f"imagery path not found: {path}")
    if path.is_file():
        return [path]
    # Top level only; hidden files (e.g. macOS '._x.tif' resource forks) are not imagery. Sentinel-2
    # band files may also be JPEG 2000 and sit in a product's IMG_DATA/R10m, R20m, R60m folders.
    folders = [path] + [path / sub for sub in ("R10m", "R20m", "R60m") if (path / sub).is_dir()]
    files = sorted(
        p
        for folder in folders
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
        and (p.suffix.lower() in _TIFF_SUFFIXES or (p.suffix.lower() == ".jp2" and is_s2_band_file(p.name)))
    )
    if not files:
        raise ImageryError(f"no GeoTIFF (*.tif, *.tiff) found in folder {path}")
    return files


def _open_quietly(path: Path):
    # A missing georeference is reported as an ImageryError naming the file, not as a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


class GeoTiffSource:
    """Chips from one GeoTIFF or a folder of GeoTIFFs (any CRS; nodata may be undeclared).

    Headers are read at construction, so a corrupt or unusable file fails early with an
    :class:`ImageryError` naming it; pixel data is read only by :meth:`read_chip`/:meth:`read_chips`.
    """

    def __init__(self, path: Path | str, nodata: float | None = None, bands: list[int] | None = None,
                 band_names: list[str] | None = None):
        self.remote = is_url(path)
        self.path: Path | str = str(path) if self.remote else Path(path)
        self.band_names = None if band_names is None else [str(b) for b in band_names]
        self.nodata = None if nodata is None else float(nodata)
        self.bands = None if bands is None else [int(b) for b in bands]
        if self.bands is not None and not self.bands:
            raise ImageryError(f"{self.path}: 'bands' is empty; give 1-based band indexes or None")
        self.fetch_stats = RetryStats()  # remote reads: attempts and retries
        files = _find_tiffs(self.path)
        is_folder = len(files) > 1 or (not self.remote and Path(self.path).is_dir())
        try:
            with gdal_env() if self.remote else contextlib.nullcontext():
                plain, scenes = group_band_files(files, self.bands, self.band_names) if is_folder else (files, [])
        except BandFileError as exc:
            raise ImageryError(f"{self.path}: {exc}") from exc
        if self.remote:
            infos = [self._remote_call(lambda f=f: self._read_header(f, f.name), str(f)) for f in plain]
            infos += [self._remote_call(lambda sc=sc: self._read_scene_header(sc), sc.name) for sc in scenes]
        else:
            root = Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent
            infos = [self._read_header(f, f.relative_to(root).as_posix()) for f in plain]
            infos += [self._read_scene_header(scene) for scene in scenes]
        self._files = tuple(sorted(infos, key=lambda info: info.name))
        counts = {len(f.band_indexes) for f in self._files}
        if len(counts) > 1:
            detail = ", ".join(f"{f.name}: {len(f.band_indexes)}" for f in self._files)
            raise ImageryError(f"{self.path}: files read different numbers of bands ({detail})")

    def _read_header(self, path: Path, name: str) -> _FileInfo:
        try:
            with _open_quietly(path) as src:
                if src.driver != "GTiff":
                    raise ImageryError(f"{path}: not a GeoTIFF (GDAL reads it as {src.driver})")
                if src.count == 0:
                    raise ImageryError(f"{path}: the file has zero bands")
                if src.crs is None:
                    raise ImageryError(f"{path}: no CRS (the file is not georeferenced)")
                if src.transform.is_identity:
                    raise ImageryError(f"{path}: no geotransform (the file is not georeferenced)")
                if self.bands is not None:
                    bad = [b for b in self.bands if not 1 <= b <= src.count]
                    if bad:
                        raise ImageryError(
                            f"{path}: band indexes {bad} out of range; the file has {src.count} bands"
                        )
                    band_indexes = tuple(self.bands)
                else:
                    # An alpha band is a mask, not a measurement.
                    band_indexes = tuple(
                        i + 1 for i, ci in enumerate(src.colorinterp) if ci != ColorInterp.alpha
                    ) or tuple(range(1, src.count + 1))
                declared = tuple(src.nodatavals[b - 1] for b in band_indexes)
                flags = src.mask_flag_enums[band_indexes[0] - 1]
                if self.nodata is not None:
                    mask_mode, nodata = "nodata", (self.nodata,) * len(band_indexes)
                elif any(v is not None for v in declared):
                    mask_mode, nodata = "nodata", declared
                elif MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
                    mask_mode, nodata = "internal_mask", (None,) * len(band_indexes)
                else:
                    mask_mode, nodata = "zero_fill", (None,) * len(band_indexes)
                return _FileInfo(
                    path=path,
                    name=name,
                    crs_wkt=src.crs.to_wkt(),
                    transform=src.transform,
                    width=src.width,
                    height=src.height,
                    band_indexes=band_indexes,
                    nodata=nodata,
                    mask_mode=mask_mode,
                    scales=tuple(float(src.scales[b - 1]) for b in band_indexes),
                    offsets=tuple(float(src.offsets[b - 1]) for b in band_indexes),
                )
        except ImageryError:
            raise
        except RasterioError as exc:
            raise ImageryError(f"{path}: cannot open as a GeoTIFF (corrupt or not a TIFF): {exc}") from exc

    def _read_scene_header(self, scene: BandFileScene) -> _FileInfo:
        """Header of a one-file-per-band scene: the band files (and QA file) on one grid.

        Landsat: every file on the same grid. Sentinel-2: the grid of the finest band chosen; a
        coarser band (20 m, 60 m) must lie on the same lattice with whole-multiple pixels, and is
        read by repeating each of its pixels (nearest neighbour).
        """
        headers = []
        for f in scene.band_files:
            try:
                with _open_quietly(f) as src:
                    allowed = ("GTiff", "JP2OpenJPEG") if scene.multi_resolution else ("GTiff",)
                    if src.driver not in allowed or src.crs is None or src.transform.is_identity:
                        raise ImageryError(f"{f}: not a georeferenced GeoTIFF")
                    headers.append((f, src.crs.to_wkt(), src.transform, src.width, src.height, src.res,
                                    src.nodatavals[0], float(src.scales[0]), float(src.offsets[0])))
            except RasterioError as exc:
                raise ImageryError(f"{f}: cannot open as a GeoTIFF (corrupt or not a TIFF): {exc}") from exc
        ref = min(headers, key=lambda h: h[5][0]) if scene.multi_resolution else headers[0]
        grid = (ref[1], ref[2], ref[3], ref[4])
        nodata: list[float | None] = []
        scales: list[float] = []
        offsets: list[float] = []
        factors: list[int] = []
        for (f, crs_wkt, transform, width, height, res, nd, scale, offset), product_scaling in zip(
                headers, scene.product_scaling):
            same = crs_wkt == grid[0] and transform.almost_equals(grid[1]) and (width, height) == grid[2:]
            factor = 1 if same else (aligned_factor(transform, grid[1]) if scene.multi_resolution
                                     and crs_wkt == grid[0] else None)
            if factor is None:
                raise ImageryError(
                    f"{f}: band file on a different grid ({width}x{height} px, {res} m) from {ref[0].name}; "
                    "a scene's bands must share one grid"
                    + (" (or lie on its lattice with whole-multiple pixels)" if scene.multi_resolution else "")
                )
            factors.append(factor)
            nodata.append(self.nodata if self.nodata is not None else nd)
            if (scale, offset) == (1.0, 0.0) and product_scaling is not None:
                scale, offset = product_scaling  # the product's documented scaling
            scales.append(scale)
            offsets.append(offset)
        qa_factor = 1
        if scene.qa_file is not None:
            qa_name = "SCL" if scene.qa_kind == QA_S2_SCL else "QA_PIXEL"
            try:
                with _open_quietly(scene.qa_file) as qa:
                    same = (qa.width, qa.height) == grid[2:] and qa.transform.almost_equals(grid[1])
                    factor = 1 if same else (aligned_factor(qa.transform, grid[1]) if scene.multi_resolution else None)
                    if factor is None:
                        raise ImageryError(f"{scene.qa_file}: {qa_name} file on a different grid from the bands")
                    qa_factor = factor
            except RasterioError as exc:
                raise ImageryError(f"{scene.qa_file}: cannot open as a GeoTIFF: {exc}") from exc
        return _FileInfo(
            path=scene.band_files[0],
            name=scene.name,
            crs_wkt=grid[0],
            transform=grid[1],
            width=grid[2],
            height=grid[3],
            band_indexes=tuple(range(1, len(scene.band_files) + 1)),
            nodata=tuple(nodata),
            mask_mode="nodata" if any(v is not None for v in nodata) else "zero_fill",
            scales=tuple(scales),
            offsets=tuple(offsets),
            band_files=scene.band_files,
            qa_file=scene.qa_file,
            band_factors=tuple(factors),
            qa_factor=qa_factor,
            qa_kind=scene.qa_kind,
        )

    def _remote_call(self, fn, what: str):
        """``fn()`` under GDAL's remote settings and our retry policy (local sources: just ``fn()``)."""
        if not self.remote:
            return fn()

        def attempt():
            with gdal_env():
                return fn()

        try:
            return with_retries(attempt, policy=DEFAULT_REMOTE_RETRY, stats=self.fetch_stats)
        except GaveUp as exc:
            text = str(exc)
            raise ImageryError(text if text.startswith(what) else f"{what}: {text}") from None

    # -- metadata -----------------------------------------------------------------------------

    @property
    def n_bands(self) -> int:
        return len(self._files[0].band_indexes)

    @property
    def files(self) -> list[str]:
        """File names (relative to the source folder), in the order they are tried."""
        return [f.name for f in self._files]

    def fingerprint(self) -> str:
        """A stable content hash of the imagery and of how it is read (sha256 hex).

        Moving or renaming the folder keeps it; changing any file's bytes, adding or removing a
        file, or changing the nodata/bands configuration changes it.
        """
        digest = hashlib.sha256()
        config = {"reader": READER_VERSION, "nodata": self.nodata, "bands": self.bands}
        if self.band_names is not None:
            config["band_names"] = self.band_names
        digest.update(json.dumps(config, sort_keys=True).encode())
        for info in self._files:
            members = info.band_files + ((info.qa_file,) if info.qa_file else ()) if info.band_files else (info.path,)
            for path in members:
                if isinstance(path, RemoteFile):
                    # Size, ETag and Last-Modified from a HEAD request: no download.
                    try:
                        content = remote_identity(path.url, stats=self.fetch_stats)
                    except GaveUp as exc:
                        raise ImageryError(f"{path}: cannot fingerprint the remote file: {exc}") from None
                    digest.update(f"\n{info.name}/{path.name}\0remote\0{content}".encode())
                    continue
                try:
                    size = path.stat().st_size
                    content = _content_sha256(path)
                except OSError as exc:
                    raise ImageryError(f"{path}: cannot read the file to fingerprint it: {exc}") from exc
                # A plain file hashes as before; a scene's member files are named individually.
                name = info.name if not info.band_files else f"{info.name}/{path.name}"
                digest.update(f"\n{name}\0{size}\0{content}".encode())
        return digest.hexdigest()

    # -- reading ------------------------------------------------------------------------------

    def read_chip(self, lon: float, lat: float, size_px: int) -> Chip | None:
        """The size_px x size_px chip centred on the pixel holding (lon, lat) in WGS84.

        The unit's pixel sits at ``[size_px // 2, size_px // 2]``. Returns None when the point
        is outside every file's footprint; of the files covering it, the one giving the most
        valid pixels wins (ties: the first file by name).
        """
        return self.read_chips([(lon, lat)], size_px)[0]

    def read_chips(self, points: Iterable[tuple[float, float]], size_px: int) -> list[Chip | None]:
        """:meth:`read_chip` for many (lon, lat) points, opening each file once for the batch."""
        if int(size_px) != size_px or size_px < 1:
            raise ValueError(f"size_px must be a positive integer, got {size_px!r}")
        size_px = int(size_px)
        points = [(float(lon), float(lat)) for lon, lat in points]
        if not points:
            return []
        lons = [p[0] for p in points]
        lats = [p[1] for p in points]
        chips: list[Chip | None] = [None] * len(points)
        best_valid = [-1] * len(points)
        # File by file (each opened once), keeping for each point the chip with most valid
        # pixels; files are visited in name order and only a strictly better chip replaces, so
        # ties go to the first file by name.
        for info in self._files:
            # Pixel (row, col) of every point in this file; None where the file does not cover it.
            pixels = self._pixels_in_file(info, lons, lats)
            covered = [(k, pixel) for k, pixel in enumerate(pixels) if pixel is not None]
            if not covered:
                continue
            for k, chip in self._read_file(info, covered, size_px):
                n_valid = int(chip.valid.sum())
                if n_valid > best_valid[k]:
                    chips[k], best_valid[k] = chip, n_valid
        return chips

    def read_chips_at(self, corners: Sequence[tuple[int, int]], size_px: int, name: str | None = None) -> list[Chip]:
        """Chips whose top-left pixel (row, col) in one file of the source is given (pixel units).

        For callers that know the file's grid and so need no coordinate lookup (the Earth Engine
        batch export cuts each chip where its fixed grid lies in the exported COG). ``name``: the
        file (default: the source's only file). Reading, bucketing and validity are those of
        :meth:`read_chips`; pixels outside the file are invalid.
        """
        if int(size_px) != size_px or size_px < 1:
            raise ValueError(f"size_px must be a positive integer, got {size_px!r}")
        size_px = int(size_px)
        if name is None and len(self._files) != 1:
            raise ImageryError(f"{self.path}: {len(self._files)} files; name the one to read")
        info = self._files[0] if name is None else next((f for f in self._files if f.name == name), None)
        if info is None:
            raise ImageryError(f"{self.path}: no file named {name!r}; files: {self.files}")
        half = size_px // 2
        covered = [(k, (int(row) + half, int(col) + half)) for k, (row, col) in enumerate(corners)]
        chips: list[Chip | None] = [None] * len(covered)
        for k, chip in self._read_file(info, covered, size_px):
            chips[k] = chip
        return chips  # type: ignore[return-value]

    def _read_file(self, info: _FileInfo, covered: list[tuple[int, tuple[int, int]]], size_px: int):
        """(point index, chip) of one file; a remote file's reads are retried as a whole."""
        def read():
            with self._open(info) as src:
                return list(self._read_windows(src, info, covered, size_px))

        if not self.remote:
            with self._open(info) as src:
                yield from self._read_windows(src, info, covered, size_px)
            return
        yield from self._remote_call(read, str(info.path))

    @classmethod
    def _read_windows(cls, src, info: _FileInfo, covered: list[tuple[int, tuple[int, int]]], size_px: int):
        """(point index, chip) for chips centred on the given pixels of one open file.

        Chips are bucketed by position; a bucket whose chips are dense enough is read as one
        window and sliced (one GDAL call instead of many), others chip by chip. Buckets go in
        row-major order, so neighbouring reads reuse GDAL's cache of decompressed tiles.
        """
        half = size_px // 2
        bucket_px = max(4 * size_px, 256)
        buckets: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
        for k, (row, col) in covered:
            row0, col0 = row - half, col - half
            buckets[(row0 // bucket_px, col0 // bucket_px)].append((k, row0, col0))
        for key in sorted(buckets):
            members = buckets[key]
            r_lo = min(m[1] for m in members)
            c_lo = min(m[2] for m in members)
            n_rows = max(m[1] for m in members) + size_px - r_lo
            n_cols = max(m[2] for m in members) + size_px - c_lo
            if len(members) > 1 and n_rows * n_cols <= _REGION_MAX_AREA_RATIO * len(members) * size_px**2:
                data, valid, cloudy = cls._read_arrays(src, info, r_lo, c_lo, n_rows, n_cols)
                for k, row0, col0 in members:
                    rs = slice(row0 - r_lo, row0 - r_lo + size_px)
                    cs = slice(col0 - c_lo, col0 - c_lo + size_px)
                    chip_valid = valid[rs, cs].copy()
                    yield k, Chip(
                        data=data[:, rs, cs].copy(),
                        valid=chip_valid,
                        source_file=info.name,
                        cloud_share=_cloud_share(None if cloudy is None else cloudy[rs, cs], chip_valid),
                    )
            else:
                for k, row0, col0 in sorted(members, key=lambda m: (m[1], m[2])):
                    yield k, cls._read_block(src, info, row0, col0, size_px, size_px)

    @staticmethod
    def _open(info: _FileInfo):
        try:
            if info.band_files:
                return BandStack(info.band_files, info.qa_file, factors=info.band_factors,
                                 qa_factor=info.qa_factor, qa_kind=info.qa_kind)
            return rasterio.open(info.path)
        except RasterioError as exc:
            raise ImageryError(f"{info.path}: cannot open: {exc}") from exc

    @staticmethod
    def _pixels_in_file(
        info: _FileInfo, lons: list[float], lats: list[float]
    ) -> list[tuple[int, int] | None]:
        # rasterio.warp.transform always takes (x=lon, y=lat) for EPSG:4326 and holds no state.
        try:
            xs, ys = warp_transform("EPSG:4326", info.crs_wkt, lons, lats)
        except RasterioError as exc:
            raise ImageryError(f"{info.path}: cannot transform WGS84 points to its CRS: {exc}") from exc
        inverse = ~info.transform
        out: list[tuple[int, int] | None] = []
        for x, y in zip(xs, ys):
            if not (math.isfinite(x) and math.isfinite(y)):
                out.append(None)
                continue
            # Explicit coefficients: Affine's '*' on points is deprecated and '@' is version-bound.
            col_f = inverse.a * x + inverse.b * y + inverse.c
            row_f = inverse.d * x + inverse.e * y + inverse.f
            row, col = math.floor(row_f), math.floor(col_f)
            inside = 0 <= row < info.height and 0 <= col < info.width
            out.append((row, col) if inside else None)
        return out

    def read_file(self, name: str) -> Chip:
        """One whole file of the source as a single chip (same validity rules as chips)."""
        for info in self._files:
            if info.name == name:
                with self._open(info) as src:
                    return self._read_block(src, info, 0, 0, info.height, info.width)
        raise ImageryError(f"{self.path}: no file named {name!r}; files: {self.files}")

    @classmethod
    def _read_window(cls, src, info: _FileInfo, pixel: tuple[int, int], size_px: int) -> Chip:
        row0 = pixel[0] - size_px // 2
        col0 = pixel[1] - size_px // 2
        return cls._read_block(src, info, row0, col0, size_px, size_px)

    @classmethod
    def _read_block(cls, src, info: _FileInfo, row0: int, col0: int, n_rows: int, n_cols: int) -> Chip:
        data, valid, cloudy = cls._read_arrays(src, info, row0, col0, n_rows, n_cols)
        return Chip(data=data, valid=valid, source_file=info.name, cloud_share=_cloud_share(cloudy, valid))

    @staticmethod
    def _read_arrays(
        src, info: _FileInfo, row0: int, col0: int, n_rows: int, n_cols: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(data float32 [C,H,W], valid bool [H,W], cloudy bool [H,W] or None) of a block."""
        # Read only the part inside the raster and pad: cheaper and more predictable than a
        # GDAL boundless read, and the padding is marked invalid.
        r_lo, r_hi = max(row0, 0), min(row0 + n_rows, info.height)
        c_lo, c_hi = max(col0, 0), min(col0 + n_cols, info.width)
        window = Window(c_lo, r_lo, c_hi - c_lo, r_hi - r_lo)
        try:
            raw = src.read(list(info.band_indexes), window=window)
            file_mask = (
                src.read_masks(info.band_indexes[0], window=window) > 0
                if info.mask_mode == "internal_mask"
                else None
            )
        except RasterioError as exc:
            raise ImageryError(
                f"{info.path}: cannot read pixels (rows {r_lo}-{r_hi}, cols {c_lo}-{c_hi}); "
                f"the file may be truncated or corrupt: {exc}"
            ) from exc
        inner_valid = valid_mask(raw, info.nodata if info.mask_mode == "nodata" else None)
        if file_mask is not None:
            # The file's own mask decides; NaN still counts as invalid.
            inner_valid = file_mask
            if raw.dtype.kind == "f":
                inner_valid = inner_valid & ~np.isnan(raw).any(axis=0)
        values = raw.astype(np.float32)
        if any(s != 1.0 for s in info.scales) or any(o != 0.0 for o in info.offsets):
            scales = np.asarray(info.scales, dtype=np.float32)[:, None, None]
            offsets = np.asarray(info.offsets, dtype=np.float32)[:, None, None]
            values = values * scales + offsets
        values[:, ~inner_valid] = 0.0

        data = np.zeros((len(info.band_indexes), n_rows, n_cols), dtype=np.float32)
        valid = np.zeros((n_rows, n_cols), dtype=bool)
        rs, cs = slice(r_lo - row0, r_hi - row0), slice(c_lo - col0, c_hi - col0)
        data[:, rs, cs] = values
        valid[rs, cs] = inner_valid
        cloudy = None
        if info.qa_file is not None:
            try:
                qa_cloudy = src.read_cloudy(window=window)
            except RasterioError as exc:
                raise ImageryError(f"{info.qa_file}: cannot read QA pixels: {exc}") from exc
            cloudy = np.zeros((n_rows, n_cols), dtype=bool)
            cloudy[rs, cs] = qa_cloudy
        return data, valid, cloudy

    def __repr__(self) -> str:
        return f"GeoTiffSource({str(self.path)!r}, files={len(self._files)}, bands={self.n_bands})"
