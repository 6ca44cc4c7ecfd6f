"""Spatial tiles: deterministic cells that give every unit a ``tile`` (the unit of fan-out at scale).

A tile is a Web Mercator quadkey (the Bing Maps tile scheme: one digit 0-3 per zoom level), so
its name says where it is and its parent is its prefix. Units start in the cells of
``START_LEVEL``; a cell holding more than ``max_units`` units is split into its four children,
again and again, down to ``MAX_LEVEL`` at most. The result depends only on the set of unit
coordinates — not on their order — so the same survey always gets the same tiles. Chip keys do
not depend on tiles, so re-tiling (a survey that grew) never refetches imagery.

``MAX_UNITS_PER_TILE`` keeps a tile's partition at a few minutes of chips and embeddings on one
core and a study well under Dagster's advised 100,000 partitions per asset.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_UNITS_PER_TILE", "assign_tiles", "quadkey_bounds"]

MAX_UNITS_PER_TILE = 20_000
START_LEVEL = 2  # 16 cells over the world: never one tile for a whole continent's units
MAX_LEVEL = 23  # ~5 m cells at the equator; units closer than that share a tile whatever its size
_MAX_LATITUDE = 85.05112878  # Web Mercator's limit; units beyond are clamped to it


def _tile_xy(lat: np.ndarray, lon: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    lat = np.clip(np.asarray(lat, dtype=float), -_MAX_LATITUDE, _MAX_LATITUDE)
    lon = np.asarray(lon, dtype=float)
    n = 1 << level
    x = np.floor((lon + 180.0) / 360.0 * n)
    s = np.sin(np.radians(lat))
    y = np.floor((0.5 - np.log((1 + s) / (1 - s)) / (4 * np.pi)) * n)
    return np.clip(x, 0, n - 1).astype(np.int64), np.clip(y, 0, n - 1).astype(np.int64)


def _quadkey(x: int, y: int, level: int) -> str:
    digits = []
    for i in range(level, 0, -1):
        mask = 1 << (i - 1)
        digits.append(str((1 if x & mask else 0) + (2 if y & mask else 0)))
    return "".join(digits)


def assign_tiles(lat, lon, max_units: int = MAX_UNITS_PER_TILE) -> np.ndarray:
    """The quadkey tile of every unit (object array of str), splitting cells above ``max_units``."""
    if max_units < 1:
        raise ValueError(f"max_units must be a positive integer, got {max_units!r}")
    lat = np.asarray(lat, dtype=float)
    lon = np.asarray(lon, dtype=float)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise ValueError("lat and lon must be 1-D arrays of the same length")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise ValueError("lat and lon must be finite")
    x_max, y_max = _tile_xy(lat, lon, MAX_LEVEL)
    level = np.full(lat.shape, START_LEVEL, dtype=np.int64)
    for current in range(START_LEVEL, MAX_LEVEL):
        at = level == current
        if not at.any():
            break
        shift = MAX_LEVEL - current
        cell = (x_max[at] >> shift) * (1 << current) + (y_max[at] >> shift)
        _, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
        crowded = counts[inverse] > max_units
        rows = np.flatnonzero(at)[crowded]
        level[rows] = current + 1
    shift = MAX_LEVEL - level
    x, y = x_max >> shift, y_max >> shift
    names = {}
    out = np.empty(lat.shape, dtype=object)
    for i, key in enumerate(zip(x.tolist(), y.tolist(), level.tolist())):
        name = names.get(key)
        if name is None:
            name = names[key] = _quadkey(*key)
        out[i] = name
    return out


def quadkey_bounds(quadkey: str) -> tuple[float, float, float, float]:
    """(west, south, east, north) in degrees of a quadkey's cell."""
    x = y = 0
    for digit in quadkey:
        if digit not in "0123":
            raise ValueError(f"not a quadkey: {quadkey!r}")
        x, y = 2 * x + (int(digit) & 1), 2 * y + (int(digit) >> 1)
    n = 1 << len(quadkey)

    def lat(row: int) -> float:
        return float(np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * row / n)))))

    return x / n * 360.0 - 180.0, lat(y + 1), (x + 1) / n * 360.0 - 180.0, lat(y)
