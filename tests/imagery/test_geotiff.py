"""GeoTiffSource: reprojection, nodata rules, coverage, folders and bad files — real rasterio reads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from eocausal.imagery.geotiff import GeoTiffSource, ImageryError, valid_mask
from tests.conftest import from_origin, write_geotiff


def _pixel_id_raster(height: int, width: int) -> np.ndarray:
    """Band 1 = row + 1, band 2 = col + 1: every pixel names itself."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows + 1, cols + 1]).astype(np.uint16)


def _centre(transform, col: float, row: float) -> tuple[float, float]:
    """File coordinates of a (fractional) pixel position."""
    return transform.c + transform.a * col + transform.b * row, transform.f + transform.d * col + transform.e * row


def _lonlat(crs: str, x: float, y: float) -> tuple[float, float]:
    # An independent path (pyproj, not rasterio) from file coordinates to WGS84 lon/lat.
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return lon, lat


# -- reprojection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crs", "origin", "res"),
    [
        ("EPSG:4326", (-54.70, -25.10), 0.0003),  # geographic, degrees
        ("EPSG:32721", (740_000.0, 7_220_000.0), 30.0),  # UTM 21S, metres (southern hemisphere)
        ("EPSG:3857", (-6_090_000.0, -2_890_000.0), 30.0),  # web mercator
    ],
)
@pytest.mark.parametrize("size_px", [9, 8])
def test_chip_is_centred_on_the_units_pixel(make_geotiff, crs, origin, res, size_px):
    height, width = 60, 80
    transform = from_origin(origin[0], origin[1], res, res)
    path = make_geotiff("grid.tif", _pixel_id_raster(height, width), crs, transform)
    source = GeoTiffSource(path)
    row, col = 23, 41
    # A point inside the pixel but off its centre, to catch half-pixel errors.
    x, y = _centre(transform, col + 0.8, row + 0.3)
    lon, lat = _lonlat(crs, x, y)

    chip = source.read_chip(lon, lat, size_px)

    c = size_px // 2
    assert chip is not None
    assert chip.data.shape == (2, size_px, size_px) and chip.data.dtype == np.float32
    assert chip.valid.shape == (size_px, size_px) and chip.valid.dtype == bool
    assert tuple(chip.data[:, c, c]) == (row + 1, col + 1)
    # Orientation: rows go south, columns go east.
    assert tuple(chip.data[:, c + 1, c + 1]) == (row + 2, col + 2)
    assert tuple(chip.data[:, 0, 0]) == (row + 1 - c, col + 1 - c)
    assert chip.valid.all()
    assert chip.source_file == "grid.tif"


def test_partial_chip_at_the_raster_edge_marks_outside_pixels_invalid(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    path = make_geotiff("grid.tif", _pixel_id_raster(20, 20), "EPSG:32633", transform)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 0.5, 0.5))  # the top-left pixel

    chip = GeoTiffSource(path).read_chip(lon, lat, 6)

    assert tuple(chip.data[:, 3, 3]) == (1, 1)
    assert not chip.valid[:3, :].any() and not chip.valid[:, :3].any()
    assert chip.valid[3:, 3:].all()
    assert (chip.data[:, :3, :] == 0).all()


def test_point_outside_the_footprint_gives_none(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    path = make_geotiff("grid.tif", _pixel_id_raster(20, 20), "EPSG:32633", transform)
    source = GeoTiffSource(path)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, -2.0, 5.0))  # two pixels west of the raster

    assert source.read_chip(lon, lat, 8) is None
    assert source.read_chip(-120.0, 45.0, 8) is None  # another continent
    assert source.read_chips([(lon, lat), (-120.0, 45.0)], 8) == [None, None]


# -- nodata ------------------------------------------------------------------------------------


def _scene_with_zero_border() -> np.ndarray:
    data = np.full((3, 16, 16), 500, dtype=np.uint16)
    data[:, :, :4] = 0  # undeclared zero fill: 0 in every band
    data[0, 8, 8] = 0  # dark in one band only: a real pixel
    data[:, 10, 10] = 9999
    return data


def test_undeclared_zero_border_is_detected_when_all_bands_are_zero(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    path = make_geotiff("scene.tif", _scene_with_zero_border(), "EPSG:32633", transform)
    with rasterio.open(path) as src:
        assert src.nodata is None
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    chip = GeoTiffSource(path).read_chip(lon, lat, 16)  # rows/cols 0..15 exactly

    assert not chip.valid[:, :4].any()
    assert chip.valid[:, 4:].all()  # including the single-band zero at (8, 8) and 9999 at (10, 10)
    assert chip.data[0, 8, 8] == 0 and chip.data[1, 8, 8] == 500


def test_declared_nodata_wins_over_zero_detection(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    data = _scene_with_zero_border()
    path = make_geotiff("scene.tif", data, "EPSG:32633", transform, nodata=9999)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    chip = GeoTiffSource(path).read_chip(lon, lat, 16)

    expected = np.ones((16, 16), dtype=bool)
    expected[10, 10] = False
    assert np.array_equal(chip.valid, expected)  # zeros are data when nodata is declared
    assert (chip.data[:, 10, 10] == 0).all()  # invalid pixels read as 0


def test_declared_nodata_zero_is_per_band(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    path = make_geotiff("scene.tif", _scene_with_zero_border(), "EPSG:32633", transform, nodata=0)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    chip = GeoTiffSource(path).read_chip(lon, lat, 16)

    assert not chip.valid[:, :4].any()
    assert not chip.valid[8, 8]  # band 1 declared missing there
    assert chip.valid[10, 10]


def test_nodata_override_replaces_declared_and_zero_rules(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    path = make_geotiff("scene.tif", _scene_with_zero_border(), "EPSG:32633", transform, nodata=0)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    chip = GeoTiffSource(path, nodata=9999).read_chip(lon, lat, 16)

    expected = np.ones((16, 16), dtype=bool)
    expected[10, 10] = False
    assert np.array_equal(chip.valid, expected)


def test_nan_is_invalid_and_scale_offset_are_applied(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    data = np.full((2, 16, 16), 100.0, dtype=np.float32)
    data[1, 3, 5] = np.nan
    path = make_geotiff(
        "float.tif", data, "EPSG:32633", transform, scales=(0.5, 2.0), offsets=(1.0, -10.0)
    )
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    chip = GeoTiffSource(path).read_chip(lon, lat, 16)

    assert not chip.valid[3, 5] and chip.valid.sum() == 16 * 16 - 1
    assert (chip.data[:, 3, 5] == 0).all()
    assert chip.data[0, 0, 0] == pytest.approx(51.0) and chip.data[1, 0, 0] == pytest.approx(190.0)


def test_valid_mask_rules():
    raw = np.array([[[0, 5], [0, 0]], [[0, 0], [7, 0]]], dtype=np.uint16)  # [2, 2, 2]
    assert valid_mask(raw, None).tolist() == [[False, True], [True, False]]
    assert valid_mask(raw, [0, None]).tolist() == [[False, True], [False, False]]


def test_band_selection_and_range_check(make_geotiff):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    data = np.stack([np.full((16, 16), v, dtype=np.uint16) for v in (11, 22, 33)])
    path = make_geotiff("three.tif", data, "EPSG:32633", transform)
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 8.5, 8.5))

    source = GeoTiffSource(path, bands=[3, 1])

    assert source.n_bands == 2
    assert source.read_chip(lon, lat, 4).data[:, 0, 0].tolist() == [33, 11]
    with pytest.raises(ImageryError, match=r"three\.tif.*out of range"):
        GeoTiffSource(path, bands=[4])


# -- folders -----------------------------------------------------------------------------------


def test_folder_of_two_crs_picks_the_file_with_most_valid_pixels(tmp_path):
    """Two files over the same ground, one in UTM 21S, one in WGS84 degrees, each with a
    zero-filled half (undeclared): every point must come from the file that is valid there."""
    folder = tmp_path / "scenes"
    centre_lon, centre_lat = -54.60, -25.30
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32721", always_xy=True)
    cx, cy = to_utm.transform(centre_lon, centre_lat)

    # A: UTM, 200 x 200 px at 30 m around the centre; its WEST half is zero fill.
    utm = np.full((2, 200, 200), 100, dtype=np.uint16)
    utm[:, :, :100] = 0
    write_geotiff(folder / "a_utm.tif", utm, "EPSG:32721", from_origin(cx - 3000, cy + 3000, 30, 30))
    # B: geographic, same ground (~0.06 deg); its EAST half is zero fill.
    geo = np.full((2, 200, 200), 200, dtype=np.uint16)
    geo[:, :, 100:] = 0
    res = 0.0003
    write_geotiff(
        folder / "b_geo.tif", geo, "EPSG:4326", from_origin(centre_lon - 0.03, centre_lat + 0.03, res, res)
    )
    source = GeoTiffSource(folder)
    west = (centre_lon - 0.015, centre_lat)
    east = (centre_lon + 0.015, centre_lat)

    chip_w, chip_e = source.read_chips([west, east], 16)

    assert source.files == ["a_utm.tif", "b_geo.tif"]
    assert chip_w.source_file == "b_geo.tif" and chip_w.valid.all() and (chip_w.data == 200).all()
    assert chip_e.source_file == "a_utm.tif" and chip_e.valid.all() and (chip_e.data == 100).all()
    assert source.read_chip(*west, 16).source_file == "b_geo.tif"  # single reads agree


def test_folder_discovery_is_case_insensitive_and_skips_hidden_files(tmp_path):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    data = np.ones((1, 16, 16), dtype=np.uint16)
    write_geotiff(tmp_path / "B.TIF", data, "EPSG:32633", transform)
    write_geotiff(tmp_path / "a.tiff", data, "EPSG:32633", transform)
    (tmp_path / "._a.tif").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "notes.txt").write_text("not imagery")

    assert GeoTiffSource(tmp_path).files == ["B.TIF", "a.tiff"]


# -- bad input ---------------------------------------------------------------------------------


def test_corrupt_tiff_in_a_folder_is_named(tmp_path):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    write_geotiff(tmp_path / "good.tif", np.ones((1, 16, 16), dtype=np.uint16), "EPSG:32633", transform)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 64)  # a TIFF signature, then junk

    with pytest.raises(ImageryError, match=r"bad\.tif"):
        GeoTiffSource(tmp_path)


def test_truncated_tiff_fails_on_read_naming_the_file(tmp_path):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 60_000, size=(1, 256, 256), dtype=np.uint16)  # incompressible
    path = write_geotiff(tmp_path / "cut.tif", data, "EPSG:32633", transform)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # tiles in the second half are gone
    source = GeoTiffSource(path)  # the header is intact
    lon, lat = _lonlat("EPSG:32633", *_centre(transform, 128, 128))

    with pytest.raises(ImageryError, match=r"cut\.tif"):
        source.read_chip(lon, lat, 256)


def test_folder_without_tiffs_and_missing_path(tmp_path):
    (tmp_path / "readme.txt").write_text("no imagery here")
    with pytest.raises(ImageryError, match="no GeoTIFF"):
        GeoTiffSource(tmp_path)
    with pytest.raises(ImageryError, match="not found"):
        GeoTiffSource(tmp_path / "nowhere")


def test_file_without_crs_is_rejected(tmp_path):
    path = write_geotiff(
        tmp_path / "plain.tif", np.ones((1, 16, 16), dtype=np.uint16), None, from_origin(0, 16, 1, 1)
    )
    with pytest.raises(ImageryError, match=r"plain\.tif.*no CRS"):
        GeoTiffSource(path)


def test_non_geotiff_file_is_rejected(tmp_path):
    from PIL import Image  # noqa: F401  (skip cleanly where Pillow is absent)

    path = tmp_path / "photo.tif"
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    shutil.copyfile(tmp_path / "photo.png", path)
    with pytest.raises(ImageryError, match=r"photo\.tif"):
        GeoTiffSource(path)


# -- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_tracks_content_and_config_not_location(tmp_path):
    transform = from_origin(500_000.0, 4_000_000.0, 30.0, 30.0)
    data = np.ones((2, 16, 16), dtype=np.uint16)
    write_geotiff(tmp_path / "a" / "s.tif", data, "EPSG:32633", transform)
    base = GeoTiffSource(tmp_path / "a").fingerprint()

    assert GeoTiffSource(tmp_path / "a").fingerprint() == base  # stable
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert GeoTiffSource(tmp_path / "moved").fingerprint() == base  # location-independent
    assert GeoTiffSource(tmp_path / "a", nodata=0).fingerprint() != base
    assert GeoTiffSource(tmp_path / "a", bands=[2]).fingerprint() != base

    changed = data.copy()
    changed[0, 0, 0] = 2
    write_geotiff(tmp_path / "a" / "s.tif", changed, "EPSG:32633", transform)
    assert GeoTiffSource(tmp_path / "a").fingerprint() != base
    write_geotiff(tmp_path / "moved" / "t.tif", data, "EPSG:32633", transform)
    assert GeoTiffSource(tmp_path / "moved").fingerprint() != base  # a file added
