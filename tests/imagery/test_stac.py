"""STAC source: static catalogs (on disk and over HTTP), a fake STAC API, composites, faults.

The catalogs are COG items cut from the shipped Landsat-8 crop (and the shared scene it was cut
from); a local HTTP server on 127.0.0.1 serves them with range requests and injected 5xx and slow
responses. A chip from the STAC source must be byte for byte the GeoTIFF source's on the same pixels.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from pyproj import Transformer

from eocausal.imagery.chips import extract_chips, load_chips
from eocausal.imagery.geotiff import GeoTiffSource
from eocausal.imagery.retry import RetryPolicy
from eocausal.imagery.sources import ChipFailure, open_source
from eocausal.imagery.stac import StacError, StacSource
from eocausal.study import StudyError, load_study
from tests.imagery.fake_earthengine import DEMO_CROP
from tests.imagery.http_server import Faults, FileServer
from tests.imagery.stac_catalog import COLLECTION, Acquisition, cut_catalog, item_dicts

SHARED_SCENE = Path(__file__).resolve().parents[3] / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
MAY_2020 = datetime(2020, 5, 18, 13, 30, tzinfo=timezone.utc)
FAST_RETRY = RetryPolicy(max_attempts=6, initial_delay_s=0.01, max_delay_s=0.05)


def unit_points(scene: Path, n: int, seed: int, margin_px: float = 10.0) -> list[tuple[float, float]]:
    """Random (lon, lat) over a scene (some just outside it), plus points on the 2x2 tile seams."""
    with rasterio.open(scene) as src:
        t, w, h, crs = src.transform, src.width, src.height, src.crs
    rng = np.random.default_rng(seed)
    cols = list(rng.uniform(-margin_px, w + margin_px, n)) + [w / 2, w / 2 - 0.5, 100.0, w - 0.1]
    rows = list(rng.uniform(-margin_px, h + margin_px, n)) + [h / 3, h / 2 + 0.2, h / 2 - 0.1, 10.0]
    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return [to_wgs84.transform(t.c + t.a * c, t.f + t.e * r) for c, r in zip(cols, rows)]


def assert_same_chips(stac_chips, tiff_chips):
    assert len(stac_chips) == len(tiff_chips)
    for k, (a, b) in enumerate(zip(stac_chips, tiff_chips)):
        assert (a is None) == (b is None), f"unit {k}: coverage differs"
        if a is None:
            continue
        assert a.data.dtype == b.data.dtype == np.float32
        assert a.data.tobytes() == b.data.tobytes(), f"unit {k}: pixels differ"
        assert np.array_equal(a.valid, b.valid), f"unit {k}: validity differs"


@pytest.fixture(scope="module")
def crop_catalog(tmp_path_factory) -> Path:
    """The demo crop cut into 2 x 2 items of three single-band COGs each (blue, green, red)."""
    return cut_catalog(DEMO_CROP, tmp_path_factory.mktemp("stac") / "catalog")


def source(catalog, **kwargs) -> StacSource:
    kwargs.setdefault("retry", FAST_RETRY)
    return StacSource(str(catalog), COLLECTION, "2020", date(2020, 1, 1), date(2021, 1, 1), **kwargs)


# -- the same bytes as the GeoTIFF source ---------------------------------------------------------


def test_local_static_catalog_gives_the_geotiff_sources_chips(crop_catalog):
    points = unit_points(DEMO_CROP, 60, seed=1)
    stac = source(crop_catalog)
    chips = stac.read_chips(points, 32)
    assert_same_chips(chips, GeoTiffSource(DEMO_CROP).read_chips(points, 32))
    assert sum(c is None for c in chips) >= 1  # some units outside the scene
    assert stac.stats.items == 4 and stac.stats.reads.retries == {}
    assert all(c is None or c.source_file == f"stac:{COLLECTION}/2020" for c in chips)


@pytest.mark.skipif(not SHARED_SCENE.exists(), reason="shared Landsat scene not available")
def test_shared_scene_catalog_over_http_gives_the_geotiff_sources_chips(tmp_path):
    catalog = cut_catalog(SHARED_SCENE, tmp_path / "catalog", tiles=(2, 3), with_proj=False)
    points = unit_points(SHARED_SCENE, 25, seed=2)
    with FileServer(tmp_path / "catalog") as server:
        stac = source(f"{server.url}/catalog.json")
        chips = stac.read_chips(points, 24)
        ranged = server.count(".tif", status=206)
        whole = server.count(".tif", status=200, method="GET")
    assert_same_chips(chips, GeoTiffSource(SHARED_SCENE).read_chips(points, 24))
    assert stac.stats.items == 6
    assert ranged > 0 and whole == 0  # windows, never whole files
    assert catalog.exists()


def test_http_reads_retry_5xx_and_slow_responses_and_match(crop_catalog):
    """Every 7th COG request answers 503 and two are slower than the timeout: all chips still match."""
    root = crop_catalog.parent
    points = unit_points(DEMO_CROP, 30, seed=3)
    faults = Faults(only=".tif", status_every=7, status=503, delay_at={3: 0.3, 11: 2.5, 19: 2.5})
    with FileServer(root, faults) as server:
        # Every 7th request fails whichever thread sends it, and a chip's attempt is several range
        # requests, so under some interleavings one chip meets a 503 on 6 attempts running (seen
        # once in CI): 12 attempts keep the test about recovery, not about the scheduler.
        stac = source(server.url_of(crop_catalog), request_timeout_s=1.0, max_concurrency=4,
                      retry=RetryPolicy(max_attempts=12, initial_delay_s=0.01, max_delay_s=0.05))
        chips = stac.read_chips(points, 32)
        n_503 = server.count(".tif", status=503)
    assert not any(isinstance(c, ChipFailure) for c in chips)
    assert_same_chips(chips, GeoTiffSource(DEMO_CROP).read_chips(points, 32))
    reads = stac.stats.reads.to_metadata()
    assert n_503 >= 3
    assert reads["retries"].get("http_5xx", 0) >= 1 and reads["gave_up"] == 0
    assert reads["attempts"] > sum(reads["retries"].values())


def test_a_missing_asset_fails_the_chip_with_the_url_and_is_not_retried(crop_catalog, tmp_path):
    catalog = cut_catalog(DEMO_CROP, tmp_path / "cat", tiles=(1, 1))
    (tmp_path / "cat" / COLLECTION / "T00_20200518" / "green.tif").unlink()
    with FileServer(tmp_path / "cat") as server:
        stac = source(server.url_of(catalog))
        [chip] = stac.read_chips(unit_points(DEMO_CROP, 1, seed=4, margin_px=-100)[:1], 16)
        n_404 = server.count("green.tif", status=404)
    assert isinstance(chip, ChipFailure)
    assert "green.tif" in chip.detail and "404" in chip.detail
    assert n_404 >= 1 and stac.stats.reads.gave_up == 1 and stac.stats.reads.retries == {}  # 404: no retry


# -- a STAC API (item search through pystac-client) -----------------------------------------------


@pytest.fixture
def api_catalog(tmp_path):
    """Three acquisitions of the crop (1 x 2 tiles): May (clear), June (60 % cloud), 2019 (out of period)."""
    acquisitions = [
        Acquisition(MAY_2020, cloud_cover=5.0),
        Acquisition(datetime(2020, 6, 3, 13, 30, tzinfo=timezone.utc), cloud_cover=60.0,
                    values=lambda d: np.where(d > 0, d + 500, 0).astype(d.dtype)),
        Acquisition(datetime(2019, 5, 18, 13, 30, tzinfo=timezone.utc), cloud_cover=1.0,
                    values=lambda d: np.where(d > 0, d + 9000, 0).astype(d.dtype)),
    ]
    root = tmp_path / "api"
    catalog = cut_catalog(DEMO_CROP, root, tiles=(1, 2), acquisitions=acquisitions)
    return root, catalog


def test_stac_api_search_with_cloud_filter_and_paging(api_catalog):
    root, catalog = api_catalog
    points = unit_points(DEMO_CROP, 12, seed=5)
    with FileServer(root, Faults(only="/api/search", status_at={1: 502})) as server:
        api = server.mount_api(item_dicts(catalog, server.url, root),
                               [{"type": "Collection", "id": COLLECTION, "stac_version": "1.0.0", "description": "t",
                            "license": "proprietary", "links": [],
                            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                       "temporal": {"interval": [[None, None]]}}}])
        stac = StacSource(api.url, COLLECTION, "may-jun", date(2020, 5, 1), date(2020, 7, 1), retry=FAST_RETRY,
                          max_cloud_cover=20.0)
        chips = stac.read_chips(points, 16)
        all_items = StacSource(api.url, COLLECTION, "may-jun", date(2020, 5, 1), date(2020, 7, 1),
                               retry=FAST_RETRY, max_items=10)
        all_items.items((-180.0, -90.0, 180.0, 90.0))
        searches = list(api.searches)
    # The search went to the API with the collection, the period (end-exclusive) and the cloud filter.
    first = searches[-2] if len(searches) >= 2 else searches[0]
    assert searches[0]["collections"] == [COLLECTION]
    assert searches[0]["datetime"].startswith("2020-05-01T00:00:00Z/2020-06-30T23:59:59")
    assert searches[0]["query"] == {"eo:cloud_cover": {"lte": 20.0}}
    assert first is not None
    assert stac.stats.search.to_metadata()["retries"] == {"http_5xx": 1}
    # Only May's clear items remain: the chips are the crop's own pixels.
    assert stac.stats.items == 2
    assert_same_chips(chips, GeoTiffSource(DEMO_CROP).read_chips(points, 16))
    # Without the filter both months' 4 items are found (paged through 'next' links).
    assert all_items.stats.items == 4
    assert sum(1 for s in searches if s.get("token")) >= 1  # pages beyond the first


def test_too_many_items_is_an_error_naming_the_limit(api_catalog):
    root, catalog = api_catalog
    with FileServer(root) as server:
        server.mount_api(item_dicts(catalog, server.url, root), [])
        stac = StacSource(f"{server.url}/api", COLLECTION, "2020", date(2020, 1, 1), date(2021, 1, 1),
                          retry=FAST_RETRY, max_items=1)
        with pytest.raises(StacError, match="max_items=1"):
            stac.items((-180.0, -90.0, 180.0, 90.0))


# -- composites --------------------------------------------------------------------------------


def _qa(cloud_rows: slice):
    def make(shape):
        qa = np.full(shape, 21824, dtype=np.uint16)  # Landsat C2 'clear'
        qa[cloud_rows, :] |= 1 << 3  # cloud
        return qa
    return make


def test_median_of_clear_observations_with_qa_pixel_masks(tmp_path):
    """Three dates (+0, +100, +200 DN); clouds on the top half of date 2 and on all of date 3's top quarter."""
    with rasterio.open(DEMO_CROP) as src:
        h = src.height
    acquisitions = [
        Acquisition(datetime(2020, 3, 1, tzinfo=timezone.utc), qa=_qa(slice(0, 0))),
        Acquisition(datetime(2020, 4, 1, tzinfo=timezone.utc), qa=_qa(slice(0, h // 2)),
                    values=lambda d: np.where(d > 0, d + 100, 0).astype(d.dtype)),
        Acquisition(datetime(2020, 5, 1, tzinfo=timezone.utc), qa=_qa(slice(0, h // 4)),
                    values=lambda d: np.where(d > 0, d + 200, 0).astype(d.dtype)),
    ]
    catalog = cut_catalog(DEMO_CROP, tmp_path / "cat", tiles=(1, 1), acquisitions=acquisitions)
    with rasterio.open(DEMO_CROP) as src:
        t, w = src.transform, src.width
    to_wgs84 = Transformer.from_crs("EPSG:32621", "EPSG:4326", always_xy=True)
    top = to_wgs84.transform(t.c + t.a * (w / 2), t.f + t.e * (h / 8))  # cloudy on dates 2 and 3
    middle = to_wgs84.transform(t.c + t.a * (w / 2), t.f + t.e * (3 * h / 8))  # cloudy on date 2
    bottom = to_wgs84.transform(t.c + t.a * (w / 2), t.f + t.e * (7 * h / 8))  # clear on all
    stac = source(catalog)
    chip_top, chip_mid, chip_bottom = stac.read_chips([top, middle, bottom], 16)
    base = GeoTiffSource(DEMO_CROP).read_chips([top, middle, bottom], 16)
    ok = base[0].valid
    assert np.array_equal(chip_top.data[:, ok], base[0].data[:, ok])  # only date 1 clear
    ok = base[1].valid
    assert np.array_equal(chip_mid.data[:, ok], base[1].data[:, ok] + 100)  # median of +0, +200
    ok = base[2].valid
    assert np.array_equal(chip_bottom.data[:, ok], base[2].data[:, ok] + 100)  # median of +0, +100, +200
    assert chip_top.cloud_share == pytest.approx(2 / 3, abs=0.01)
    assert chip_mid.cloud_share == pytest.approx(1 / 3, abs=0.01)
    assert chip_bottom.cloud_share == 0.0


def test_sentinel2_items_scl_20m_and_boa_offset(tmp_path):
    """An L2A item (baseline 04.00): 10 m bands, a 20 m B8A and SCL read on the 10 m grid, DN offset -1000."""
    import pystac

    from tests.imagery.stac_catalog import write_cog

    crs = "EPSG:32721"
    t10 = rasterio.Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 7100000.0)
    t20 = rasterio.Affine(20.0, 0.0, 700000.0, 0.0, -20.0, 7100000.0)
    rng = np.random.default_rng(0)
    b02 = rng.integers(1000, 3000, (1, 64, 64), dtype=np.uint16)
    b8a = rng.integers(1000, 5000, (1, 32, 32), dtype=np.uint16)
    scl = np.full((1, 32, 32), 4, dtype=np.uint8)
    scl[0, :8, :] = 9  # high-probability cloud over the top 16 rows at 10 m
    folder = tmp_path / "s2" / "item"
    for key, data, t in (("B02", b02, t10), ("B8A", b8a, t20), ("SCL", scl, t20)):
        write_cog(folder / f"{key}.tif", data, crs, t, nodata=0)
    west, south, east, north = rasterio.warp.transform_bounds(crs, "EPSG:4326", 700000, 7099360, 700640, 7100000)
    footprint = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                     [west, south]]]}
    item = pystac.Item("S2A_T21JYM_20220315", footprint, [west, south, east, north],
                       datetime(2022, 3, 15, tzinfo=timezone.utc), {"s2:processing_baseline": "04.00"})
    for key in ("B02", "B8A", "SCL"):
        item.add_asset(key, pystac.Asset(str(folder / f"{key}.tif")))
    coll = pystac.Collection("sentinel-2-l2a", "s2", pystac.Extent(
        pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])))
    coll.add_item(item)
    coll.normalize_hrefs(str(tmp_path / "s2"))
    coll.save(catalog_type=pystac.CatalogType.ABSOLUTE_PUBLISHED)
    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    point = to_wgs84.transform(700000 + 10 * 33.5, 7100000 - 10 * 12.5)  # pixel (row 12, col 33)
    stac = StacSource(str(tmp_path / "s2" / "collection.json"), "sentinel-2-l2a", "2022", date(2022, 1, 1),
                      date(2023, 1, 1), band_keys=["B02", "B8A"], retry=FAST_RETRY)
    [chip] = stac.read_chips([point], 16)
    assert chip.data.shape == (2, 16, 16)
    # Chip rows 0..15 are 10 m rows 4..19, cols 25..40; 10 m rows 0..15 (20 m rows 0..7) are cloud.
    grid_rows, grid_cols = np.arange(4, 20), np.arange(25, 41)
    expected_b02 = (b02[0][np.ix_(grid_rows, grid_cols)].astype(np.float32) - 1000) / 10000
    expected_b8a = (b8a[0][np.ix_(grid_rows // 2, grid_cols // 2)].astype(np.float32) - 1000) / 10000
    clear = np.ones((16, 16), bool)
    clear[grid_rows < 16, :] = False
    assert np.array_equal(chip.valid, clear)
    np.testing.assert_allclose(chip.data[0][clear], expected_b02[clear], atol=1e-6)
    np.testing.assert_allclose(chip.data[1][clear], expected_b8a[clear], atol=1e-6)
    assert clear.sum() == 4 * 16
    assert chip.cloud_share == pytest.approx(12 / 16)


# -- study contract, cache, errors -------------------------------------------------------------


def write_study(folder: Path, imagery: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "units.csv").write_text("id,lat,lon,d,y\n1,0,0,1,1.0\n")
    doc = {"name": "stac_study", "survey": {"path": "units.csv", "unit_id": "id", "lat": "lat", "lon": "lon",
                                            "treatment": "d", "outcome": "y"},
           "imagery": imagery, "analysis": {"feature_sets": ["none", "image"]}}
    (folder / "study.yaml").write_text(yaml.safe_dump(doc))
    return folder / "study.yaml"


def test_study_names_a_local_catalog_and_chips_are_cached(crop_catalog, tmp_path):
    import shutil

    shutil.copytree(crop_catalog.parent, tmp_path / "study" / "catalog")
    study_file = write_study(tmp_path / "study", {
        "source": "stac", "catalog": "catalog/catalog.json", "collection": COLLECTION, "chip_size_px": 16,
        "periods": [2020, {"name": "spring", "start": "2020-03-01", "end": "2020-06-01"}],
        "max_cloud_cover": 30, "band_names": ["red", "green", "blue"]})
    study = load_study(study_file)
    assert study.imagery.period_names() == ["2020", "spring"]
    src = open_source(study, "spring")
    assert isinstance(src, StacSource) and src.band_keys == ("red", "green", "blue")
    points = unit_points(DEMO_CROP, 8, seed=6, margin_px=-40)
    units = pd.DataFrame({"unit_id": [str(i) for i in range(len(points))], "lon": [p[0] for p in points],
                          "lat": [p[1] for p in points]})
    first = extract_chips(units, src, 16, tmp_path / "cache", 0.5)
    again = extract_chips(units, open_source(study, "spring"), 16, tmp_path / "cache", 0.5)
    assert first.n_extracted == len(points) and again.n_cached == len(points) and again.n_extracted == 0
    data, _ = load_chips(again.index, tmp_path / "cache")
    geotiff = GeoTiffSource(DEMO_CROP).read_chips(points, 16)
    ok = again.index["status"] == "ok"
    expected = np.stack([c.data[::-1] for c, keep in zip(geotiff, ok) if keep])  # red, green, blue
    assert data.tobytes() == expected.tobytes()


@pytest.mark.parametrize("imagery, rule", [
    ({"source": "stac", "collection": "x", "start": "2020-01-01", "end": "2021-01-01"}, "needs imagery.catalog"),
    ({"source": "stac", "catalog": "https://example.org/stac", "start": "2020-01-01", "end": "2021-01-01"},
     "needs imagery.collection"),
    ({"source": "stac", "catalog": "https://example.org/stac", "collection": "x"}, "needs imagery.periods"),
    ({"source": "geotiff", "path": "a.tif", "catalog": "https://example.org/stac"}, "apply to source 'stac' only"),
    ({"source": "stac", "catalog": "../elsewhere/catalog.json", "collection": "x", "start": "2020-01-01",
      "end": "2021-01-01"}, "escapes the study folder"),
])
def test_study_rules_for_stac(tmp_path, imagery, rule):
    with pytest.raises(StudyError, match=rule):
        load_study(write_study(tmp_path / "s", imagery))


def test_unusable_catalogs_name_the_rule(crop_catalog, tmp_path):
    with pytest.raises(StacError, match="no collection 'nope'.*landsat-c2-l2-test"):
        StacSource(str(crop_catalog), "nope", "p", date(2020, 1, 1), date(2021, 1, 1)).items((-180, -90, 180, 90))
    with pytest.raises(StacError, match=r"no asset \['nir'\]"):
        source(crop_catalog, band_keys=["blue", "nir"]).items((-180, -90, 180, 90))
    with pytest.raises(StacError, match="no such file"):
        source(tmp_path / "missing.json").items((-180, -90, 180, 90))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StacError, match="not a STAC catalog"):
        source(tmp_path / "bad.json").items((-180, -90, 180, 90))


# -- Planetary Computer signing (imagery.sign: planetary_computer) ---------------------------------


class TokenEndpoint:
    """A fake SAS token endpoint on 127.0.0.1: answers ``status`` or a token valid for ``ttl_s``."""

    def __init__(self, status: int = 200, ttl_s: float = 3600.0):
        import http.server
        import threading

        self.status, self.ttl_s, self.paths = status, ttl_s, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                if outer.status != 200:
                    self.send_response(outer.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                expiry = datetime.now(timezone.utc) + timedelta(seconds=outer.ttl_s)
                body = json.dumps({"msft:expiry": expiry.isoformat().replace("+00:00", "Z"),
                                   "token": f"st=x&se=y&sp=rl&sig=t{len(outer.paths)}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/sas/v1/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_signed_reads_match_unsigned_local_reads_and_refresh_expiring_tokens(crop_catalog):
    from eocausal.imagery.signing import SasSigner

    root = crop_catalog.parent
    points = unit_points(DEMO_CROP, 12, seed=5)
    local = source(crop_catalog).read_chips(points, 16)
    tokens = TokenEndpoint(ttl_s=3600.0)
    try:
        with FileServer(root, Faults(require_query=("st", "sig"))) as server:
            unsigned = source(server.url_of(crop_catalog)).read_chips(points[:1], 16)
            assert isinstance(unsigned[0], ChipFailure) and "403" in unsigned[0].detail
            signer = SasSigner(tokens.url)
            stac = source(server.url_of(crop_catalog), sign="planetary_computer", signer=signer)
            signed = stac.read_chips(points, 16)
            assert server.count(".tif", status=403) >= 1  # the unsigned try above only
    finally:
        tokens.close()
    assert_same_chips(signed, local)
    # One token per (account, container): the host, and the catalog's first path segment.
    assert len(tokens.paths) == 1 and tokens.paths[0].startswith("/api/sas/v1/token/127.0.0.1/")

    # An expiring token is asked for again (a clock, not a wait).
    now = [1_000_000.0]
    endpoint = TokenEndpoint(ttl_s=3600.0)
    try:
        signer = SasSigner(endpoint.url, clock=lambda: now[0])
        href = "https://acct.blob.core.windows.net/container/a/b.tif"
        first, expiry = signer.sign(href)
        assert first == href + "?st=x&se=y&sp=rl&sig=t1" and signer.sign(href)[0] == first
        now[0] = expiry - 30.0  # under a minute left
        assert signer.sign(href)[0].endswith("sig=t2") and len(endpoint.paths) == 2
        assert endpoint.paths[0].endswith("/acct/container")
    finally:
        endpoint.close()


def test_a_refusing_token_endpoint_is_one_clear_error_naming_it(crop_catalog):
    from eocausal.imagery.signing import SasSigner, SigningError

    tokens = TokenEndpoint(status=403)
    try:
        with FileServer(crop_catalog.parent, Faults(require_query=("st", "sig"))) as server:
            stac = source(server.url_of(crop_catalog), sign="planetary_computer", signer=SasSigner(tokens.url))
            with pytest.raises(SigningError, match=r"token endpoint .*/api/sas/v1/token/127\.0\.0\.1/.* HTTP 403"):
                stac.read_chips(unit_points(DEMO_CROP, 4, seed=6), 16)
    finally:
        tokens.close()


def test_sign_is_auto_on_planetary_computer_and_stac_only():
    from eocausal.study import ImagerySpec

    pc = StacSource("https://planetarycomputer.microsoft.com/api/stac/v1", "sentinel-2-l2a", "p",
                    date(2020, 1, 1), date(2021, 1, 1))
    assert pc.sign == "planetary_computer"
    assert StacSource("https://earth-search.aws.element84.com/v1", "c", "p", date(2020, 1, 1),
                      date(2021, 1, 1)).sign == "none"
    with pytest.raises(ValueError, match="apply to source 'stac' only"):
        ImagerySpec(source="geotiff", path="x.tif", sign="planetary_computer")


def test_a_failed_signed_read_never_records_the_token(crop_catalog):
    """Every asset request answers 404 after signing: the chip failures name the asset and the
    status, and no record or message carries the token's signature."""
    from eocausal.imagery.signing import SasSigner, without_signature

    assert without_signature("/vsicurl/https://a/b.tif?st=x&sig=abc%2Bd&sp=r: 404") == \
        "/vsicurl/https://a/b.tif?st=x&sig=[redacted]&sp=r: 404"
    tokens = TokenEndpoint(ttl_s=3600.0)
    try:
        with FileServer(crop_catalog.parent, Faults(only=".tif", status_every=1, status=404)) as server:
            stac = source(server.url_of(crop_catalog), sign="planetary_computer", signer=SasSigner(tokens.url))
            chips = stac.read_chips(unit_points(DEMO_CROP, 3, seed=7), 16)
    finally:
        tokens.close()
    failures = [c for c in chips if isinstance(c, ChipFailure)]
    assert failures and all("sig=t1" not in f.detail for f in failures), [f.detail for f in failures]
