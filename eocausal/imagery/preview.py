"""A small RGB picture of a study's local imagery in WGS84 degrees, to draw units over (the report's
unit map).

Each file is read decimated (GDAL reads overviews where the file has them, else samples), its
nodata masked (declared nodata, an internal mask, or an all-zero border), warped to a longitude /
latitude grid of at most ``max_px`` pixels on its long side, mosaicked (the first file by name
wins where files overlap) and stretched per band between its 2nd and 98th percentile. The bands
shown: red, green and blue where the file or the product says which they are (colour
interpretation, band descriptions, Landsat / Sentinel-2 band files), else the first three bands
read in reverse order (blue, green, red in ascending-wavelength products), as the chip panels show
them. Only local GeoTIFFs are previewed: Earth Engine and STAC imagery is fetched per chip, and a
remote file is not read whole for a picture (None).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_TIFF_SUFFIXES = (".tif", ".tiff")
# Per-band file labels of red, green and blue (Landsat 8/9 Collection 2, Sentinel-2).
_RGB_LABELS = (("SR_B4", "SR_B3", "SR_B2"), ("B4", "B3", "B2"), ("B04", "B03", "B02"))


@dataclass(frozen=True)
class ScenePreview:
    rgb: np.ndarray  # float [H, W, 3] in 0..1; nodata is NaN
    extent: tuple[float, float, float, float]  # west, east, south, north (degrees)
    files: tuple[str, ...]  # the files drawn

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.rgb).all(axis=2)


def study_preview(study, max_px: int = 900, around: tuple[float, float, float, float] | None = None):
    """The :class:`ScenePreview` of a study's local GeoTIFF imagery, or None (other sources, or
    nothing readable). ``around`` (west, south, east, north) widens the extent to hold the units."""
    if study.imagery.source != "geotiff" or study.imagery.path is None:
        return None
    location = str(study.imagery.path)
    if "://" in location:
        return None
    try:
        path = study.imagery_path
    except Exception:  # noqa: BLE001 - a picture is never a reason to fail
        return None
    return scene_preview(path, bands=study.imagery.bands, max_px=max_px, around=around)


def _layers(path: Path, bands: list[int] | None) -> list[tuple[str, list[tuple[Path, int]]]]:
    """(name, [(file, band index)] for red, green, blue) per scene, in name order."""
    from eocausal.imagery.bandfiles import group_band_files

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES and not p.name.startswith("."))
    else:
        return []
    try:
        plain, scenes = group_band_files(files, bands) if len(files) > 1 else (files, [])
    except ValueError:
        plain, scenes = files, []
    layers = []
    for f in plain:
        layers.append((f.name, [(f, b) for b in _rgb_bands(f, bands)]))
    for scene in scenes:
        labels = [str(label).upper() for label in scene.band_labels]
        chosen = None
        for names in _RGB_LABELS:
            if all(n in labels for n in names):
                chosen = [scene.band_files[labels.index(n)] for n in names]
                break
        if chosen is None:
            members = list(scene.band_files)
            chosen = (members[:3][::-1] if len(members) >= 3 else members[:1] * 3)
        layers.append((scene.name, [(f, 1) for f in chosen]))
    return layers


def _rgb_bands(path: Path, bands: list[int] | None) -> list[int]:
    import rasterio
    from rasterio.enums import ColorInterp

    with rasterio.open(path) as src:
        interp = {ci: i + 1 for i, ci in enumerate(src.colorinterp)}
        if all(c in interp for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
            return [interp[ColorInterp.red], interp[ColorInterp.green], interp[ColorInterp.blue]]
        names = {str(d).strip().lower(): i + 1 for i, d in enumerate(src.descriptions) if d}
        if all(n in names for n in ("red", "green", "blue")):
            return [names["red"], names["green"], names["blue"]]
        read = [b for b in (bands or range(1, src.count + 1)) if 1 <= b <= src.count]
    if len(read) >= 3:
        return read[:3][::-1]
    return (read[:1] or [1]) * 3


def _footprint(path: Path) -> tuple[float, float, float, float] | None:
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        if src.crs is None:
            return None
        return transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)


def scene_preview(path: Path, bands: list[int] | None = None, max_px: int = 900,
                  around: tuple[float, float, float, float] | None = None) -> ScenePreview | None:
    """A :class:`ScenePreview` of one GeoTIFF or a folder of them (see the module docstring)."""
    try:
        layers = _layers(Path(path), bands)
        boxes = [b for _, members in layers if (b := _footprint(members[0][0])) is not None]
    except Exception as exc:  # noqa: BLE001 - unreadable imagery is the chip stage's to report
        log.info("no imagery preview of %s: %s", path, exc)
        return None
    if not boxes:
        return None
    west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
    east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
    if around is not None:
        west, south = min(west, around[0]), min(south, around[1])
        east, north = max(east, around[2]), max(north, around[3])
    if not (east > west and north > south):
        return None
    # Square ground pixels at the centre latitude.
    aspect = (north - south) / ((east - west) * max(math.cos(math.radians((north + south) / 2)), 1e-6))
    if aspect <= 1:
        width, height = max_px, max(int(round(max_px * aspect)), 1)
    else:
        width, height = max(int(round(max_px / aspect)), 1), max_px
    from rasterio.transform import from_bounds

    dst_transform = from_bounds(west, south, east, north, width, height)
    mosaic = np.full((3, height, width), np.nan, dtype=np.float32)
    drawn = []
    for name, members in layers:
        try:
            layer = _warp_layer(members, dst_transform, width, height, max_px)
        except Exception as exc:  # noqa: BLE001
            log.info("imagery preview: %s skipped: %s", name, exc)
            continue
        empty = ~np.isfinite(mosaic).all(axis=0)
        mosaic[:, empty] = layer[:, empty]
        drawn.append(name)
    if not drawn:
        return None
    rgb = np.full((height, width, 3), np.nan)
    ok = np.isfinite(mosaic).all(axis=0)
    for i in range(3):
        band = mosaic[i]
        if ok.any():
            lo, hi = np.percentile(band[ok], [2, 98])
            rgb[..., i] = np.where(ok, np.clip((band - lo) / max(hi - lo, 1e-9), 0, 1), np.nan)
    return ScenePreview(rgb, (west, east, south, north), tuple(drawn))


def _warp_layer(members: list[tuple[Path, int]], dst_transform, width: int, height: int, max_px: int) -> np.ndarray:
    """The three bands of one scene, read decimated and warped onto the preview grid (NaN = nodata)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    out = np.full((3, height, width), np.nan, dtype=np.float32)
    for i, (path, band) in enumerate(members):
        with rasterio.open(path) as src:
            scale = max(src.width, src.height) / (2 * max_px)
            factor = max(scale, 1.0)
            shape = (max(int(src.height / factor), 1), max(int(src.width / factor), 1))
            data = src.read(band, out_shape=shape, resampling=Resampling.nearest).astype(np.float32)
            mask = src.read_masks(band, out_shape=shape, resampling=Resampling.nearest) > 0
            data = data * float(src.scales[band - 1] or 1.0) + float(src.offsets[band - 1] or 0.0)
            data[~mask] = np.nan
            src_transform = src.transform @ src.transform.scale(src.width / shape[1], src.height / shape[0])
            layer = np.full((height, width), np.nan, dtype=np.float32)
            reproject(source=data, destination=layer, src_transform=src_transform, src_crs=src.crs,
                      src_nodata=np.nan, dst_transform=dst_transform, dst_crs="EPSG:4326", dst_nodata=np.nan,
                      resampling=Resampling.nearest)
            out[i] = layer
    out[:, (out == 0).all(axis=0)] = np.nan  # an undeclared nodata border: zero in every band
    return out
