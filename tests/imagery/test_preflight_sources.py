"""`eocausal validate` checks the imagery of every source, not only local GeoTIFFs.

STAC: each period's item search (a static catalog on disk, one served over HTTP, a catalog URL
where nothing listens); remote COGs: the headers only, through the local HTTP server, with a 403;
Earth Engine: the fake client accepting, refusing with 401 and 403 at initialisation, and missing a
collection. Every rejection is one line naming the rule and the catalog, URL or variable, with the
documented exit code and no traceback. No network.
"""

from __future__ import annotations

import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from eocausal import failures
from eocausal.cli import main
from eocausal.imagery.preflight import ImageryRejected, check_imagery
from eocausal.study import load_study
from eocausal.survey import load_study_survey
from tests.imagery.fake_earthengine import DEMO_CROP, FakeEarthEngine
from tests.imagery.fake_earthengine import Faults as EeFaults
from tests.imagery.http_server import Faults, FileServer
from tests.imagery.stac_catalog import COLLECTION, Acquisition, cut_catalog
from tests.imagery.test_stac import unit_points

N_INSIDE, OUTSIDE = 16, (3, 8, 13)  # units 3, 8 and 13 far from the crop


def study_folder(folder: Path, imagery: dict) -> Path:
    """A study of 16 units over the demo crop (three of them 10 degrees away), two arms."""
    folder.mkdir(parents=True, exist_ok=True)
    points = unit_points(DEMO_CROP, N_INSIDE, seed=11, margin_px=-60)[:N_INSIDE]
    rows = []
    for i, (lon, lat) in enumerate(points):
        if i in OUTSIDE:
            lon, lat = 10.0, 10.0
        rows.append({"id": f"u{i:02d}", "lat": lat, "lon": lon, "d": i % 2, "y": float(i)})
    pd.DataFrame(rows).to_csv(folder / "units.csv", index=False)
    doc = {"name": "preflight_sources", "survey": {"path": "units.csv", "unit_id": "id", "lat": "lat", "lon": "lon",
                                                   "treatment": "d", "outcome": "y"},
           "imagery": {"chip_size_px": 16, **imagery}, "analysis": {"folds": 2, "feature_sets": ["none", "image"]}}
    (folder / "study.yaml").write_text(yaml.safe_dump(doc))
    return folder / "study.yaml"


def validate(study: Path, capsys) -> tuple[int, str, str]:
    code = main(["validate", str(study)])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_clear_line(err: str) -> str:
    assert "Traceback" not in err and 'File "' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[1].startswith("eocausal: exit code"), err  # the reason, then the log
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- STAC ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    """The crop as 2 x 2 items, May 2020 (5 % cloud) and June 2020 (60 % cloud)."""
    root = tmp_path_factory.mktemp("stac") / "catalog"
    cut_catalog(DEMO_CROP, root, acquisitions=[
        Acquisition(datetime(2020, 5, 18, 13, 30, tzinfo=timezone.utc), cloud_cover=5.0),
        Acquisition(datetime(2020, 6, 3, 13, 30, tzinfo=timezone.utc), cloud_cover=60.0)])
    return root


def stac_study(tmp_path: Path, catalog_dir: Path, **imagery) -> Path:
    shutil.copytree(catalog_dir, tmp_path / "study" / "catalog")
    return study_folder(tmp_path / "study", {"source": "stac", "catalog": "catalog/catalog.json",
                                             "collection": COLLECTION, **imagery})


def test_stac_items_per_period_and_units_outside_the_footprints(tmp_path, capsys, catalog_dir):
    study = stac_study(tmp_path, catalog_dir, periods=[2020, {"name": "june", "start": "2020-06-01",
                                                              "end": "2020-07-01"}])
    code, out, err = validate(study, capsys)
    assert code == 0, err
    assert f"STAC period '2020' (2020-01-01 to 2021-01-01 (end exclusive), no cloud filter): 8 item(s) of " \
           f"'{COLLECTION}'; 3 unit(s) outside their footprints" in out
    assert "STAC period 'june' (2020-06-01 to 2020-07-01 (end exclusive), no cloud filter): 4 item(s)" in out
    assert "13 of 16 units inside the items' footprints in every period" in out
    assert "3 unit(s) outside the imagery, to be excluded (outside_coverage): u03, u08, u13" in out


def test_stac_period_without_items_names_collection_dates_and_cloud_filter(tmp_path, capsys, catalog_dir):
    study = stac_study(tmp_path, catalog_dir, max_cloud_cover=30,
                       periods=[2020, {"name": "june", "start": "2020-06-01", "end": "2020-07-01"}])
    code, _, err = validate(study, capsys)
    assert code == failures.EXIT_INPUT
    line = assert_one_clear_line(err)
    assert "rule 'STAC items in every period' failed: no item of collection 'landsat-c2-l2-test' in period " \
           "'june' (2020-06-01 to 2020-07-01 (end exclusive), eo:cloud_cover <= 30)" in line
    assert "catalog.json" in line


def test_stac_served_over_http_and_a_catalog_url_refusing_connections(tmp_path, capsys, catalog_dir):
    with FileServer(catalog_dir) as server:
        study = study_folder(tmp_path / "a", {"source": "stac", "catalog": server.url_of("catalog.json"),
                                              "collection": COLLECTION, "periods": [2020]})
        code, out, err = validate(study, capsys)
        assert server.count(".tif") == 0  # the search reads the catalog, no pixels
    assert code == 0, err
    assert "8 item(s)" in out and "u03, u08, u13" in out
    url = f"http://127.0.0.1:{free_port()}/stac/catalog.json"
    study = study_folder(tmp_path / "b", {"source": "stac", "catalog": url, "collection": COLLECTION,
                                          "periods": [2020], "max_attempts": 2})
    code, _, err = validate(study, capsys)
    assert code == failures.EXIT_INPUT
    line = assert_one_clear_line(err)
    assert line.startswith("eocausal: imagery rejected: STAC catalog " + url), line
    assert "gave up" in line or "refused" in line.lower(), line


def test_stac_units_all_outside_is_rejected(tmp_path, capsys, catalog_dir):
    shutil.copytree(catalog_dir, tmp_path / "study" / "catalog")
    study = study_folder(tmp_path / "study", {"source": "stac", "catalog": "catalog/catalog.json",
                                              "collection": COLLECTION, "periods": [2020]})
    df = pd.read_csv(tmp_path / "study" / "units.csv")
    df["lon"] += 0.6  # about 60 km east: the search finds nothing there
    df.to_csv(tmp_path / "study" / "units.csv", index=False)
    code, _, err = validate(study, capsys)
    assert code == failures.EXIT_INPUT
    assert "rule 'STAC items in every period' failed" in assert_one_clear_line(err)


# -- remote COGs -----------------------------------------------------------------------------------


def test_remote_cog_headers_only_coverage_crs_and_nodata(tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(DEMO_CROP, served / "scene.tif")
    with FileServer(served) as server:
        study = study_folder(tmp_path / "study", {"source": "geotiff", "path": server.url_of("scene.tif")})
        code, out, err = validate(study, capsys)
        reads = [r for r in server.requests if r.path.endswith("scene.tif") and r.method == "GET"]
    assert code == 0, err
    assert "1 file(s) open as GeoTIFF (scene.tif); CRS EPSG:32621" in out
    assert "headers only (remote files); nodata undeclared (zero fill) (scene.tif); 13 of 16 units inside" in out
    assert "3 unit(s) outside the imagery, to be excluded (outside_coverage): u03, u08, u13" in out
    # the header only: ranged reads, far less than the file
    assert reads and all(r.range for r in reads)
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.range.split("=")[1].split("-") for r in reads))
    assert fetched < DEMO_CROP.stat().st_size / 10


def test_remote_cog_403_is_one_line_naming_the_url(tmp_path, capsys):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(DEMO_CROP, served / "scene.tif")
    with FileServer(served, Faults(only="scene.tif", status_every=1, status=403)) as server:
        url = server.url_of("scene.tif")
        study = study_folder(tmp_path / "study", {"source": "geotiff", "path": url})
        code, _, err = validate(study, capsys)
    assert code == failures.EXIT_INPUT
    line = assert_one_clear_line(err)
    assert line.startswith("eocausal: imagery rejected:") and url in line and "403" in line, line


# -- Earth Engine ----------------------------------------------------------------------------------


def ee_study(tmp_path: Path) -> Path:
    return study_folder(tmp_path / "study", {"source": "earthengine", "collection": "landsat8_sr", "periods": [2019],
                                              "project": "p-test"})


def test_earth_engine_credentials_and_collection_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", "tests.imagery.fake_earthengine:answering")
    code, out, err = validate(ee_study(tmp_path), capsys)
    assert code == 0, err
    assert "Earth Engine credentials accepted (project p-test); collection 'landsat8_sr'" in out
    assert "coverage is global: no per-unit check" in out


@pytest.mark.parametrize("status, words", [
    (401, "Earth Engine answered HTTP 401 (unauthenticated) at initialisation for project p-test"),
    (403, "Earth Engine answered HTTP 403 (permission denied) at initialisation for project p-test"),
])
def test_earth_engine_refusing_credentials_exits_5_naming_them(tmp_path, capsys, monkeypatch, status, words):
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", f"tests.imagery.fake_earthengine:refusing_{status}")
    code, _, err = validate(ee_study(tmp_path), capsys)
    assert code == failures.EXIT_CREDENTIALS
    line = assert_one_clear_line(err)
    assert "rule 'Earth Engine credentials accepted' failed" in line and words in line, line
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line and "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY" in line
    monkeypatch.setenv("EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", "/somewhere/key.json")
    code, _, err = validate(ee_study(tmp_path / "again"), capsys)
    line = assert_one_clear_line(err)
    assert code == failures.EXIT_CREDENTIALS
    assert "the service-account key file named by EOCAUSAL_EE_SERVICE_ACCOUNT_KEY" in line
    assert "/somewhere/key.json" not in line


def test_earth_engine_missing_collection_is_rejected(tmp_path):
    study = load_study(ee_study(tmp_path))
    survey = load_study_survey(study)[0]
    client = FakeEarthEngine(faults=EeFaults(missing_ids={"LANDSAT/LC08/C02/T1_L2"}))
    with pytest.raises(ImageryRejected, match="rule 'Earth Engine collection exists' failed: imagery.collection "
                                              "'landsat8_sr' reads LANDSAT/LC08/C02/T1_L2"):
        check_imagery(study, survey, ee_client=client)
    assert client.initialize_calls == 1 and client.calls == 0  # no pixels asked for
