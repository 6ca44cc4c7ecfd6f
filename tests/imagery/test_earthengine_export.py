"""Earth Engine batch export (imagery.export): per-block COGs from the fake client, chips cut locally.

The fake runs each export task over polls (READY, RUNNING, COMPLETED) and writes a real
Cloud-Optimised GeoTIFF of its composite into a local folder standing for the bucket; the chips cut
from those files must be the chips the request-per-chip path gets from the same fake.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rasterio

from eocausal.imagery.chips import extract_chips, load_chips
from eocausal.imagery.earthengine import EarthEngineApi, EarthEngineError, EarthEngineSource, chip_grids
from eocausal.imagery.ee_export import (
    EarthEngineExportError,
    EarthEngineExportSource,
    ExportSettings,
    block_grid,
    block_of,
)
from eocausal.imagery.sources import open_source
from eocausal.study import ImagerySpec
from eocausal.tiles import assign_tiles
from tests.imagery.fake_earthengine import FakeEarthEngine, Faults, offline_ee
from tests.imagery.test_earthengine import CRS, FAST_RETRY, SIZE, aligned_scene, lonlat, recipe, units_grid

__all__ = ["aligned_scene"]  # the fixture, imported for this module's tests

BLOCK = 64  # small blocks: the test units span several


def export_source(client, block_px: int = BLOCK, **kwargs) -> EarthEngineExportSource:
    settings = ExportSettings(bucket="eo-bucket", prefix="runs/test", block_px=block_px, poll_interval_s=5.0,
                              task_timeout_s=kwargs.pop("task_timeout_s", 3600.0),
                              max_tasks_in_flight=kwargs.pop("max_tasks_in_flight", 3))
    options = dict(scale_m=30.0, crs=CRS, max_concurrency=8, max_requests_per_second=10_000.0,
                   retry=FAST_RETRY, seed=1, sleep=lambda s: None)
    options.update(kwargs)
    return EarthEngineExportSource(recipe(), "2020", client, export=settings, **options)


def interactive_source(client) -> EarthEngineSource:
    return EarthEngineSource(recipe(), "2020", client, scale_m=30.0, crs=CRS, max_concurrency=8,
                             max_requests_per_second=10_000.0, retry=FAST_RETRY, seed=1)


def points_of(units) -> list[tuple[float, float]]:
    return list(zip(units["lon"], units["lat"]))


def blocks_of(points, block_px=BLOCK, size=SIZE) -> dict:
    out: dict = {}
    for i, grid in enumerate(chip_grids(points, size, 30.0, CRS)):
        out.setdefault(block_of(grid, size, block_px), []).append(i)
    return out


def test_block_grid_covers_every_chip_centred_in_the_block_on_the_chips_lattice():
    points = points_of(units_grid(60))
    for block, idx in blocks_of(points).items():
        g = block_grid(block, SIZE, BLOCK, 30.0)
        t = g["affineTransform"]
        side = g["dimensions"]["width"]
        assert side == BLOCK + SIZE - 1 and g["crsCode"] == CRS
        for grid in (chip_grids(points, SIZE, 30.0, CRS)[i] for i in idx):
            c = grid["affineTransform"]
            col, row = (c["translateX"] - t["translateX"]) / 30.0, (t["translateY"] - c["translateY"]) / 30.0
            assert col == int(col) and row == int(row)
            assert 0 <= col and col + SIZE <= side and 0 <= row and row + SIZE <= side


def test_export_mode_gives_the_interactive_chips_pixel_for_pixel(aligned_scene, tmp_path):
    units = units_grid(60)
    # and units by the scene's edges and its zero-filled wedge: partly valid chips
    points = points_of(units) + [lonlat(c, r) for c, r in [(250.5, 100.5), (3.5, 130.5), (200.5, 6.5), (120.5, 2.5)]]
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket", export_polls=(2, 3))
    exported = export_source(fake)
    interactive = interactive_source(FakeEarthEngine(aligned_scene))
    assert exported.fingerprint() == interactive.fingerprint()  # the same chip keys

    got = exported.read_chips(points, SIZE)
    want = interactive.read_chips(points, SIZE)
    assert [c is None for c in got] == [c is None for c in want]  # None: no imagery there in the period
    for a, b in zip(got, want):
        if b is None:
            continue
        assert a.data.dtype == b.data.dtype == np.float32
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.valid, b.valid)
        assert (a.source_file, a.cloud_share) == (b.source_file, b.cloud_share)
    # The zero-filled wedge, partial validity and cloud blocks all reached the comparison.
    some = [c for c in want if c is not None]
    assert any(c is None for c in want) and any(not c.valid.all() for c in some)
    assert len({c.cloud_share for c in some}) > 1

    n_blocks = len(blocks_of(points))
    stats = exported.export_stats
    assert n_blocks > 2 and (stats.blocks, stats.tasks_started, stats.exports_reused) == (n_blocks, n_blocks, 0)
    assert fake.calls == 0  # not one computePixels request
    # Tasks went READY -> RUNNING -> COMPLETED over polls, at most 3 in flight.
    assert all(t["polls"] == 6 and t["state"] == "COMPLETED" for t in fake.tasks.values())
    in_flight = max_in_flight = 0
    for event, _ in fake.export_log:
        in_flight += {"started": 1, "completed": -1}.get(event, 0)
        max_in_flight = max(max_in_flight, in_flight)
    assert max_in_flight == 3
    cogs = sorted((tmp_path / "bucket" / "eo-bucket").rglob("*.tif"))
    assert len(cogs) == n_blocks
    with rasterio.open(cogs[0]) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and ds.count == 6
        assert ds.width == BLOCK + SIZE - 1
    assert exported.provenance()["mode"] == "export"
    assert exported.provenance()["export"]["tasks_started"] == n_blocks


def test_chip_stage_end_to_end_same_keys_and_bytes_and_finished_exports_are_reused(aligned_scene, tmp_path):
    units = units_grid(40)
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket")
    via_export = extract_chips(units, export_source(fake), SIZE, tmp_path / "cache_export", 0.5)
    via_requests = extract_chips(units, interactive_source(FakeEarthEngine(aligned_scene)), SIZE,
                                 tmp_path / "cache_requests", 0.5)
    cols = ["unit_id", "chip_key", "status", "reason", "valid_share", "source_file"]
    assert via_export.index[cols].equals(via_requests.index[cols])
    np.testing.assert_array_equal(via_export.index["cloud_share"], via_requests.index["cloud_share"])
    a_data, a_valid = load_chips(via_export.index, tmp_path / "cache_export")
    b_data, b_valid = load_chips(via_requests.index, tmp_path / "cache_requests")
    np.testing.assert_array_equal(a_data, b_data)
    np.testing.assert_array_equal(a_valid, b_valid)

    # A new cache (or another tile's run needing the same blocks): the bucket's COGs are reused, no task.
    started = len(fake.tasks)
    again = export_source(fake)
    extract_chips(units, again, SIZE, tmp_path / "cache_again", 0.5)
    assert len(fake.tasks) == started and again.export_stats.exports_reused == again.export_stats.blocks > 0


def test_a_failed_export_task_names_the_tile_block_and_ee_error_and_the_rest_is_delivered(aligned_scene, tmp_path):
    units = units_grid(60)
    points = points_of(units)
    blocks = blocks_of(points)
    failing = sorted(blocks, key=lambda b: (b.by, b.bx))[1]
    message = "Computation timed out. User memory limit exceeded."
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket",
                           faults=Faults(fail_exports={failing.label: message}))
    src = export_source(fake)
    delivered = []
    with pytest.raises(EarthEngineExportError) as info:
        for i, chip in src.iter_chips(points, SIZE):
            delivered.append(i)
    text = str(info.value)
    survey_tiles = assign_tiles(units["lat"].to_numpy(), units["lon"].to_numpy())  # the survey's `tile` column
    tiles = sorted(set(survey_tiles[blocks[failing]]))
    assert f"tile {tiles[0]}" in text and failing.label in text and message in text and "FAILED" in text
    assert f"{len(blocks[failing])} units" in text and "1 of " in text
    assert sorted(delivered) == sorted(set(range(len(points))) - set(blocks[failing]))

    # Through the chip stage: the error stops the run, the other blocks' chips are stored, and a re-run
    # (the failure gone) exports only the failed block.
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket2",
                           faults=Faults(fail_exports={failing.label: message}))
    with pytest.raises(EarthEngineExportError, match=f"tile {tiles[0]}"):
        extract_chips(units, export_source(fake), SIZE, tmp_path / "cache", 0.5)
    fake.faults.fail_exports.clear()
    rerun = export_source(fake)
    result = extract_chips(units, rerun, SIZE, tmp_path / "cache", 0.5)
    assert result.n_cached == len(points) - len(blocks[failing]) and rerun.export_stats.tasks_started == 1
    assert (result.index["status"] == "ok").all()


def test_a_stuck_task_times_out_with_the_block_named(aligned_scene, tmp_path):
    points = points_of(units_grid(10))
    block = next(iter(blocks_of(points)))
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket", faults=Faults(stuck_exports={block.label}))
    ticks = itertools.count(step=100.0)
    src = export_source(fake, task_timeout_s=250.0, clock=lambda: next(ticks))
    with pytest.raises(EarthEngineExportError, match=r"not finished after 250 s \(state RUNNING"):
        list(src.iter_chips(points, SIZE))


def test_a_full_task_queue_at_start_is_retried(aligned_scene, tmp_path):
    points = points_of(units_grid(20))
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket", faults=Faults(start_status_once=429))
    src = export_source(fake)
    assert all(c is not None for c in src.read_chips(points, SIZE))
    assert sum(src.export_stats.start_retries.values()) == src.export_stats.tasks_started == len(blocks_of(points))


# -- the study setting --------------------------------------------------------------------------------


def test_study_setting_imagery_export_is_validated():
    spec = ImagerySpec(source="earthengine", periods=[2020], export={"bucket": "my-bucket"})
    assert (spec.export.block_px, spec.export.prefix, spec.export.max_tasks_in_flight) == (1024, "eocausal-exports", 20)
    assert ImagerySpec(source="earthengine", periods=[2020]).export is None  # per-chip requests by default
    for source, extra in [("geotiff", {"path": "x.tif"}), ("stac", {"catalog": "c.json", "collection": "x",
                                                                     "periods": [2020]})]:
        with pytest.raises(ValueError, match=f"imagery.export .*applies to source 'earthengine' only, not '{source}'"):
            ImagerySpec(source=source, export={"bucket": "my-bucket"}, **extra)
    for bad, message in [({}, "bucket"), ({"bucket": "Bad Bucket"}, "pattern"),
                         ({"bucket": "b-1", "block_px": 10}, "greater than or equal to 64"),
                         ({"bucket": "b-1", "poll": 3}, "Extra inputs")]:
        with pytest.raises(ValueError, match=message):
            ImagerySpec(source="earthengine", periods=[2020], export=bad)


def test_open_source_builds_the_export_source_from_the_study(aligned_scene, tmp_path):
    from eocausal.study import Study

    study = Study.model_validate({
        "name": "s", "survey": {"path": "v.csv", "unit_id": "id", "lat": "lat", "lon": "lon", "treatment": "d",
                                "outcome": "y"},
        "imagery": {"source": "earthengine", "periods": [2020], "crs": CRS, "chip_size_px": SIZE,
                    "export": {"bucket": "eo-bucket", "prefix": "/studies/s/", "block_px": 128, "poll_interval_s": 1}},
        "analysis": {"feature_sets": ["none", "image"]},
    })
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket")
    src = open_source(study, ee_client=fake)
    assert isinstance(src, EarthEngineExportSource)
    assert (src.export.bucket, src.export.prefix, src.export.block_px) == ("eo-bucket", "studies/s", 128)
    plain = open_source(study.model_copy(update={"imagery": study.imagery.model_copy(update={"export": None})}),
                        ee_client=fake)
    assert type(plain) is EarthEngineSource and plain.fingerprint() == src.fingerprint()
    src._sleep = lambda s: None
    assert src.read_chips([lonlat(50.5, 200.5)], SIZE)[0] is not None
    block = block_of(chip_grids([lonlat(50.5, 200.5)], SIZE, 30.0, CRS)[0], SIZE, 128)
    name = src.object_name(block, SIZE)
    assert name == f"studies/s/{src.fingerprint()[:16]}/EPSG_32721/s{SIZE}_b128/x{block.bx}_y{block.by}.tif"
    assert (tmp_path / "bucket" / "eo-bucket" / name).is_file()

    class NoExport:
        def initialize(self, **kw):
            pass

        def compute_pixels(self, recipe, grid):
            raise AssertionError

    with pytest.raises(EarthEngineError, match="needs an Earth Engine client that can export"):
        open_source(study, ee_client=NoExport())


def test_the_real_clients_export_task_asks_for_one_cog_on_the_chips_exact_grid():
    api = EarthEngineApi()
    grid = block_grid(block_of(chip_grids([lonlat(50.5, 200.5)], SIZE, 30.0, CRS)[0], SIZE, 1024), SIZE, 1024, 30.0)
    with offline_ee() as ee:
        api._ee = ee
        task = api.export_task(recipe(), grid, "eo-bucket", "runs/x/EPSG_32721/x1_y2.tif", "eocausal test")
        config = dict(task.config)
        expression = ee.serializer.encode(config.pop("expression"), for_cloud_api=True)
    options = config["fileExportOptions"]
    assert options["fileFormat"] == "GEO_TIFF" and options["geoTiffOptions"]["cloudOptimized"] is True
    assert options["cloudStorageDestination"] == {"bucket": "eo-bucket", "filenamePrefix": "runs/x/EPSG_32721/x1_y2"}
    side = 1024 + SIZE - 1
    # One file: its tiles at least the image's size (a multiple of the 256 px shard).
    assert options["geoTiffOptions"]["tileDimensions"] == {"width": 1280, "height": 1280}
    assert int(config["maxPixels"]["value"]) >= side * side
    result = expression["values"][expression["result"]]["functionInvocationValue"]
    assert result["functionName"] == "Image.clipToBoundsAndScale"
    rect = result["arguments"]["geometry"]["functionInvocationValue"]["arguments"]["coordinates"]["constantValue"]
    assert rect == [0, 0, side, side]
    text = str(expression)
    t = grid["affineTransform"]
    assert CRS in text and repr(t["translateX"]) in text and repr(t["translateY"]) in text


def test_an_unusable_file_in_the_bucket_fails_its_block_not_the_others(aligned_scene, tmp_path):
    points = points_of(units_grid(30))
    blocks = blocks_of(points)
    bad = sorted(blocks, key=lambda b: (b.by, b.bx))[0]
    fake = FakeEarthEngine(aligned_scene, export_root=tmp_path / "bucket")
    src = export_source(fake)
    target = tmp_path / "bucket" / "eo-bucket" / src.object_name(bad, SIZE)
    target.parent.mkdir(parents=True)
    with rasterio.open(target, "w", driver="GTiff", width=8, height=8, count=2, dtype="float32", crs=CRS,
                       transform=rasterio.Affine(30.0, 0, 0, 0, -30.0, 0)) as dst:
        dst.write(np.ones((2, 8, 8), np.float32))
    delivered = []
    with pytest.raises(EarthEngineExportError, match=rf"block {bad.label} .*has 2 bands, expected 6"):
        for i, _ in src.iter_chips(points, SIZE):
            delivered.append(i)
    assert sorted(delivered) == sorted(set(range(len(points))) - set(blocks[bad]))
    assert src.export_stats.tasks_started == len(blocks) - 1
