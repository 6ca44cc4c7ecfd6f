"""Imagery where researchers have it: a COG or a folder listing over HTTP, Sentinel-2 L2A band files.

Remote reads go to a local HTTP server on 127.0.0.1 (range requests, injected 5xx); chips must be
the local file's chips. Sentinel-2 products are written here as delivered: 10 m and 20 m band files
(with B8A and SCL), the L2A metadata with its BOA add-offset, or a SAFE-style R10m/R20m layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from pyproj import Transformer

from eocausal.imagery.geotiff import GeoTiffSource, ImageryError
from eocausal.imagery.sources import open_source
from eocausal.study import StudyError, load_study
from tests.imagery.fake_earthengine import DEMO_CROP
from tests.imagery.http_server import Faults, FileServer
from tests.imagery.stac_catalog import write_cog
from tests.imagery.test_local_rasters import SCENE
from tests.imagery.test_local_rasters import write as write_tiff
from tests.imagery.test_stac import assert_same_chips, unit_points


def write(path: Path, data, transform, crs="EPSG:32621", **profile) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiff(path, data, transform, crs=crs, **profile)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder with the demo crop as a COG, and a Landsat one-file-per-band scene."""
    root = tmp_path_factory.mktemp("remote")
    with rasterio.open(DEMO_CROP) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    write_cog(root / "cog" / "crop.tif", data, crs, transform, blocksize=256)
    window = ((600, 800), (200, 440))
    part = data[:, 600:800, 200:440]
    t = rasterio.windows.transform(window, transform)
    for band, values in zip((2, 3, 4), part):
        write(root / "bands" / f"{SCENE}_SR_B{band}.TIF", values[None], t)
    (root / "bands" / f"{SCENE}_MTL.txt").write_text("GROUP = LANDSAT_METADATA_FILE\n")
    return root


def test_a_remote_cog_gives_the_local_files_chips_through_5xx(served):
    points = unit_points(DEMO_CROP, 40, seed=11)
    with FileServer(served, Faults(only="crop.tif", status_every=5, status=503)) as server:
        url = server.url_of(served / "cog" / "crop.tif")
        remote = GeoTiffSource(url)
        chips = remote.read_chips(points, 32)
        fp1 = remote.fingerprint()
        fp2 = GeoTiffSource(url).fingerprint()
        ranged = server.count("crop.tif", status=206)
        whole = server.count("crop.tif", status=200, method="GET")
    assert_same_chips(chips, GeoTiffSource(served / "cog" / "crop.tif").read_chips(points, 32))
    assert remote.files == ["crop.tif"] and remote.remote
    assert fp1 == fp2  # from HEAD (size, ETag): no download
    assert ranged > 0 and whole == 0
    retries = remote.fetch_stats.to_metadata()["retries"]
    assert retries.get("http_5xx", 0) >= 1 and remote.fetch_stats.gave_up == 0


def test_a_remote_folder_listing_reads_band_file_scenes_with_product_scaling(served):
    points = unit_points(served / "bands" / f"{SCENE}_SR_B2.TIF", 30, seed=12)
    local = GeoTiffSource(served / "bands")
    with FileServer(served) as server:
        remote = GeoTiffSource(server.url + "/bands/")
        chips = remote.read_chips(points, 16)
    assert remote.files == local.files == [SCENE]
    assert_same_chips(chips, local.read_chips(points, 16))
    assert any(c is not None and c.valid.any() for c in chips)
    assert any(c is not None and c.data.max() < 1.0 for c in chips)  # C2 L2 reflectance scaling


def test_remote_errors_name_the_url(served, tmp_path):
    with FileServer(served) as server:
        with pytest.raises(ImageryError, match=r"missing\.tif.*404"):
            GeoTiffSource(server.url + "/cog/missing.tif")
        with pytest.raises(ImageryError, match="no GeoTIFF.*listing"):
            GeoTiffSource(server.url + "/")  # lists only the folders cog/ and bands/


def test_a_study_may_name_an_https_imagery_path(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "units.csv").write_text("id,lat,lon,d,y\n1,0,0,1,1.0\n")
    doc = {"name": "remote", "survey": {"path": "units.csv", "unit_id": "id", "lat": "lat", "lon": "lon",
                                        "treatment": "d", "outcome": "y"},
           "imagery": {"path": "https://data.example.org/scenes/LC08_crop.tif"},
           "analysis": {"feature_sets": ["none", "image"]}}
    (folder / "study.yaml").write_text(yaml.safe_dump(doc))
    study = load_study(folder / "study.yaml")  # the network is not asked when the study is loaded
    assert study.imagery_is_remote and study.imagery_location == "https://data.example.org/scenes/LC08_crop.tif"
    with pytest.raises(StudyError, match="is a URL"):
        study.imagery_path


# -- Sentinel-2 L2A band files ------------------------------------------------------------------

CRS = "EPSG:32721"
T10 = Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 7100000.0)
T20 = Affine(20.0, 0.0, 700000.0, 0.0, -20.0, 7100000.0)
TILE = "T21JYM_20220315T133231"
MTD = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
 <n1:General_Info><Product_Info><PROCESSING_BASELINE>04.00</PROCESSING_BASELINE></Product_Info>
 <Product_Image_Characteristics><QUANTIFICATION_VALUES_LIST>
  <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE></QUANTIFICATION_VALUES_LIST>
  <BOA_ADD_OFFSET_VALUES_LIST>
  {offsets}
  </BOA_ADD_OFFSET_VALUES_LIST></Product_Image_Characteristics></n1:General_Info>
</n1:Level-2A_User_Product>
"""


def _s2_bands(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    bands = {b: rng.integers(1000, 4000, (64, 64), dtype=np.uint16) for b in ("B02", "B03", "B04", "B08")}
    bands.update({b: rng.integers(1000, 4000, (32, 32), dtype=np.uint16) for b in ("B8A", "B11")})
    scl = np.full((32, 32), 4, dtype=np.uint8)
    scl[:8, :] = 9  # cloud over 10 m rows 0..15
    scl[8:10, :] = 3  # its shadow over 10 m rows 16..19
    bands["SCL"] = scl
    return bands


def write_s2(folder: Path, tile: str = TILE, mtd: bool = True, safe_layout: bool = False) -> dict[str, np.ndarray]:
    bands = _s2_bands()
    for label, data in bands.items():
        res = 10 if data.shape[0] == 64 else 20
        sub = folder / (f"R{res}m" if safe_layout else "")
        write(sub / f"{tile}_{label}_{res}m.tif", data[None], T10 if res == 10 else T20, crs=CRS)
        if safe_layout and res == 10:  # a SAFE product also has every 10 m band resampled to 20 m
            write(folder / "R20m" / f"{tile}_{label}_20m.tif", data[None, ::2, ::2], T20, crs=CRS)
    if mtd:
        offsets = "\n".join(f'<BOA_ADD_OFFSET band_id="{i}">-1000</BOA_ADD_OFFSET>' for i in range(13))
        (folder / "MTD_MSIL2A.xml").write_text(MTD.format(offsets=offsets))
    return bands


def _point(row: float, col: float) -> tuple[float, float]:
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(
        700000 + 10 * (col + 0.5), 7100000 - 10 * (row + 0.5))


def test_sentinel2_band_files_on_a_10m_grid_with_b8a_scl_and_boa_offset(tmp_path):
    folder = tmp_path / "s2"
    bands = write_s2(folder)
    src = GeoTiffSource(folder, band_names=["B02", "B8A", "B11"])
    assert src.files == [TILE] and src.n_bands == 3
    [chip] = src.read_chips([_point(12, 33)], 16)  # chip rows 4..19, cols 25..40 of the 10 m grid
    rows, cols = np.arange(4, 20), np.arange(25, 41)
    expected = [bands["B02"][np.ix_(rows, cols)], bands["B8A"][np.ix_(rows // 2, cols // 2)],
                bands["B11"][np.ix_(rows // 2, cols // 2)]]
    for got, want in zip(chip.data, expected):
        np.testing.assert_allclose(got, (want.astype(np.float32) - 1000) / 10000, atol=1e-6)
    assert chip.valid.all()
    assert chip.cloud_share == pytest.approx(16 / 16 * (12 + 4) / 16)  # rows 4..15 cloud, 16..19 shadow
    # Default: the 10 m bands B02, B03, B04, B08.
    assert GeoTiffSource(folder).n_bands == 4


def test_sentinel2_offset_from_the_product_name_or_the_date_and_a_safe_layout(tmp_path, caplog):
    bands = _s2_bands()
    # A SAFE tree (R10m/R20m) named with processing baseline 04.00, no metadata file.
    safe = tmp_path / "S2B_MSIL2A_20220315T133231_N0400_R081_T21JYM_20220315T170000.SAFE" / "IMG_DATA"
    write_s2(safe, mtd=False, safe_layout=True)
    [chip] = GeoTiffSource(safe, band_names=["B04"]).read_chips([_point(40, 40)], 8)
    np.testing.assert_allclose(chip.data[0, 4, 4], (bands["B04"][40, 40] - 1000.0) / 10000, atol=1e-6)
    # Renamed files of a 2021 acquisition, no metadata: no offset (baseline before 04.00), logged.
    old = tmp_path / "old"
    write_s2(old, tile="T21JYM_20210315T133231", mtd=False)
    with caplog.at_level("WARNING"):
        [chip] = GeoTiffSource(old, band_names=["B04"]).read_chips([_point(40, 40)], 8)
    np.testing.assert_allclose(chip.data[0, 4, 4], bands["B04"][40, 40] / 10000.0, atol=1e-6)
    assert "BOA add-offset" in caplog.text


def test_sentinel2_bad_band_requests_are_named(tmp_path):
    folder = tmp_path / "s2"
    write_s2(folder)
    with pytest.raises(ImageryError, match=r"no file for band\(s\) \['B05'\]"):
        GeoTiffSource(folder, band_names=["B02", "B05"])
    # A 20 m band shifted off the 10 m lattice cannot be repeated onto it.
    shifted = tmp_path / "shifted"
    shutil.copytree(folder, shifted)
    write(shifted / f"{TILE}_B8A_20m.tif", np.ones((1, 32, 32), np.uint16), T20 @ Affine.translation(0.25, 0), crs=CRS)
    with pytest.raises(ImageryError, match="B8A_20m.tif: band file on a different grid"):
        GeoTiffSource(shifted, band_names=["B02", "B8A"])


def test_open_source_passes_band_names_for_geotiff_products(tmp_path):
    folder = tmp_path / "study"
    write_s2(folder / "s2")
    (folder / "units.csv").write_text("id,lat,lon,d,y\n1,0,0,1,1.0\n")
    doc = {"name": "s2", "survey": {"path": "units.csv", "unit_id": "id", "lat": "lat", "lon": "lon",
                                    "treatment": "d", "outcome": "y"},
           "imagery": {"path": "s2", "band_names": ["B04", "B03", "B02", "B8A"]},
           "analysis": {"feature_sets": ["none", "image"]}}
    (folder / "study.yaml").write_text(yaml.safe_dump(doc))
    src = open_source(load_study(folder / "study.yaml"))
    assert isinstance(src, GeoTiffSource) and src.n_bands == 4
