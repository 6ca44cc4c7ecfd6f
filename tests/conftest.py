"""Shared fixtures: small real GeoTIFFs written on the fly, and a tiny demo-process study.

Keep fixtures small and fast; build anything large inside the test that needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from eocausal.simulate import write_demo_study, write_procedural_scene

# Runs record into each working folder's own Dagster instance, never into a developer's DAGSTER_HOME.
os.environ.pop("DAGSTER_HOME", None)


@pytest.fixture(autouse=True)
def _failure_logs_in_tmp(tmp_path_factory, monkeypatch):
    """Failure logs of the CLI (eocausal.failures) in the session's temporary folder, not the system's."""
    monkeypatch.setenv("EOCAUSAL_LOG_DIR", str(tmp_path_factory.getbasetemp() / "failure_logs"))


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """A north-up grid (rasterio.transform.from_origin without its Affine deprecation warning)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def write_geotiff(
    path: Path,
    data: np.ndarray,
    crs: str | None,
    transform: Affine,
    nodata: float | None = None,
    scales: tuple[float, ...] | None = None,
    offsets: tuple[float, ...] | None = None,
) -> Path:
    """Write a [C, H, W] array as a tiled GeoTIFF (crs=None writes an ungeoreferenced file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = data.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": data.dtype.name,
        "transform": transform,
        "tiled": True,
        "blockxsize": 16,
        "blockysize": 16,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if scales is not None:
            dst.scales = scales
        if offsets is not None:
            dst.offsets = offsets
    return path


@pytest.fixture
def make_geotiff(tmp_path):
    """Factory: make_geotiff(name, data, crs, transform, nodata=None, ...) -> path in tmp_path."""

    def make(name: str, data: np.ndarray, crs: str | None, transform: Affine, **kwargs) -> Path:
        return write_geotiff(tmp_path / name, data, crs, transform, **kwargs)

    return make


@pytest.fixture(scope="session")
def procedural_scene(tmp_path_factory) -> Path:
    """A 320 x 320 px procedural UTM scene (3 bands, uint16) with a zero-filled border."""
    root = tmp_path_factory.mktemp("procedural_scene")
    return write_procedural_scene(root / "scene.tif", width=320, height=320, seed=7)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, procedural_scene) -> Path:
    """A 200-unit demo-process study on the procedural scene with 32 px chips (study.yaml path).

    Shared by the whole session: do not modify its files; copy the folder first.
    """
    root = tmp_path_factory.mktemp("tiny_study")
    return write_demo_study(root / "study", n_units=200, seed=11, scene=procedural_scene, chip_size_px=32)
