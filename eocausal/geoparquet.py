"""GeoParquet files of a study's units and estimates, readable by GeoPandas, QGIS, GDAL and DuckDB
spatial.

GeoParquet 1.1: a WKB ``geometry`` column and the ``geo`` key in the Parquet file metadata
(encoding, geometry types, bounding box, CRS as PROJJSON: OGC:CRS84, longitude/latitude on WGS84).
Written with pyarrow alone (no GeoPandas or Shapely needed): points and polygons are encoded here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from eocausal.lake import write_table_atomic

GEOPARQUET_VERSION = "1.1.0"
_WKB_POINT, _WKB_POLYGON = 1, 3


def point_wkb(lon: float, lat: float) -> bytes:
    """A 2D point as little-endian WKB."""
    return struct.pack("<BIdd", 1, _WKB_POINT, float(lon), float(lat))


def polygon_wkb(ring: np.ndarray) -> bytes:
    """A polygon of one ring of (lon, lat) vertices (closed here if it is not) as little-endian WKB."""
    ring = np.asarray(ring, dtype=float).reshape(-1, 2)
    if len(ring) and not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return struct.pack("<BII", 1, _WKB_POLYGON, 1) + struct.pack("<I", len(ring)) + ring.astype("<f8").tobytes()


def read_wkb_point(data: bytes) -> tuple[float, float]:
    """(lon, lat) of a WKB point (either byte order)."""
    order = "<" if data[0] == 1 else ">"
    kind, x, y = struct.unpack(order + "Idd", data[1:21])
    if kind != _WKB_POINT:
        raise ValueError(f"not a WKB point (geometry type {kind})")
    return x, y


def study_area(lon, lat, pad_deg: float = 0.0) -> np.ndarray:
    """The convex hull of the points as a ring of (lon, lat) vertices (their bounding box when they
    are fewer than three or on a line)."""
    points = np.c_[np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)]
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 0:
        return np.zeros((0, 2))
    try:
        from scipy.spatial import ConvexHull, QhullError

        try:
            hull = ConvexHull(points)
            return points[hull.vertices]
        except (QhullError, ValueError):
            pass
    except ImportError:  # pragma: no cover - scipy is a dependency
        pass
    (w, s), (e, n) = points.min(axis=0) - pad_deg, points.max(axis=0) + pad_deg
    return np.array([[w, s], [e, s], [e, n], [w, n]])


def _crs84_projjson() -> dict | None:
    try:
        from pyproj import CRS

        return CRS.from_string("OGC:CRS84").to_json_dict()
    except Exception:  # noqa: BLE001 - omitted, the CRS is OGC:CRS84 by the specification
        return None


def _bbox(geometries: list[bytes]) -> list[float]:
    xs, ys = [], []
    for g in geometries:
        if g is None:
            continue
        order = "<" if g[0] == 1 else ">"
        kind = struct.unpack(order + "I", g[1:5])[0]
        if kind == _WKB_POINT:
            x, y = struct.unpack(order + "dd", g[5:21])
            xs.append(x)
            ys.append(y)
        else:  # one-ring polygon
            n = struct.unpack(order + "I", g[9:13])[0]
            coords = np.frombuffer(g[13:13 + 16 * n], dtype=order + "f8").reshape(-1, 2)
            xs += coords[:, 0].tolist()
            ys += coords[:, 1].tolist()
    if not xs:
        return []
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def geo_table(frame: pd.DataFrame, geometries: list[bytes], geometry_type: str) -> pa.Table:
    """``frame`` with a WKB ``geometry`` column and the GeoParquet ``geo`` metadata."""
    if len(geometries) != len(frame):
        raise ValueError(f"{len(geometries)} geometries for {len(frame)} rows")
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    table = table.append_column("geometry", pa.array(geometries, type=pa.binary()))
    column = {"encoding": "WKB", "geometry_types": [geometry_type], "bbox": _bbox(geometries)}
    crs = _crs84_projjson()
    if crs is not None:
        column["crs"] = crs
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}
    metadata = dict(table.schema.metadata or {})
    metadata[b"geo"] = json.dumps(geo).encode("utf-8")
    return table.replace_schema_metadata(metadata)


def write_points(frame: pd.DataFrame, path: Path, lon: str = "lon", lat: str = "lat") -> Path:
    """One point per row from its ``lon`` / ``lat`` columns (WGS84 degrees); rows without both get
    a null geometry."""
    geometries = [point_wkb(x, y) if np.isfinite(x) and np.isfinite(y) else None
                  for x, y in zip(frame[lon].to_numpy(dtype=float), frame[lat].to_numpy(dtype=float))]
    return write_table_atomic(geo_table(frame, geometries, "Point"), path)


def write_with_area(frame: pd.DataFrame, ring: np.ndarray, path: Path) -> Path:
    """Every row with the same polygon (e.g. the study area an estimate is about)."""
    wkb = polygon_wkb(ring) if len(ring) >= 3 else None
    return write_table_atomic(geo_table(frame, [wkb] * len(frame), "Polygon"), path)
