"""Transportability: the image CATE model applied to places the study never reached.

A grid of square cells covers a region (a WGS84 box, or the imagery's footprint); each cell's chip
is cut at its centre from the study's own imagery source, embedded with the study's random
convolutional features (the embedder refitted on the study's chips, which reproduces it exactly),
reduced with the study's PCA, and passed to the DR-learner's image final stage (CATE with a
standard error) and to the effect-cluster model (membership). Cells whose chip is unusable
(outside the imagery, too much nodata) stay empty, with the reason.

What the standard error covers: the sampling error of the fitted CATE projection. It does not
cover the error of extrapolating to images unlike any in the study, so every cell also carries its
distance to the nearest study unit and whether it lies inside the units' convex hull.

Outputs: a table (one row per cell), a float32 GeoTIFF (bands: CATE, its standard error, the most
likely effect cluster; NaN = no prediction), and a PNG map.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from eocausal import atomic
from eocausal.embed.reduce import PCAReduction
from eocausal.estimate.cate import FinalStage
from eocausal.estimate.clusters import ClusterFit
from eocausal.imagery.chips import STATUS_OK, extract_chips, load_chips

# Bump when the transport code changes what it computes.
CODE_VERSION = "transport-2"  # 2: the raster is a COG

TABLE_COLUMNS = [
    "study", "transport_version", "cell_id", "row", "col", "x", "y", "lon", "lat", "status", "reason",
    "cate", "cate_std_error", "cate_ci_low", "cate_ci_high", "cluster", "cluster_membership",
    "distance_to_unit_km", "inside_study_hull", "computed_at",
]


class TransportError(ValueError):
    """A transport region or model that cannot be used; the message says why."""


# --- the region and its grid -------------------------------------------------------------------


@dataclass
class TransportGrid:
    crs_wkt: str
    transform: Affine  # of the output raster: one pixel per cell
    width: int
    height: int
    cells: pd.DataFrame  # cell_id, row, col, x, y, lon, lat

    @property
    def cell_size(self) -> float:
        return float(self.transform.a)


def imagery_footprint(tiff_paths: list[Path]) -> tuple[tuple[float, float, float, float], str]:
    """The WGS84 bounds (west, south, east, north) of the union of GeoTIFFs, and the first's CRS."""
    import rasterio

    if not tiff_paths:
        raise TransportError("no imagery files to take a footprint from")
    boxes, crs_wkt = [], None
    for path in tiff_paths:
        with rasterio.open(path) as src:
            boxes.append(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))
            crs_wkt = crs_wkt or src.crs.to_wkt()
    b = np.asarray(boxes)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())), crs_wkt


def _projected_crs(crs_wkt: str | None, bounds: tuple[float, float, float, float]) -> CRS:
    """The imagery's CRS when it is projected, else the UTM zone of the region's centre."""
    if crs_wkt:
        crs = CRS.from_wkt(crs_wkt)
        if crs.is_projected:
            return crs
    lon = (bounds[0] + bounds[2]) / 2.0
    lat = (bounds[1] + bounds[3]) / 2.0
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def make_grid(
    bounds_wgs84: tuple[float, float, float, float], n_cells: int, crs_wkt: str | None = None
) -> TransportGrid:
    """About ``n_cells`` square cells covering a WGS84 box, in a projected CRS (metres)."""
    west, south, east, north = (float(v) for v in bounds_wgs84)
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise TransportError(
            f"transport region must be [west, south, east, north] in WGS84 degrees with west < east and "
            f"south < north; got {list(bounds_wgs84)}"
        )
    if n_cells < 1:
        raise TransportError(f"the transport grid needs at least one cell, got {n_cells}")
    crs = _projected_crs(crs_wkt, (west, south, east, north))
    minx, miny, maxx, maxy = transform_bounds("EPSG:4326", crs, west, south, east, north, densify_pts=21)
    cell = math.sqrt((maxx - minx) * (maxy - miny) / n_cells)
    width = max(1, int(round((maxx - minx) / cell)))
    height = max(1, int(round((maxy - miny) / cell)))
    # Cells exactly tile the box: the cell size adapts to whole rows and columns.
    cell = max((maxx - minx) / width, (maxy - miny) / height)
    transform = Affine(cell, 0.0, minx, 0.0, -cell, maxy)
    rows, cols = np.mgrid[0:height, 0:width]
    rows, cols = rows.ravel(), cols.ravel()
    xs = minx + (cols + 0.5) * cell
    ys = maxy - (rows + 0.5) * cell
    lons, lats = warp_transform(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    cells = pd.DataFrame({
        "cell_id": [f"C{r:04d}_{c:04d}" for r, c in zip(rows, cols)],
        "row": rows, "col": cols, "x": xs, "y": ys,
        "lon": np.round(np.asarray(lons), 7), "lat": np.round(np.asarray(lats), 7),
    })
    return TransportGrid(crs.to_wkt(), transform, width, height, cells)


# --- the study's image pipeline, applied to new chips -----------------------------------------


def _write_pickle_atomic(obj, path: Path) -> None:
    atomic.write_with(path, lambda fh: pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL))


def check_embedder(embedder, chip_index: pd.DataFrame, chip_cache: Path, reference: tuple[list[str], np.ndarray],
                   n_check: int = 8) -> None:
    """Re-embed the first ``n_check`` units of ``reference`` (unit ids, stored features; their chips
    found in ``chip_index``): a different embedder than the one that made the stored embeddings
    must never silently feed another feature space."""
    ids, stored = reference
    ok = chip_index[chip_index["status"] == STATUS_OK]
    pick = ok[ok["unit_id"].astype(str).isin(list(ids)[:n_check])]
    if not len(pick):
        return
    chips, valid = load_chips(pick, chip_cache)
    again = embedder.transform(chips, valid)
    position = {u: i for i, u in enumerate(ids)}
    expected = np.asarray(stored)[[position[str(u)] for u in pick["unit_id"]]]
    scale = np.abs(expected).max() or 1.0
    if not np.allclose(again, expected, rtol=1e-2, atol=1e-3 * scale, equal_nan=True):
        raise TransportError(
            "the embedder does not reproduce the stored embeddings (max abs difference "
            f"{np.nanmax(np.abs(again - expected)):.3g}); re-materialise image_embeddings"
        )


def fitted_embedder(chip_index: pd.DataFrame, chip_cache: Path, make_embedder, embeddings_version: str,
                    cache_dir: Path, reference: tuple[list[str], np.ndarray] | None = None, n_check: int = 8,
                    check_index: pd.DataFrame | None = None):
    """The study's embedder, fitted exactly as the embedding stage fitted it (the same chips, in
    the same order, same seed: ``chip_index``), cached by the embeddings' version.

    ``make_embedder``: a zero-argument factory for the unfitted embedder (the embedding stage's).
    ``reference``: (unit ids, stored features): the first ``n_check`` units (found in
    ``check_index``, default ``chip_index``) are re-embedded and must match, so a changed
    embedding engine can never silently feed a different feature space.
    """
    path = Path(cache_dir) / f"{embeddings_version}.pkl"
    embedder = None
    if path.exists():
        try:
            with open(path, "rb") as fh:
                embedder = pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            embedder = None  # stale or corrupt cache: refit
    if embedder is None:
        embedder = make_embedder()
        if hasattr(embedder, "fit"):
            chips, valid = load_chips(chip_index, chip_cache)
            embedder.fit(chips, valid)
            del chips, valid
        _write_pickle_atomic(embedder, path)
    if reference is not None and n_check:
        try:
            check_embedder(embedder, chip_index if check_index is None else check_index, chip_cache, reference, n_check)
        except TransportError:
            path.unlink(missing_ok=True)
            raise
    return embedder


def embed_cells(embedder, chip_index: pd.DataFrame, chip_cache: Path, cache_dir: Path, embedder_key: str) -> np.ndarray:
    """Features of the usable cells' chips (index order), cached by embedder + chip keys."""
    ok = chip_index[chip_index["status"] == STATUS_OK]
    if ok.empty:
        return np.zeros((0, 0), dtype=np.float32)
    key = hashlib.sha256(("|".join([embedder_key, *ok["chip_key"].astype(str)])).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.npy"
    if path.exists():
        try:
            features = np.load(path, allow_pickle=False)
            if features.shape[0] == len(ok):
                return features
        except (OSError, ValueError):
            pass
    chips, valid = load_chips(chip_index, chip_cache)
    features = embedder.transform(chips, valid).astype(np.float32)
    atomic.write_with(path, lambda fh: np.save(fh, features), suffix=".npy")
    return features


# --- predictions -----------------------------------------------------------------------------


def predict_grid(
    grid: TransportGrid,
    source,
    *,
    chip_size_px: int,
    max_nodata_share: float,
    chip_cache: Path,
    embedder,
    embedder_key: str,
    embedding_cache: Path,
    pca: PCAReduction,
    final_stage: FinalStage,
    cluster_fit: ClusterFit | None,
    unit_lonlat: np.ndarray,
    study_name: str = "",
    version: str = "",
    computed_at=None,
) -> pd.DataFrame:
    """One row per cell (TABLE_COLUMNS): CATE, SE and cluster membership where the chip is usable."""
    cells = grid.cells
    extraction = extract_chips(
        cells.rename(columns={"cell_id": "unit_id"})[["unit_id", "lat", "lon"]], source, chip_size_px,
        chip_cache, max_nodata_share,
    )
    index = extraction.index
    usable = (index["status"] == STATUS_OK).to_numpy().copy()
    n = len(cells)
    tau = np.full(n, np.nan)
    se = np.full(n, np.nan)
    cluster = np.full(n, -1, dtype=int)
    membership: list[list[float] | None] = [None] * n
    if usable.any():
        features = embed_cells(embedder, index, chip_cache, embedding_cache, embedder_key)
        finite = np.isfinite(features).all(axis=1)
        rows = np.flatnonzero(usable)
        good = rows[finite]
        if len(good):
            components = pca.transform(features[finite])
            tau[good], se[good] = final_stage.predict(components)
            if cluster_fit is not None:
                probs = cluster_fit.membership(components)
                cluster[good] = probs.argmax(axis=1)
                for i, p in zip(good, probs):
                    membership[i] = [float(v) for v in p]
        usable[rows[~finite]] = False
    z = 1.959963984540054
    reason = np.array(index["reason"].where(index["status"] != STATUS_OK, None).tolist(), dtype=object)
    reason[(index["status"] == STATUS_OK).to_numpy() & ~usable] = "no_valid_window"

    distance, inside = _relation_to_units(grid, cells, unit_lonlat)
    computed_at = computed_at or pd.Timestamp.now(tz="UTC").floor("s")
    return pd.DataFrame({
        "study": study_name,
        "transport_version": version,
        "cell_id": cells["cell_id"].to_numpy(),
        "row": cells["row"].to_numpy(dtype=int),
        "col": cells["col"].to_numpy(dtype=int),
        "x": cells["x"].to_numpy(dtype=float),
        "y": cells["y"].to_numpy(dtype=float),
        "lon": cells["lon"].to_numpy(dtype=float),
        "lat": cells["lat"].to_numpy(dtype=float),
        "status": np.where(usable, "ok", "excluded"),
        "reason": reason,
        "cate": tau,
        "cate_std_error": se,
        "cate_ci_low": tau - z * se,
        "cate_ci_high": tau + z * se,
        "cluster": pd.array(np.where(cluster >= 0, cluster, None), dtype="Int64"),
        "cluster_membership": membership,
        "distance_to_unit_km": distance,
        "inside_study_hull": inside,
        "computed_at": computed_at,
    })[TABLE_COLUMNS]


def _relation_to_units(grid: TransportGrid, cells: pd.DataFrame, unit_lonlat: np.ndarray):
    """Distance (km) from each cell centre to the nearest study unit, and whether the centre lies
    inside the units' convex hull."""
    from scipy.spatial import ConvexHull, QhullError, cKDTree

    unit_lonlat = np.asarray(unit_lonlat, dtype=float).reshape(-1, 2)
    n = len(cells)
    if len(unit_lonlat) == 0:
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    ux, uy = warp_transform("EPSG:4326", grid.crs_wkt, unit_lonlat[:, 0].tolist(), unit_lonlat[:, 1].tolist())
    units_xy = np.c_[ux, uy]
    cells_xy = cells[["x", "y"]].to_numpy(dtype=float)
    metres = CRS.from_wkt(grid.crs_wkt).axis_info[0].unit_conversion_factor
    distance = cKDTree(units_xy).query(cells_xy)[0] * metres / 1000.0
    try:
        # Inside the hull = on the inner side of every facet (vectorised; a Delaunay point
        # location walks per point and is slow for points outside).
        equations = ConvexHull(units_xy).equations  # [facets, 3]: normal . x + offset <= 0 inside
        scale = np.abs(units_xy).max()
        inside = (cells_xy @ equations[:, :2].T + equations[:, 2] <= 1e-9 * scale).all(axis=1)
    except (QhullError, ValueError):  # fewer than 3 units, or all on a line
        inside = np.zeros(n, dtype=bool)
    return distance, inside


# --- outputs ---------------------------------------------------------------------------------


def write_geotiff(grid: TransportGrid, table: pd.DataFrame, path: Path) -> Path:
    """Float32 Cloud-Optimised GeoTIFF (GDAL's COG driver: tiled, overviews, deflate), one pixel per
    cell: band 1 CATE, 2 its SE, 3 most likely cluster (NaN = none)."""
    import rasterio

    bands = np.full((3, grid.height, grid.width), np.nan, dtype=np.float32)
    r, c = table["row"].to_numpy(dtype=int), table["col"].to_numpy(dtype=int)
    bands[0, r, c] = table["cate"].to_numpy(dtype=float)
    bands[1, r, c] = table["cate_std_error"].to_numpy(dtype=float)
    bands[2, r, c] = table["cluster"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    with atomic.atomic_path(path, suffix=".tif") as tmp, rasterio.open(
        tmp, "w", driver="COG", width=grid.width, height=grid.height, count=3, dtype="float32",
        crs=grid.crs_wkt, transform=grid.transform, nodata=float("nan"), compress="deflate",
    ) as dst:
        dst.write(bands)
        for i, name in enumerate(("cate", "cate_std_error", "effect_cluster"), start=1):
            dst.set_band_description(i, name)
    return Path(path)


def plot_transport_map(grid: TransportGrid, table: pd.DataFrame, unit_lonlat: np.ndarray, path: Path,
                       title: str = "") -> Path:
    """PNG: :func:`transport_figure` written at ``path``."""
    from eocausal.figures import save_figure

    return save_figure(transport_figure(grid, table, unit_lonlat, title), path, dpi=90)


def transport_figure(grid: TransportGrid, table: pd.DataFrame, unit_lonlat: np.ndarray, title: str = ""):
    """The CATE map and its standard error, study units as dots (a pyplot-free Figure)."""
    from eocausal.figures import new_figure

    cate = np.full((grid.height, grid.width), np.nan)
    se = np.full((grid.height, grid.width), np.nan)
    r, c = table["row"].to_numpy(dtype=int), table["col"].to_numpy(dtype=int)
    cate[r, c] = table["cate"].to_numpy(dtype=float)
    se[r, c] = table["cate_std_error"].to_numpy(dtype=float)
    t = grid.transform
    extent = (t.c / 1000, (t.c + grid.width * t.a) / 1000, (t.f + grid.height * t.e) / 1000, t.f / 1000)
    units = np.asarray(unit_lonlat, dtype=float).reshape(-1, 2)
    if len(units):
        ux, uy = warp_transform("EPSG:4326", grid.crs_wkt, units[:, 0].tolist(), units[:, 1].tolist())
        ux, uy = np.asarray(ux) / 1000, np.asarray(uy) / 1000
    fig = new_figure((10, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, values, label, cmap in (
        (axes[0], cate, "CATE (image model)", "RdYlBu_r"),
        (axes[1], se, "standard error", "viridis"),
    ):
        im = ax.imshow(values, extent=extent, origin="upper", cmap=cmap, interpolation="nearest")
        if len(units):
            ax.scatter(ux, uy, s=2, c="k", alpha=0.35, linewidths=0, label="study units")
        ax.set_title(label)
        ax.set_xlabel("easting (km)")
        ax.set_ylabel("northing (km)")
        fig.colorbar(im, ax=ax, shrink=0.8)
    if len(units):
        axes[0].legend(loc="lower left", fontsize=7, markerscale=4)
    if title:
        fig.suptitle(title)
    return fig
