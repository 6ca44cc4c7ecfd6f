"""The chip store under kills and concurrent writers: resume without refetching, no truncated parts;
bytes identical to the per-chip .npz layout it replaced, whose caches it still reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from eocausal.imagery import chips as chips_module
from eocausal.imagery import chipstore
from eocausal.imagery.chips import _HOST_TAG, chip_key, chip_path, extract_chips, load_chips, stored_chip_keys
from eocausal.imagery.geotiff import GeoTiffSource
from tests.imagery.fake_earthengine import FakeEarthEngine
from tests.imagery.test_earthengine import SIZE, aligned_scene, source, units_grid  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
import pandas as pd
from eocausal.imagery import chipstore
from eocausal.imagery.chips import extract_chips
from tests.imagery.fake_earthengine import FakeEarthEngine
from tests.imagery.test_earthengine import SIZE, source
chipstore.PART_ROWS = 10  # small parts, so the kill lands between parts
args = json.loads(sys.argv[1])
units = pd.DataFrame(args["units"])
fake = FakeEarthEngine(args["scene"], latency_s=0.03)
print("started", flush=True)
extract_chips(units, source(fake, max_concurrency=4), SIZE, args["cache"], 0.2)
print("finished", flush=True)
"""


def test_a_killed_chip_run_loses_at_most_one_part_and_resumes_without_refetching(aligned_scene, tmp_path):
    units = units_grid(100)
    cache = tmp_path / "cache"
    args = json.dumps({"units": units.to_dict("list"), "scene": str(aligned_scene), "cache": str(cache)})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(stored_chip_keys(cache)) < 25:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child stored too few chips in time"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # no cleanup runs
    finally:
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    stored = stored_chip_keys(cache)
    assert 25 <= len(stored) < 100, "the kill must land midway"
    # only whole parts of at most PART_ROWS chips: the part being gathered is all the kill loses
    assert all(pq.ParquetFile(p).metadata.num_rows <= 10 for p in chipstore.part_paths(cache))

    fresh = FakeEarthEngine(aligned_scene)
    resumed = extract_chips(units, source(fresh), SIZE, cache, 0.2)

    assert fresh.calls == 100 - len(stored)  # finished chips are not fetched again
    assert resumed.n_cached == len(stored) and (resumed.index["status"] == "ok").all()
    data, _ = load_chips(resumed.index, cache)  # every chip, old and new, is whole
    assert data.shape == (100, 3, SIZE, SIZE)
    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert leftovers == []  # the dead writer's temp files are swept


def test_stale_temp_files_are_swept_but_a_live_writers_are_kept(tmp_path):
    shard = tmp_path / "ab"
    shard.mkdir()
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    dead = shard / f".abcdef.{_HOST_TAG}.{dead_pid}.x1.tmp"
    live = shard / f".abcdef.{_HOST_TAG}.{os.getpid()}.x2.tmp"
    foreign = shard / f".abcdef.0000beef.{dead_pid}.x3.tmp"  # another host: cannot tell, keep
    old_foreign = shard / f".abcdef.0000beef.{dead_pid}.x4.tmp"
    chip = shard / "abcdef.npz"
    parts = tmp_path / "parts"
    parts.mkdir()
    dead_part = parts / f".00000001733000000.{_HOST_TAG}.{dead_pid}.x5.tmp"
    live_part = parts / f".00000001733000000.{_HOST_TAG}.{os.getpid()}.x6.tmp"
    part = parts / "00000001733000000-x.parquet"
    for p in (dead, live, foreign, old_foreign, chip, dead_part, live_part, part):
        p.write_bytes(b"x")
    os.utime(old_foreign, (time.time() - 3 * 86400, time.time() - 3 * 86400))

    assert chips_module._sweep_stale_temp_files(tmp_path) == 3

    assert sorted(p.name for p in shard.iterdir()) == sorted([live.name, foreign.name, chip.name])
    assert sorted(p.name for p in parts.iterdir()) == sorted([live_part.name, part.name])


def test_concurrent_writers_share_one_store_safely(aligned_scene, tmp_path):
    """Two runs over overlapping units at once: both finish, every chip is whole and fetched once or twice."""
    units = units_grid(80)
    cache = tmp_path / "cache"
    fakes = [FakeEarthEngine(aligned_scene, latency_s=0.002), FakeEarthEngine(aligned_scene, latency_s=0.002)]
    results, errors = {}, []

    def run(k: int, subset: pd.DataFrame) -> None:
        try:
            results[k] = extract_chips(subset, source(fakes[k], max_concurrency=4), SIZE, cache, 0.2)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(0, units.iloc[:60])),
               threading.Thread(target=run, args=(1, units.iloc[20:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(stored_chip_keys(cache)) == 80
    assert fakes[0].calls + fakes[1].calls <= 80 + 40  # the overlap at most twice
    again = extract_chips(units, source(FakeEarthEngine(aligned_scene)), SIZE, cache, 0.2)
    assert again.n_cached == 80
    data, valid = load_chips(again.index, cache)
    assert np.isfinite(data).all() and valid.all()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".parquet"]


# -- the layout it replaced: same keys, same bytes, old caches still read -----------------------

DEMO_CROP = REPO / "eocausal" / "data" / "demo" / "landsat8_itaipu_crop.tif"


def _demo_units(n: int, size_px: int) -> pd.DataFrame:
    import rasterio
    from pyproj import Transformer

    with rasterio.open(DEMO_CROP) as ds:
        t, crs, width, height = ds.transform, ds.crs, ds.width, ds.height
    rng = np.random.default_rng(5)
    cols = rng.uniform(-size_px, width + size_px, n)  # some outside, some partly nodata
    rows = rng.uniform(-size_px, height + size_px, n)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(t.c + cols * t.a, t.f + rows * t.e)
    return pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "lat": lat, "lon": lon})


def _legacy_cache(units: pd.DataFrame, source: GeoTiffSource, size_px: int, cache: Path) -> None:
    """The cache the per-chip .npz layout wrote (its writer, kept for this)."""
    for la, lo, chip in zip(units["lat"], units["lon"],
                            source.read_chips(list(zip(units["lon"], units["lat"])), size_px)):
        chips_module._store(chip_path(cache, chip_key(source.fingerprint(), size_px, la, lo)), chip)


def test_parts_hold_the_same_bytes_as_the_npz_chips_they_replace(tmp_path):
    source, size = GeoTiffSource(DEMO_CROP), 32
    units = _demo_units(300, size)
    _legacy_cache(units, source, size, tmp_path / "npz")
    new = extract_chips(units, source, size, tmp_path / "parts", 0.2)
    assert not list((tmp_path / "parts").rglob("*.npz")) and len(chipstore.part_paths(tmp_path / "parts")) == 1
    old = extract_chips(units, source, size, tmp_path / "npz", 0.2)  # served wholly from the npz files
    assert old.n_extracted == 0 and old.n_cached == new.n_extracted
    pd.testing.assert_frame_equal(new.index, old.index)  # same keys, verdicts, shares
    assert set(new.index["status"]) == {"ok", "excluded"} and set(new.index["reason"].dropna()) == {
        "outside_coverage", "nodata_share_above_max"}

    new_data, new_valid = load_chips(new.index, tmp_path / "parts")
    old_data, old_valid = load_chips(old.index, tmp_path / "npz")
    assert new_data.dtype == old_data.dtype == np.float32 and new_valid.dtype == old_valid.dtype == bool
    assert np.array_equal(new_data, old_data) and np.array_equal(new_valid, old_valid)
    assert len(new_data) == int((new.index["status"] == "ok").sum()) > 100

    # the stored bytes themselves: same dtype and raw pixels as each .npz
    rows = {r["chip_key"]: r for r in pq.read_table(chipstore.part_paths(tmp_path / "parts")[0]).to_pylist()}
    keys = stored_chip_keys(tmp_path / "npz")
    assert set(rows) == keys
    for key in keys:
        with np.load(chip_path(tmp_path / "npz", key)) as z:
            assert rows[key]["outside"] == bool(z["outside"])
            assert rows[key]["source_file"] == str(z["source_file"])
            if not rows[key]["outside"]:
                assert rows[key]["dtype"] == z["data"].dtype.str and rows[key]["shape"] == list(z["data"].shape)
                assert rows[key]["data"] == z["data"].tobytes()
                assert rows[key]["valid"] == z["valid"].astype(np.uint8).tobytes()


def test_a_cache_of_npz_chips_and_parts_together_fetches_only_what_neither_holds(tmp_path):
    source, size = GeoTiffSource(DEMO_CROP), 32
    units = _demo_units(60, size)
    cache = tmp_path / "cache"
    _legacy_cache(units.iloc[:20], source, size, cache)
    extract_chips(units.iloc[10:40], source, size, cache, 0.2)  # 20 new chips, into a part

    both = extract_chips(units, source, size, cache, 0.2)

    assert (both.n_cached, both.n_extracted) == (40, 20)
    assert len(stored_chip_keys(cache)) == 60 and len(chipstore.part_paths(cache)) == 2
    data, _ = load_chips(both.index, cache)
    direct = [source.read_chip(lo, la, size) for la, lo in zip(units["lat"], units["lon"])]
    ok = (both.index["status"] == "ok").to_numpy()
    assert np.array_equal(data, np.stack([c.data for c, k in zip(direct, ok) if k]))


def test_a_slow_source_writes_a_part_when_the_time_limit_passes(aligned_scene, tmp_path, monkeypatch):
    """Chips that trickle in are not held back until a part fills: a killed run loses bounded work."""
    monkeypatch.setattr(chipstore, "PART_MAX_SECONDS", 0.0)  # every chip is 'late'
    cache = tmp_path / "cache"
    extract_chips(units_grid(6), source(FakeEarthEngine(aligned_scene), max_concurrency=2), SIZE, cache, 0.2)
    assert [pq.ParquetFile(p).metadata.num_rows for p in chipstore.part_paths(cache)] == [1] * 6


def test_a_part_is_read_by_row_group_not_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(chipstore, "ROW_GROUP_ROWS", 4)
    source, size = GeoTiffSource(DEMO_CROP), 16
    units = _demo_units(40, size)
    result = extract_chips(units, source, size, tmp_path / "cache", 0.9)
    assert pq.ParquetFile(chipstore.part_paths(tmp_path / "cache")[0]).num_row_groups == 10
    read_groups = []
    real = pq.ParquetFile.read_row_group

    def counting(self, group, **kw):
        read_groups.append(group)
        return real(self, group, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    one = result.index[result.index["status"] == "ok"].iloc[[-1]]
    data, _ = load_chips(one, tmp_path / "cache")
    assert len(read_groups) == 1 and data.shape[0] == 1
