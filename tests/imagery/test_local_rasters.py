"""Local rasters as users have them: one file per band, QA cloud masks, COGs, dense chip layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from eocausal.imagery.chips import extract_chips
from eocausal.imagery.geotiff import GeoTiffSource, ImageryError
from eocausal.quality import validate_chip_index
from tests.imagery.fake_earthengine import DEMO_CROP

CRS = "EPSG:32621"
SCENE = "LC08_L2SP_224078_20200518_20200820_02_T1"
SIZE = 16


@pytest.fixture(scope="module")
def crop():
    """A 200 x 240 px window of the shipped Landsat-8 crop (real DNs, 3 bands) and its grid."""
    with rasterio.open(DEMO_CROP) as src:
        window = ((600, 800), (200, 440))
        data = src.read(window=window)
        transform = src.window_transform(window)
    return data, transform


def write(path, data, transform, crs=CRS, **profile):
    count, height, width = data.shape
    options = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name, crs=crs,
                   transform=transform, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    options.update(profile)
    with rasterio.open(path, "w", **options) as dst:
        dst.write(data)
    return path


def lonlat(transform: Affine, col: float, row: float, crs=CRS) -> tuple[float, float]:
    x, y = transform.c + transform.a * col, transform.f + transform.e * row
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)


@pytest.fixture
def band_folder(tmp_path, crop):
    """A Landsat C2 L2 delivery: SR_B2..SR_B4 (real pixels), QA_PIXEL, an auxiliary QA_RADSAT, the MTL."""
    data, transform = crop
    folder = tmp_path / "scene"
    folder.mkdir()
    for band, values in zip((2, 3, 4), data):
        write(folder / f"{SCENE}_SR_B{band}.TIF", values[None], transform)
    qa = np.full(data.shape[1:], 21824, dtype=np.uint16)  # Landsat 'clear, low confidence' value
    qa[:50, :100] |= 1 << 3  # cloud over the top-left block
    qa[50:60, :100] |= 1 << 4  # its shadow
    write(folder / f"{SCENE}_QA_PIXEL.TIF", qa[None], transform)
    write(folder / f"{SCENE}_QA_RADSAT.TIF", np.zeros((1, *data.shape[1:]), np.uint16), transform)
    (folder / f"{SCENE}_MTL.txt").write_text("GROUP = LANDSAT_METADATA_FILE\n")
    return folder, qa


def test_one_file_per_band_reads_as_one_scaled_scene(band_folder, crop, tmp_path):
    folder, _ = band_folder
    data, transform = crop
    stacked = write(tmp_path / "stacked.tif", data, transform)
    with rasterio.open(stacked, "r+") as ds:  # the same pixels with the product's scaling as tags
        ds.scales, ds.offsets = (0.0000275,) * 3, (-0.2,) * 3

    by_band = GeoTiffSource(folder)
    multi = GeoTiffSource(stacked)

    assert by_band.files == [SCENE] and by_band.n_bands == 3
    points = [lonlat(transform, c + 0.5, r + 0.5) for c, r in [(20, 30), (120, 100), (235, 190), (60, 55)]]
    for a, b in zip(by_band.read_chips(points, SIZE), multi.read_chips(points, SIZE)):
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.data, b.data, rtol=1e-6)
        assert a.source_file == SCENE and b.cloud_share is None
    assert abs(float(by_band.read_chips(points[:1], SIZE)[0].data.mean())) < 1.0  # reflectance, not DNs


def test_bands_name_band_numbers_in_a_band_per_file_scene(band_folder, crop):
    folder, _ = band_folder
    data, transform = crop
    point = lonlat(transform, 100.5, 120.5)
    chip = GeoTiffSource(folder, bands=[4, 2]).read_chip(*point, SIZE)
    full = GeoTiffSource(folder).read_chip(*point, SIZE)
    np.testing.assert_array_equal(chip.data, full.data[[2, 0]])
    with pytest.raises(ImageryError, match=r"no file for band number\(s\) \[7\].*\[2, 3, 4\]"):
        GeoTiffSource(folder, bands=[7])


def test_qa_pixel_gives_each_chip_its_cloud_share(band_folder, crop, tmp_path):
    folder, qa = band_folder
    _, transform = crop
    source = GeoTiffSource(folder)
    clear = source.read_chip(*lonlat(transform, 150.5, 150.5), SIZE)
    assert clear.cloud_share == 0.0
    # A chip across the shadow's lower edge: rows 52-67 of columns 72-87, 8 of them shadow.
    edge = source.read_chip(*lonlat(transform, 80.5, 60.5), SIZE)
    expected = ((qa[52:68, 72:88] & 0b11110) != 0).mean()
    assert expected == 0.5 and edge.cloud_share == pytest.approx(expected)

    units = pd.DataFrame([{"unit_id": "clear", **dict(zip(["lon", "lat"], lonlat(transform, 150.5, 150.5)))},
                          {"unit_id": "edge", **dict(zip(["lon", "lat"], lonlat(transform, 80.5, 60.5)))}])
    index = extract_chips(units, source, SIZE, tmp_path / "cache", 0.2).index.set_index("unit_id")
    assert index.loc["edge", "cloud_share"] == pytest.approx(expected)
    again = extract_chips(units, source, SIZE, tmp_path / "cache", 0.2)  # from the cache: the same
    assert again.n_cached == 2 and again.index.set_index("unit_id").loc["edge", "cloud_share"] == pytest.approx(expected)


def test_a_band_on_another_grid_is_left_out_by_default_and_refused_when_asked_for(band_folder, crop):
    folder, _ = band_folder
    data, transform = crop
    pan = np.repeat(np.repeat(data[:1], 2, axis=1), 2, axis=2)  # a 15 m panchromatic band
    write(folder / f"{SCENE}_SR_B8.TIF", pan, transform * Affine.scale(0.5))
    assert GeoTiffSource(folder).n_bands == 3
    with pytest.raises(ImageryError, match="different grid"):
        GeoTiffSource(folder, bands=[2, 8])


def test_fingerprint_covers_every_band_file_and_the_qa_file(band_folder, crop):
    folder, qa = band_folder
    data, transform = crop
    before = GeoTiffSource(folder).fingerprint()
    write(folder / f"{SCENE}_QA_PIXEL.TIF", (qa | 1 << 3)[None], transform)
    after_qa = GeoTiffSource(folder).fingerprint()
    write(folder / f"{SCENE}_SR_B3.TIF", (data[1:2] + 1).astype(np.uint16), transform)
    after_band = GeoTiffSource(folder).fingerprint()
    assert len({before, after_qa, after_band}) == 3


def test_cloud_optimized_geotiff_is_read_by_windows(crop, tmp_path):
    data, transform = crop
    cog = write(tmp_path / "scene_cog.tif", data, transform, driver="COG", blocksize=64, overviews="AUTO")
    with rasterio.open(cog) as ds:
        assert ds.driver == "GTiff" and ds.overviews(1)  # a COG: tiled, with overviews
    plain = write(tmp_path / "plain.tif", data, transform)
    points = [lonlat(transform, c + 0.5, r + 0.5) for c, r in [(10, 10), (200, 150), (239, 199)]]
    for a, b in zip(GeoTiffSource(cog).read_chips(points, SIZE), GeoTiffSource(plain).read_chips(points, SIZE)):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.valid, b.valid)


def test_dense_chips_cut_from_one_window_equal_chips_read_one_by_one(crop, tmp_path):
    data, transform = crop
    data = data.copy()
    data[:, :20, :] = 0  # an undeclared nodata edge inside the dense cluster
    path = write(tmp_path / "dense.tif", data, transform)
    source = GeoTiffSource(path)
    rng = np.random.default_rng(0)
    pixels = [(c, r) for c, r in zip(rng.uniform(-10, 80, 60), rng.uniform(-10, 60, 60))]  # overlapping, some off the edge
    points = [lonlat(transform, c, r) for c, r in pixels]

    together = source.read_chips(points, SIZE)
    for point, chip in zip(points, together):
        alone = source.read_chip(*point, SIZE)  # a bucket of one: read by itself
        if alone is None:
            assert chip is None
            continue
        np.testing.assert_array_equal(chip.data, alone.data)
        np.testing.assert_array_equal(chip.valid, alone.valid)
    assert sum(c is None for c in together) > 0 and sum(c is not None for c in together) > 40


def test_chip_quality_suite_checks_cloud_share_and_reasons():
    index = pd.DataFrame({
        "unit_id": ["a", "b", "c", "d"],
        "chip_key": ["k1", "k2", None, None],
        "status": ["ok", "ok", "excluded", "excluded"],
        "reason": [None, None, "fetch_failed", "outside_coverage"],
        "valid_share": [1.0, 0.9, 0.0, 0.0],
        "source_file": ["x", "x", None, None],
        "cloud_share": [0.2, float("nan"), float("nan"), float("nan")],
        "detail": [None, None, "HTTP 400: bad band", None],
    })
    assert validate_chip_index(index, 0.2).success
    broken = index.copy()
    broken.loc[0, "cloud_share"] = 1.5
    broken.loc[3, "reason"] = "gremlins"
    report = validate_chip_index(broken, 0.2)
    rules = {f.rule: f.unit_ids for f in report.failures}
    assert rules["cloud_share within [0, 1]"] == ["a"]
    assert [u for r, u in rules.items() if r.startswith("excluded units have a reason")] == [["d"]]
