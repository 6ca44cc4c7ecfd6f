"""The imagery under the report's unit map: a small RGB in WGS84 degrees, nodata masked."""

from __future__ import annotations

import numpy as np

from eocausal.imagery.preview import scene_preview
from tests.conftest import from_origin


def test_preview_is_rgb_in_degrees_with_nodata_masked(make_geotiff, tmp_path):
    data = np.zeros((4, 200, 300), dtype=np.uint16)
    data[0], data[1], data[2], data[3] = 100, 200, 300, 400  # blue, green, red, nir
    data[:, :, :40] = 0  # an undeclared nodata border
    path = make_geotiff("scene.tif", data, "EPSG:32721", from_origin(740000, 7200000, 30, 30))
    preview = scene_preview(path, bands=[1, 2, 3], max_px=120)
    assert preview is not None and preview.files == ("scene.tif",)
    h, w, c = preview.rgb.shape
    assert c == 3 and max(h, w) == 120
    west, east, south, north = preview.extent
    assert -60 < west < east < -50 and -26 < south < north < -25  # UTM 21S warped to degrees
    assert 0.05 < 1 - preview.valid.mean() < 0.6  # the zero border (and the warp's corners) masked
    assert np.isnan(preview.rgb[:, 0]).all()  # the western border is nodata


def test_no_preview_without_local_imagery(tmp_path):
    assert scene_preview(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert scene_preview(tmp_path / "empty") is None
