"""The Earth Engine source against a fake client serving real Landsat-8 pixels, with faults."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from eocausal.imagery.chips import extract_chips, load_chips, stored_chip_keys
from eocausal.imagery.earthengine import (
    FATAL,
    HIGH_VOLUME_URL,
    PERMANENT,
    TRANSIENT,
    ChipDecodeError,
    CompositeRecipe,
    EarthEngineApi,
    EarthEngineCredentialsError,
    EarthEngineError,
    EarthEngineSource,
    RetryPolicy,
    build_composite,
    chip_grids,
    classify_error,
    decode_chip,
    load_credentials,
    utm_crs_code,
)
from eocausal.imagery.ee_collections import CLOUD_SCORE_PLUS_ID, COLLECTIONS
from eocausal.imagery.geotiff import GeoTiffSource, ImageryError
from eocausal.imagery.sources import open_source
from eocausal.study import ImagerySpec, StudyError
from tests.imagery.fake_earthengine import (
    DEMO_CROP,
    FakeEarthEngine,
    FakeEarthEngineServer,
    Faults,
    fake_image,
    http_error,
    offline_ee,
)

CRS = "EPSG:32721"  # the crop's area, in the southern-hemisphere UTM zone Earth Engine would use
# The shipped crop's real pixels, re-gridded onto multiples of 30 m, so that a local read and an
# Earth Engine chip on the same fixed grid must agree pixel for pixel.
ORIGIN = (729_000.0, 7_216_290.0)
TRANSFORM = Affine(30.0, 0.0, ORIGIN[0], 0.0, -30.0, ORIGIN[1])
SIZE = 16
FAST_RETRY = RetryPolicy(max_attempts=12, initial_delay_s=0.0005, max_delay_s=0.005)


@pytest.fixture(scope="module")
def aligned_scene(tmp_path_factory):
    """256 x 256 px of the crop's north-east corner (its zero-filled wedge included), 3 bands uint16."""
    with rasterio.open(DEMO_CROP) as src:
        data = src.read(window=((0, 256), (768, 1024)))
    path = tmp_path_factory.mktemp("ee_scene") / "aligned.tif"
    profile = dict(driver="GTiff", width=256, height=256, count=3, dtype="uint16", crs=CRS,
                   transform=TRANSFORM, tiled=True, blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def recipe(bands=("SR_B2", "SR_B3", "SR_B4"), name="landsat8_9_sr") -> CompositeRecipe:
    c = COLLECTIONS[name]
    return CompositeRecipe(c.name, c.ee_ids, tuple(bands), c.scale, c.offset, c.mask, "2020-01-01", "2021-01-01")


def source(client, **kwargs) -> EarthEngineSource:
    options = dict(scale_m=30.0, crs=CRS, max_concurrency=8, max_requests_per_second=10_000.0,
                   retry=FAST_RETRY, seed=1)
    options.update(kwargs)
    return EarthEngineSource(recipe(), "2020", client, **options)


def lonlat(col: float, row: float) -> tuple[float, float]:
    x, y = ORIGIN[0] + 30.0 * col, ORIGIN[1] - 30.0 * row
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


def units_grid(n: int, start: int = 20, step: int = 9) -> pd.DataFrame:
    """n <= 120 units on distinct pixels of the aligned scene, in its valid southern part."""
    rows = []
    per_row = 20
    for k in range(n):
        col, row = start + step * (k % per_row) + 0.5, 180 + step * (k // per_row) + 0.5
        lon, lat = lonlat(col, row)
        rows.append({"unit_id": f"u{k:03d}", "lat": lat, "lon": lon})
    return pd.DataFrame(rows)


# -- grid, recipe, decoding -----------------------------------------------------------------------


def test_grid_is_fixed_pixel_aligned_and_centred_on_the_unit():
    lon, lat = lonlat(40.3, 70.8)  # inside scene pixel (row 70, col 40)
    (grid,) = chip_grids([(lon, lat)], 8, 30.0, CRS)
    t = grid["affineTransform"]
    assert grid["crsCode"] == CRS and grid["dimensions"] == {"width": 8, "height": 8}
    assert (t["scaleX"], t["scaleY"], t["shearX"], t["shearY"]) == (30.0, -30.0, 0.0, 0.0)
    assert t["translateX"] % 30 == 0 and t["translateY"] % 30 == 0
    # the unit's pixel is [4, 4]: 4 pixels right and below the grid's corner
    assert t["translateX"] == ORIGIN[0] + 30 * (40 - 4)
    assert t["translateY"] == ORIGIN[1] - 30 * (70 - 4)
    assert chip_grids([(lon, lat)], 8, 30.0, CRS) == [grid]  # the same on every run
    assert 8 * 8 * 6 * 4 < 48 * 2**20


def test_utm_zone_follows_the_unit():
    assert utm_crs_code(-54.6, -25.3) == "EPSG:32721"
    assert utm_crs_code(15.2, 40.6) == "EPSG:32633"
    assert utm_crs_code(179.99, 1.0) == "EPSG:32660" and utm_crs_code(-180.0, -1.0) == "EPSG:32701"
    grids = chip_grids([(-54.6, -25.3), (15.2, 40.6)], 8, 10.0, "utm")
    assert [g["crsCode"] for g in grids] == ["EPSG:32721", "EPSG:32633"]


def test_composite_expression_builds_with_the_librarys_offline_algorithms():
    """Every collection's recipe is a valid ee expression (the client's own test algorithm list)."""
    with offline_ee() as ee:
        for name, coll in COLLECTIONS.items():
            r = recipe(coll.default_bands, name)
            text = json.dumps(ee.serializer.encode(build_composite(ee, r)))
            for ee_id in coll.ee_ids:
                assert ee_id in text
            for fn in ("Image.updateMask", "reduce.median", "reduce.sum", "Image.unmask", "Collection.filter"):
                assert f'"{fn}"' in text, (name, fn)
        landsat = json.dumps(ee.serializer.encode(build_composite(ee, recipe())))
        assert '"Image.bitwiseAnd"' in landsat and "30" in landsat  # QA_PIXEL bits 1-4 = 30
        s2 = json.dumps(ee.serializer.encode(build_composite(ee, recipe(("B4",), "sentinel2_sr"))))
        assert '"Image.remap"' in s2 and '"SCL"' in s2


def test_chips_are_the_scenes_real_pixels_on_the_fixed_grid(aligned_scene):
    fake = FakeEarthEngine(aligned_scene)
    ee_source = source(fake)
    local = GeoTiffSource(aligned_scene)
    points = [lonlat(c + 0.5, r + 0.5) for c, r in [(30, 150), (200, 200), (120, 140), (240, 170)]]

    ee_chips = ee_source.read_chips(points, SIZE)
    local_chips = local.read_chips(points, SIZE)

    for ee_chip, local_chip in zip(ee_chips, local_chips):
        np.testing.assert_array_equal(ee_chip.valid, local_chip.valid)
        expected = np.where(local_chip.valid, local_chip.data * 0.0000275 - 0.2, 0.0)
        np.testing.assert_allclose(ee_chip.data, expected, rtol=1e-6, atol=1e-7)
        assert ee_chip.source_file == "earthengine:landsat8_9_sr/2020"
        assert 0.0 <= ee_chip.cloud_share <= 1.0
    assert not ee_chips[2].valid.all() and ee_chips[2].valid.any()  # the crop's zero-filled wedge
    assert fake.initialize_calls == 1 and fake.calls == len(points)


def test_decode_rejects_truncated_bytes_and_a_wrong_grid(aligned_scene):
    fake = FakeEarthEngine(aligned_scene)
    r = recipe()
    grid, other = chip_grids([lonlat(50.5, 200.5), lonlat(90.5, 200.5)], SIZE, 30.0, CRS)
    payload = fake.render(r, grid)
    assert decode_chip(payload, grid, r, "x").valid.all()
    with pytest.raises(ChipDecodeError, match="not a readable GeoTIFF"):
        decode_chip(payload[: len(payload) // 2], grid, r, "x")
    with pytest.raises(ChipDecodeError, match="differs from the requested grid"):
        decode_chip(payload, other, r, "x")
    with pytest.raises(ChipDecodeError, match="bands"):
        decode_chip(payload, grid, recipe(("SR_B2",)), "x")
    with pytest.raises(ChipDecodeError, match="empty"):
        decode_chip(b"", grid, r, "x")


def test_no_imagery_in_the_period_reads_as_outside_coverage(aligned_scene):
    fake = FakeEarthEngine(aligned_scene)
    outside = lonlat(-500.5, 40.5)  # 15 km west of the scene
    assert source(fake).read_chips([outside], SIZE) == [None]


def test_request_size_is_checked_against_the_limit():
    with pytest.raises(ImageryError, match="MiB per request"):
        source(FakeEarthEngine(DEMO_CROP)).check_request_size(1024)
    source(FakeEarthEngine(DEMO_CROP)).check_request_size(256)


# -- errors and retries ---------------------------------------------------------------------------


def test_errors_are_classified_by_http_status_then_message():
    assert classify_error(http_error(429, "Too Many Requests")) == TRANSIENT
    assert classify_error(http_error(503, "unavailable")) == TRANSIENT
    assert classify_error(http_error(500, "Internal error")) == TRANSIENT
    assert classify_error(http_error(400, "Image.select: Pattern did not match any bands")) == PERMANENT
    assert classify_error(http_error(404, "Collection not found")) == PERMANENT
    assert classify_error(http_error(403, "Permission denied")) == FATAL
    assert classify_error(http_error(401, "Request had invalid authentication credentials")) == FATAL
    assert classify_error(TimeoutError("timed out")) == TRANSIENT
    assert classify_error(ConnectionResetError()) == TRANSIENT
    assert classify_error(ChipDecodeError("short")) == TRANSIENT
    import ee

    assert classify_error(ee.EEException("Too many concurrent aggregations.")) == TRANSIENT
    assert classify_error(ee.EEException("Earth Engine client library not initialized.")) == FATAL
    assert classify_error(ee.EEException("Image.select: band 'X' not found")) == PERMANENT
    from google.auth.exceptions import RefreshError

    assert classify_error(RefreshError("invalid_grant: Invalid JWT Signature.")) == FATAL
    assert classify_error(ValueError("a bug")) is None  # not a fetch error: never swallowed


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    import random

    policy = RetryPolicy(initial_delay_s=0.5, max_delay_s=8.0)
    rng = random.Random(0)
    delays = [[policy.delay(k, rng) for _ in range(200)] for k in range(7)]
    for k, ds in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**k)
        assert min(ds) >= ceiling / 2 and max(ds) <= ceiling
        assert len(set(ds)) > 100  # jittered, not lock-step
    assert np.mean(delays[3]) > 2 * np.mean(delays[1])


def test_under_30_percent_429s_and_other_faults_every_chip_arrives(aligned_scene):
    faults = Faults(rate_429=0.30, rate_5xx=0.03, rate_timeout=0.03, rate_truncated=0.04, burst_429=(5, 25))
    fake = FakeEarthEngine(aligned_scene, latency_s=0.002, faults=faults, seed=7)
    ee_source = source(fake, max_concurrency=6)
    units = units_grid(120)

    result = extract_chips(units, ee_source, SIZE, aligned_scene.parent / "cache_faults", 0.2)

    assert (result.index["status"] == "ok").all(), result.index["detail"].dropna().tolist()
    assert result.n_extracted == 120 and result.n_failed == 0
    stats = ee_source.stats
    assert stats.retries["http_429"] >= 25 + 20  # the burst, plus the random share
    assert {"http_5xx", "timeout", "bad_response"} <= set(stats.retries)
    assert stats.requests == fake.calls == 120 + sum(stats.retries.values())
    assert fake.max_in_flight <= 6
    # retries never leave a truncated chip behind: every stored chip loads
    data, valid = load_chips(result.index, aligned_scene.parent / "cache_faults")
    assert data.shape == (120, 3, SIZE, SIZE) and valid.all()


def test_a_permanent_400_fails_that_unit_with_its_reason_and_is_retried_next_run(aligned_scene, tmp_path):
    units = units_grid(12)
    bad = units.iloc[4]
    (bad_grid,) = chip_grids([(bad["lon"], bad["lat"])], SIZE, 30.0, CRS)
    bad_origin = (bad_grid["affineTransform"]["translateX"], bad_grid["affineTransform"]["translateY"])
    fake = FakeEarthEngine(aligned_scene, faults=Faults(reject_origins={bad_origin}))

    first = extract_chips(units, source(fake), SIZE, tmp_path / "cache", 0.2)

    row = first.index.set_index("unit_id").loc[bad["unit_id"]]
    assert (row["status"], row["reason"]) == ("excluded", "fetch_failed")
    assert "HTTP 400" in row["detail"] and "did not match any bands" in row["detail"]
    assert fake.calls_by_origin[bad_origin] == 1  # permanent: not retried
    assert first.n_failed == 1 and (first.index["status"] == "ok").sum() == 11

    again = extract_chips(units, source(fake), SIZE, tmp_path / "cache", 0.2)
    assert fake.calls == 13 and fake.calls_by_origin[bad_origin] == 2  # only the failed unit again
    assert again.n_cached == 11 and again.n_failed == 1


def test_a_403_stops_the_run_with_a_clear_message(aligned_scene, tmp_path):
    class Forbidden(FakeEarthEngine):
        def compute_pixels(self, recipe, grid):
            raise http_error(403, "Caller does not have required permission to use project x")

    with pytest.raises(EarthEngineError, match="refused the request: HTTP 403"):
        extract_chips(units_grid(5), source(Forbidden(aligned_scene)), SIZE, tmp_path / "cache", 0.2)


def test_exhausted_retries_fail_the_unit_not_the_run(aligned_scene, tmp_path):
    fake = FakeEarthEngine(aligned_scene, faults=Faults(rate_429=1.0))
    result = extract_chips(units_grid(3), source(fake, retry=RetryPolicy(3, 0.0001, 0.0002)), SIZE,
                           tmp_path / "cache", 0.2)
    assert (result.index["reason"] == "fetch_failed").all() and fake.calls == 9
    assert result.index["detail"].str.contains("gave up after 3 attempts; last error HTTP 429").all()
    assert stored_chip_keys(tmp_path / "cache") == set()  # failures are never cached


# -- the chip store: resume, count calls ----------------------------------------------------------


def test_an_interrupted_run_resumes_without_refetching_stored_chips(aligned_scene, tmp_path):
    units = units_grid(60)
    cache = tmp_path / "cache"
    stopping = FakeEarthEngine(aligned_scene, latency_s=0.001, faults=Faults(interrupt_at_call=25))
    with pytest.raises(KeyboardInterrupt):
        extract_chips(units, source(stopping, max_concurrency=4), SIZE, cache, 0.2)
    stored = stored_chip_keys(cache)  # what arrived before the interrupt is written as a part
    assert 10 <= len(stored) < 60

    fresh = FakeEarthEngine(aligned_scene)
    resumed = extract_chips(units, source(fresh), SIZE, cache, 0.2)

    assert fresh.calls == 60 - len(stored)  # nothing stored is fetched again
    assert resumed.n_cached == len(stored) and (resumed.index["status"] == "ok").all()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".parquet"]


def test_a_fully_cached_rerun_needs_no_client_and_no_credentials(aligned_scene, tmp_path):
    units = units_grid(10)
    first = extract_chips(units, source(FakeEarthEngine(aligned_scene)), SIZE, tmp_path / "cache", 0.2)

    class Unreachable(FakeEarthEngine):
        def initialize(self, **kwargs):
            raise AssertionError("initialised on a cached re-run")

    offline = Unreachable(aligned_scene)
    second = extract_chips(units, source(offline), SIZE, tmp_path / "cache", 0.2)
    assert offline.calls == 0 and second.n_cached == 10
    pd.testing.assert_frame_equal(first.index, second.index)
    assert second.index["cloud_share"].between(0, 1).all()


def test_cache_key_covers_collection_period_bands_scale_and_crs(aligned_scene):
    fake = FakeEarthEngine(aligned_scene)
    base = source(fake).fingerprint()
    c = COLLECTIONS["landsat8_9_sr"]
    other_period = EarthEngineSource(
        CompositeRecipe(c.name, c.ee_ids, c.default_bands, c.scale, c.offset, c.mask, "2021-01-01", "2022-01-01"),
        "2021", fake, scale_m=30.0, crs=CRS)
    assert other_period.fingerprint() != base
    assert EarthEngineSource(recipe(("SR_B4",)), "2020", fake, scale_m=30.0, crs=CRS).fingerprint() != base
    assert EarthEngineSource(recipe(name="landsat8_sr"), "2020", fake, scale_m=30.0, crs=CRS).fingerprint() != base
    assert source(fake, scale_m=10.0).fingerprint() != base
    assert source(fake, crs="utm").fingerprint() != base
    # how chips are fetched is not what they are
    assert source(fake, max_concurrency=40, high_volume=True).fingerprint() == base
    assert EarthEngineSource(recipe(), "renamed", fake, scale_m=30.0, crs=CRS).fingerprint() == base


# -- credentials -----------------------------------------------------------------------------------


def test_missing_credentials_give_a_clear_message_and_never_reach_ee(monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_adc(*args, **kwargs):
        raise DefaultCredentialsError("Your default credentials were not found")

    monkeypatch.setattr(google.auth, "default", no_adc)
    with pytest.raises(EarthEngineCredentialsError, match="EOCAUSAL_EE_SERVICE_ACCOUNT_KEY.*Application Default"):
        EarthEngineApi().initialize(project="p", high_volume=False, timeout_s=10)


def test_a_bad_key_file_is_named_by_variable_and_its_content_never_echoed(monkeypatch, tmp_path):
    monkeypatch.setenv("EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", str(tmp_path / "missing.json"))
    with pytest.raises(EarthEngineCredentialsError, match="does not exist"):
        load_credentials()
    secret = "-----BEGIN PRIVATE KEY-----SECRETSECRET"
    bad = tmp_path / "key.json"
    bad.write_text(json.dumps({"type": "service_account", "private_key": secret, "client_email": "a@b"}))
    monkeypatch.setenv("EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", str(bad))
    with pytest.raises(EarthEngineCredentialsError) as info:
        load_credentials()
    assert "SECRET" not in repr(info.value)
    assert info.value.__suppress_context__  # the parser's error (which may quote the key) is not shown


def _service_account_key(tmp_path, project="demo-project"):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": project, "private_key_id": "abc", "private_key": pem,
        "client_email": "eocausal@demo-project.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }))
    return path, pem


def test_service_account_key_and_high_volume_endpoint_reach_initialize(monkeypatch, tmp_path, caplog):
    import ee

    path, pem = _service_account_key(tmp_path)
    monkeypatch.setenv("EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", str(path))
    seen = {}
    # A recording stand-in (no network): what the real client would pass to ee.Initialize.
    monkeypatch.setattr(ee, "Initialize", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ee.data, "setDeadline", lambda ms: seen.update(deadline_ms=ms))
    caplog.set_level("DEBUG")

    EarthEngineApi().initialize(project=None, high_volume=True, timeout_s=30)

    assert seen["project"] == "demo-project" and seen["url"] == HIGH_VOLUME_URL and seen["deadline_ms"] == 30000
    assert seen["credentials"].service_account_email.startswith("eocausal@")
    assert "earthengine" in " ".join(seen["credentials"].scopes)
    assert pem[40:80] not in caplog.text and str(path) not in caplog.text
    seen.clear()
    EarthEngineApi().initialize(project="study-project", high_volume=False, timeout_s=30)
    assert seen["project"] == "study-project" and seen["url"] is None


# -- study contract and factory ---------------------------------------------------------------------


def test_study_contract_for_earthengine():
    spec = ImagerySpec(source="earthengine", periods=[2019, "2020", {"name": "dry-2021", "start": "2021-06-01",
                                                                     "end": "2021-09-01"}])
    assert [p.name for p in spec.resolved_periods()] == ["2019", "2020", "dry-2021"]
    assert spec.period().name == "2019"  # the baseline by default
    assert ImagerySpec(source="earthengine", periods=[2019, 2020], analysis_period=2020).period().name == "2020"
    assert spec.period("2020").start == date(2020, 1, 1) and spec.period("2020").end == date(2021, 1, 1)
    one = ImagerySpec(source="earthengine", start="2020-01-01", end="2020-07-01", collection="sentinel2_sr",
                      band_names=["B4", "B8"])
    assert one.period().name == "20200101_20200701"
    assert (one.max_concurrency, one.high_volume, one.crs) == (32, False, "utm")
    with pytest.raises(StudyError, match="no imagery period named"):
        spec.period("1999")
    for bad, message in [
        (dict(), "needs imagery.periods"),
        (dict(periods=[2019, 2019]), "names repeated"),
        (dict(periods=[2019], start="2019-01-01", end="2020-01-01"), "not both"),
        (dict(periods=[2019], band_names=["B4"]), "not all in landsat8_9_sr"),
        (dict(periods=[2019], collection="modis"), "unknown imagery.collection"),
        (dict(periods=[2019], analysis_period="2020"), "not one of the periods"),
        (dict(periods=[2019], max_concurrency=41), "less than or equal to 40"),
        (dict(periods=[{"name": "x", "start": "2020-01-01", "end": "2020-01-01"}]), "must be after start"),
        (dict(periods=[{"name": "a/b", "start": "2020-01-01", "end": "2021-01-01"}]), "period name"),
    ]:
        with pytest.raises(ValueError, match=message):
            ImagerySpec(source="earthengine", **bad)
    ImagerySpec(source="geotiff", path="x.tif")  # GeoTIFF studies need none of it


def test_factory_builds_the_analysis_period_source_with_the_env_selected_client(monkeypatch, aligned_scene):
    from eocausal.study import Study
    from tests.imagery import fake_earthengine

    study = Study.model_validate({
        "name": "s", "survey": {"path": "v.csv", "unit_id": "id", "lat": "lat", "lon": "lon", "treatment": "d",
                                "outcome": "y"},
        "imagery": {"source": "earthengine", "periods": [2019, 2020], "analysis_period": "2020", "crs": CRS,
                    "max_concurrency": 12, "high_volume": True},
        "analysis": {"feature_sets": ["none", "image"]},
    })
    fake = FakeEarthEngine(aligned_scene)
    monkeypatch.setitem(fake_earthengine.SHARED, "client", fake)
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", "tests.imagery.fake_earthengine:shared_fake")

    src = open_source(study)
    assert isinstance(src, EarthEngineSource) and src.client is fake
    assert (src.period_name, src.recipe.start, src.max_concurrency, src.scale_m) == ("2020", "2020-01-01", 12, 30.0)
    assert open_source(study, period="2019").recipe.end == "2020-01-01"
    src.read_chips([lonlat(50.5, 200.5)], 8)
    assert fake.last_init == {"project": None, "high_volume": True, "timeout_s": 120.0}
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", "not-a-target")
    with pytest.raises(ValueError, match="package.module:factory"):
        open_source(study)
    monkeypatch.delenv("EOCAUSAL_EE_CLIENT")
    assert isinstance(open_source(study).client, EarthEngineApi)  # the real one, not initialised yet


# -- Cloud Score+ masking (imagery.cloud_mask: cloud_score_plus) ----------------------------------

S2_ID = "COPERNICUS/S2_SR_HARMONIZED"


def tiny_s2_catalog() -> dict:
    """Three 2020 scenes and one 2019 scene of 2 x 2 px, with their Cloud Score+ images (same system:index).

    Pixels in ravel order p0..p3. SCL 4 = vegetation (clear), 8/9 = cloud, 0 = no data.
    """
    def px(values):
        return [values[:2], values[2:]]

    s2 = [
        fake_image("s1", "2020-03-01", B4=px([1000, 2000, 3000, 4000]), SCL=px([4, 4, 9, 0])),
        fake_image("s2", "2020-06-01", B4=px([1100, 2100, 3100, 4100]), SCL=px([4, 8, 4, 4])),
        fake_image("s3", "2020-09-01", B4=px([1200, 2200, 3200, 4200]), SCL=px([4, 4, 4, 4])),
        fake_image("s0", "2019-06-01", B4=px([9999] * 4), SCL=px([4] * 4)),  # outside the period
    ]
    cs = [
        fake_image("s1", "2020-03-01", cs=px([0.2] * 4), cs_cdf=px([0.90, 0.50, 0.10, 0.90])),
        fake_image("s2", "2020-06-01", cs=px([0.2] * 4), cs_cdf=px([0.60, 0.90, 0.59, 0.80])),
        fake_image("s3", "2020-09-01", cs=px([0.2] * 4), cs_cdf=px([0.30, 0.95, 0.20, 0.61])),
        fake_image("s0", "2019-06-01", cs=px([1.0] * 4), cs_cdf=px([1.0] * 4)),
    ]
    return {S2_ID: s2, CLOUD_SCORE_PLUS_ID: cs}


def s2_spec(**kwargs) -> ImagerySpec:
    return ImagerySpec(source="earthengine", collection="sentinel2_sr", band_names=["B4"],
                       periods=[{"name": "2020", "start": "2020-01-01", "end": "2021-01-01"}], **kwargs)


def evaluate_composite(spec: ImagerySpec):
    src = EarthEngineSource.from_spec(spec, spec.period(), FakeEarthEngine(DEMO_CROP))
    server = FakeEarthEngineServer(tiny_s2_catalog())
    with offline_ee() as ee:
        image = server.evaluate(ee.serializer.encode(build_composite(ee, src.recipe)))
    assert list(image.bands) == ["B4", "valid", "clear_obs", "total_obs"]
    return {k: v.ravel().tolist() for k, (v, m) in image.bands.items()}, server


def test_cloud_score_plus_keeps_only_pixels_with_cs_cdf_at_or_above_the_threshold():
    bands, server = evaluate_composite(s2_spec(cloud_mask="cloud_score_plus"))
    # clear = cs_cdf >= 0.60 and SCL != 0, whatever SCL says about clouds:
    # p0: s1 (0.90), s2 (0.60) -> median(1000, 1100); p1: s2 (0.90, SCL 8), s3 (0.95) -> median(2100, 2200);
    # p2: nothing at or above 0.60 -> no value; p3: s1 has SCL 0 (not observed), s2, s3 -> median(4100, 4200).
    np.testing.assert_allclose(bands["B4"], [0.1050, 0.2150, 0.0, 0.4150], rtol=1e-9)
    assert bands["valid"] == [1, 1, 0, 1]
    assert bands["clear_obs"] == [2, 2, 0, 2]
    assert bands["total_obs"] == [3, 3, 3, 2]
    assert server.algorithms_called["Image.linkCollection"] > 0

    stricter, _ = evaluate_composite(s2_spec(cloud_mask="cloud_score_plus", cloud_score_threshold=0.9))
    np.testing.assert_allclose(stricter["B4"], [0.1000, 0.2150, 0.0, 0.0], rtol=1e-9)
    assert stricter["clear_obs"] == [1, 2, 0, 0] and stricter["valid"] == [1, 1, 0, 0]


def test_default_sentinel2_masking_stays_scl_and_unchanged():
    spec = s2_spec()
    assert spec.cloud_mask == "scl" and s2_spec(cloud_mask="scl").cloud_mask == "scl"
    bands, server = evaluate_composite(spec)
    # SCL clear classes: p0 all three; p1 s1, s3; p2 s2, s3 (s1 is cloud 9); p3 s2, s3 (s1 no data).
    np.testing.assert_allclose(bands["B4"], [0.1100, 0.2100, 0.3150, 0.4150], rtol=1e-9)
    assert bands["clear_obs"] == [3, 2, 2, 2] and bands["total_obs"] == [3, 3, 3, 2]
    assert "Image.linkCollection" not in server.algorithms_called

    # Byte-identical to before the option existed: the recipe, its chip key and its expression.
    old = ImagerySpec(source="earthengine", collection="sentinel2_sr", band_names=["B4", "B8"],
                      periods=[{"name": "2020", "start": "2020-01-01", "end": "2021-01-01"}])
    src = EarthEngineSource.from_spec(old, old.period(), FakeEarthEngine(DEMO_CROP))
    assert "cloud_score_threshold" not in src.recipe.to_json()
    # Values recorded with the code before imagery.cloud_mask was added.
    assert src.fingerprint() == "554826c8a375c21aae6160e508cce037310f77752ad90576732f49ae5da12147"
    with offline_ee() as ee:
        encoded = json.dumps(ee.serializer.encode(build_composite(ee, src.recipe)), sort_keys=True)
    import hashlib

    assert hashlib.sha256(encoded.encode()).hexdigest() == (
        "653fd4ffebc7fff43300149601187d9324b49f3b84e74e539230fa17c5c3aef5")


def test_cloud_mask_is_part_of_the_chip_key():
    period = s2_spec().period()
    keys = {
        EarthEngineSource.from_spec(spec, period, FakeEarthEngine(DEMO_CROP)).fingerprint()
        for spec in (s2_spec(), s2_spec(cloud_mask="cloud_score_plus"),
                     s2_spec(cloud_mask="cloud_score_plus", cloud_score_threshold=0.5))
    }
    assert len(keys) == 3
    r = EarthEngineSource.from_spec(s2_spec(cloud_mask="cloud_score_plus"), period, FakeEarthEngine(DEMO_CROP)).recipe
    assert r.mask == "sentinel2_cloud_score_plus" and r.cloud_score_threshold == 0.60
    assert hash(r) != hash(replace_threshold(r, 0.5))


def replace_threshold(r: CompositeRecipe, t: float) -> CompositeRecipe:
    from dataclasses import replace

    return replace(r, cloud_score_threshold=t)


def test_study_contract_rejects_cloud_score_plus_outside_sentinel2():
    period = [{"name": "2020", "start": "2020-01-01", "end": "2021-01-01"}]
    with pytest.raises(ValueError, match="cloud_mask 'cloud_score_plus' applies to Sentinel-2 collections only"):
        ImagerySpec(source="earthengine", collection="landsat8_9_sr", periods=period, cloud_mask="cloud_score_plus")
    with pytest.raises(ValueError, match="apply to source 'earthengine'"):
        ImagerySpec(source="geotiff", path="x.tif", cloud_mask="cloud_score_plus")
    with pytest.raises(ValueError, match="cloud_score_threshold"):
        s2_spec(cloud_mask="cloud_score_plus", cloud_score_threshold=1.5)
    ImagerySpec(source="earthengine", collection="landsat8_9_sr", periods=period, cloud_mask="scl")
