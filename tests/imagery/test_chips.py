"""Chip extraction: exclusions with reasons, the content-addressed cache, atomic writes, loading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest
from pyproj import Transformer

from eocausal.imagery import chips as chips_module
from eocausal.imagery import chipstore
from eocausal.imagery.chips import INDEX_COLUMNS, chip_key, chip_path, extract_chips, load_chips, stored_chip_keys
from eocausal.imagery.geotiff import GeoTiffSource, ImageryError
from tests.conftest import from_origin, write_geotiff

CRS = "EPSG:32633"
TRANSFORM = from_origin(500_000.0, 4_500_000.0, 30.0, 30.0)
SIZE = 8


@pytest.fixture
def scene(tmp_path):
    """64 x 64 px, 2 bands of uint16 DNs; columns 0-9 are an undeclared zero border."""
    rng = np.random.default_rng(1)
    data = rng.integers(100, 4000, size=(2, 64, 64), dtype=np.uint16)
    data[:, :, :10] = 0
    return write_geotiff(tmp_path / "imagery" / "scene.tif", data, CRS, TRANSFORM)


def _lonlat(col: float, row: float) -> tuple[float, float]:
    x = TRANSFORM.c + TRANSFORM.a * col
    y = TRANSFORM.f + TRANSFORM.e * row
    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


def _units(positions: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = []
    for unit_id, (col, row) in positions.items():
        lon, lat = _lonlat(col, row)
        rows.append({"unit_id": unit_id, "lat": lat, "lon": lon})
    return pd.DataFrame(rows)


# Unit -> (col, row) pixel position. 'edge' sits two pixels into the data next to the zero
# border: 2 of its 8 chip columns are zeros (25 % nodata).
POSITIONS = {
    "u-centre": (32.5, 32.5),
    "u-outside": (-40.5, 20.5),
    "u-border": (4.5, 20.5),
    "u-edge": (12.5, 40.5),
    "u-corner": (63.5, 63.5),
}


def test_chip_key_rounds_coordinates_and_separates_inputs():
    base = chip_key("fp", 64, -25.3, -54.6)
    assert len(base) == 64 and int(base, 16) >= 0
    assert chip_key("fp", 64, -25.3 + 4e-8, -54.6 - 4e-8) == base  # same 1e-7 grid cell
    assert chip_key("fp", 64, -25.3 + 2e-7, -54.6) != base
    assert chip_key("fp", 32, -25.3, -54.6) != base
    assert chip_key("other", 64, -25.3, -54.6) != base
    assert chip_key("fp", 64, -54.6, -25.3) != base  # lat/lon are not interchangeable
    assert chip_key("fp", 8, -1e-9, 0.0) == chip_key("fp", 8, 0.0, 0.0)  # no '-0.0' key


def test_statuses_reasons_and_input_order(scene, tmp_path):
    source = GeoTiffSource(scene.parent)
    units = _units(POSITIONS).iloc[::-1].reset_index(drop=True)  # input order must be kept

    result = extract_chips(units, source, SIZE, tmp_path / "cache", max_nodata_share=0.2)

    index = result.index.set_index("unit_id", drop=False)
    assert list(result.index.columns) == INDEX_COLUMNS
    assert result.index["unit_id"].tolist() == units["unit_id"].tolist()
    assert index.loc["u-centre", "status"] == "ok" and pd.isna(index.loc["u-centre", "reason"])
    assert index.loc["u-centre", "valid_share"] == 1.0
    assert index.loc["u-centre", "source_file"] == "scene.tif"

    out = index.loc["u-outside"]
    assert (out["status"], out["reason"], out["valid_share"]) == ("excluded", "outside_coverage", 0.0)
    assert out["chip_key"] is None and out["source_file"] is None

    for unit, share in [("u-border", 0.0), ("u-edge", 0.75)]:
        assert index.loc[unit, "status"] == "excluded"
        assert index.loc[unit, "reason"] == "nodata_share_above_max"
        assert index.loc[unit, "valid_share"] == pytest.approx(share)
    # The corner chip runs off the raster: 3 of its 8 rows and columns are outside.
    assert index.loc["u-corner", "valid_share"] == pytest.approx(25 / 64)
    assert index.loc["u-corner", "reason"] == "nodata_share_above_max"
    assert result.n_extracted == len(units) and result.n_cached == 0


def test_max_nodata_share_is_inclusive(scene, tmp_path):
    units = _units({"u-edge": POSITIONS["u-edge"]})
    source = GeoTiffSource(scene)
    assert extract_chips(units, source, SIZE, tmp_path / "c", 0.25).index["status"][0] == "ok"
    assert extract_chips(units, source, SIZE, tmp_path / "c", 0.24).index["status"][0] == "excluded"


def test_rerun_reads_no_imagery_and_gives_the_same_index(scene, tmp_path, monkeypatch):
    source = GeoTiffSource(scene)
    units = _units(POSITIONS)
    first = extract_chips(units, source, SIZE, tmp_path / "cache", 0.2)

    def no_reading(*args, **kwargs):
        raise AssertionError("imagery was read on a cached re-run")

    monkeypatch.setattr(GeoTiffSource, "read_chips", no_reading)
    second = extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "cache", 0.2)

    assert second.n_extracted == 0 and second.n_cached == len(units)
    pd.testing.assert_frame_equal(second.index, first.index)
    # The verdict is re-decided from the cached mask: a looser limit admits the edge unit, free.
    looser = extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "cache", 0.3)
    assert looser.n_extracted == 0
    assert looser.index.set_index("unit_id").loc["u-edge", "status"] == "ok"


def test_batched_reading_gives_the_same_result(scene, tmp_path, monkeypatch):
    units = _units(POSITIONS)
    whole = extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "a", 0.2)
    monkeypatch.setattr(chips_module, "_READ_BATCH", 2)
    batched = extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "b", 0.2)

    pd.testing.assert_frame_equal(batched.index, whole.index)
    np.testing.assert_array_equal(load_chips(batched.index, tmp_path / "b")[0], load_chips(whole.index, tmp_path / "a")[0])


def test_changed_imagery_misses_the_cache(scene, tmp_path):
    units = _units({"u-centre": POSITIONS["u-centre"]})
    extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "cache", 0.2)
    data = np.full((2, 64, 64), 7, dtype=np.uint16)
    write_geotiff(scene, data, CRS, TRANSFORM)

    again = extract_chips(units, GeoTiffSource(scene), SIZE, tmp_path / "cache", 0.2)

    assert again.n_extracted == 1
    stack, _ = load_chips(again.index, tmp_path / "cache")
    assert (stack == 7).all()


def test_cache_layout_compact_dtype_and_no_temp_files(scene, tmp_path):
    cache = tmp_path / "cache"
    result = extract_chips(_units(POSITIONS), GeoTiffSource(scene), SIZE, cache, 0.2)

    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert [p.parent for p in files] == [chipstore.parts_dir(cache)] and files[0].suffix == ".parquet"  # one part
    table = pq.read_table(files[0])
    assert table.schema.equals(chipstore.SCHEMA, check_metadata=False)
    assert table.num_rows == len(POSITIONS)  # the outside verdict is cached too
    assert stored_chip_keys(cache) == set(result.index["chip_key"].dropna()) | {
        chip_key(GeoTiffSource(scene).fingerprint(), SIZE, *_units(POSITIONS).set_index("unit_id").loc["u-outside", ["lat", "lon"]])
    }
    key = result.index.set_index("unit_id").loc["u-centre", "chip_key"]
    row = table.filter(pa.compute.equal(table["chip_key"], key)).to_pylist()[0]
    assert row["dtype"] == np.dtype(np.uint16).str  # raw DNs stored compactly, exactly
    assert row["shape"] == [2, SIZE, SIZE] and len(row["data"]) == 2 * SIZE * SIZE * 2
    assert len(row["valid"]) == SIZE * SIZE and not row["outside"]


def test_failed_write_leaves_earlier_parts_and_no_temp_file(scene, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = chipstore.pq.write_table

    def write_that_dies(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            where.write(b"PAR1 partial")  # some bytes reach the temp file first
            raise KeyboardInterrupt("killed mid-write")
        return real_write(table, where, **kw)

    monkeypatch.setattr(chipstore, "PART_ROWS", 2)
    monkeypatch.setattr(chipstore.pq, "write_table", write_that_dies)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract_chips(_units(POSITIONS), GeoTiffSource(scene), SIZE, cache, 0.2)

    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".parquet"  # only the part written before the kill
    assert len(stored_chip_keys(cache)) == 2  # the part being written is lost, no more
    monkeypatch.setattr(chipstore.pq, "write_table", real_write)
    resumed = extract_chips(_units(POSITIONS), GeoTiffSource(scene), SIZE, cache, 0.2)
    assert resumed.n_cached == 2 and resumed.n_extracted == len(POSITIONS) - 2


def test_parts_reach_their_name_only_by_renaming_a_complete_temp_file(scene, tmp_path, monkeypatch):
    renames = []
    real_replace = chipstore.os.replace

    def recording_replace(src, dst):
        src, dst = str(src), str(dst)
        table = pq.read_table(src)  # complete and readable before it gets its name
        assert all(len(v) in (0, SIZE * SIZE) for v in table["valid"].to_pylist())
        renames.append((src, dst, chipstore.os.path.exists(dst), table.num_rows))
        real_replace(src, dst)

    monkeypatch.setattr(chipstore, "PART_ROWS", 2)
    monkeypatch.setattr(chipstore.os, "replace", recording_replace)
    result = extract_chips(_units(POSITIONS), GeoTiffSource(scene), SIZE, tmp_path / "cache", 0.2)

    assert [n for *_, n in renames] == [2, 2, 1] and result.n_extracted == len(POSITIONS)
    for src, dst, existed, _ in renames:
        assert src != dst and not existed and dst.endswith(".parquet")
        assert chipstore.os.path.dirname(src) == chipstore.os.path.dirname(dst)


def test_hard_kill_mid_write_leaves_no_part_under_its_name(scene, tmp_path, monkeypatch):
    """A killed process runs no cleanup: the part being written must simply not exist yet."""
    real_write = chipstore.pq.write_table

    def write_then_die(table, where, **kw):
        real_write(table, where, **kw)
        where.flush()
        raise SystemExit("killed after writing, before renaming")

    monkeypatch.setattr(chipstore.pq, "write_table", write_then_die)
    monkeypatch.setattr(chipstore.os, "unlink", lambda path: None)  # no cleanup ran
    units = _units({"u-centre": POSITIONS["u-centre"]})
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit):
        extract_chips(units, GeoTiffSource(scene), SIZE, cache, 0.2)

    assert stored_chip_keys(cache) == set() and chipstore.part_paths(cache) == []
    assert [p.name.endswith(".tmp") for p in chipstore.parts_dir(cache).iterdir()] == [True]  # the leftover
    monkeypatch.undo()
    resumed = extract_chips(units, GeoTiffSource(scene), SIZE, cache, 0.2)  # the leftover is ignored
    assert resumed.n_extracted == 1 and resumed.index["status"][0] == "ok"


def test_load_chips_stacks_ok_rows_in_index_order(scene, tmp_path):
    source = GeoTiffSource(scene)
    positions = {f"u{i}": (20.5 + 3 * i, 10.5 + 5 * i) for i in range(6)}
    positions["u-border"] = POSITIONS["u-border"]
    units = _units(positions)
    result = extract_chips(units, source, SIZE, tmp_path / "cache", 0.2)

    shuffled = result.index.sample(frac=1.0, random_state=3).reset_index(drop=True)
    stack, valid = load_chips(shuffled, tmp_path / "cache")

    ok = shuffled[shuffled["status"] == "ok"]
    assert stack.shape == (len(ok), 2, SIZE, SIZE) and stack.dtype == np.float32
    assert valid.shape == (len(ok), SIZE, SIZE) and valid.dtype == bool
    assert "u-border" not in ok["unit_id"].tolist() and len(ok) == 6
    lookup = units.set_index("unit_id")
    for k, unit_id in enumerate(ok["unit_id"]):
        direct = source.read_chip(lookup.loc[unit_id, "lon"], lookup.loc[unit_id, "lat"], SIZE)
        np.testing.assert_array_equal(stack[k], direct.data)
        np.testing.assert_array_equal(valid[k], direct.valid)


def test_missing_or_corrupt_part_is_a_clear_error_and_extraction_repairs_it(scene, tmp_path, monkeypatch):
    monkeypatch.setattr(chipstore, "PART_ROWS", 1)  # one chip per part, to damage u-b's alone
    cache = tmp_path / "cache"
    units = _units({"u-a": (30.5, 30.5), "u-b": (40.5, 30.5)})
    result = extract_chips(units, GeoTiffSource(scene), SIZE, cache, 0.2)
    located = chipstore.scan(cache).found
    part_b = located[result.index["chip_key"][1]].part

    part_b.write_bytes(part_b.read_bytes()[:100])  # truncated by a disk fault
    with pytest.raises(ImageryError, match=r"u-b.*corrupt part"):
        load_chips(result.index, cache)

    repaired = extract_chips(units, GeoTiffSource(scene), SIZE, cache, 0.2)
    assert repaired.n_extracted == 1 and repaired.n_cached == 1
    assert load_chips(repaired.index, cache)[0].shape == (2, 2, SIZE, SIZE)

    for part in chipstore.part_paths(cache):
        if part != located[result.index["chip_key"][0]].part:
            part.unlink()
    with pytest.raises(ImageryError, match=r"u-b.*missing"):
        load_chips(result.index, cache)


def test_a_legacy_npz_chip_is_read_and_a_corrupt_one_is_a_clear_error(scene, tmp_path):
    source = GeoTiffSource(scene)
    cache = tmp_path / "cache"
    units = _units({"u-a": (30.5, 30.5), "u-b": (40.5, 30.5)})
    for la, lo in zip(units["lat"], units["lon"]):
        chips_module._store(chip_path(cache, chip_key(source.fingerprint(), SIZE, la, lo)), source.read_chip(lo, la, SIZE))
    result = extract_chips(units, source, SIZE, cache, 0.2)
    assert result.n_cached == 2 and result.n_extracted == 0 and chipstore.part_paths(cache) == []
    path_b = chip_path(cache, result.index["chip_key"][1])
    path_b.write_bytes(path_b.read_bytes()[:100])
    with pytest.raises(ImageryError, match=r"u-b.*corrupt"):
        load_chips(result.index, cache)
    repaired = extract_chips(units, source, SIZE, cache, 0.2)  # read again, into a part
    assert repaired.n_extracted == 1 and len(chipstore.part_paths(cache)) == 1
    assert load_chips(repaired.index, cache)[0].shape == (2, 2, SIZE, SIZE)


def test_bad_units_are_rejected(scene, tmp_path):
    source = GeoTiffSource(scene)
    with pytest.raises(ValueError, match="lack columns"):
        extract_chips(pd.DataFrame({"unit_id": ["a"], "lat": [1.0]}), source, SIZE, tmp_path, 0.2)
    units = pd.DataFrame({"unit_id": ["a", "b"], "lat": [40.6, np.nan], "lon": [15.0, 15.0]})
    with pytest.raises(ValueError, match=r"non-finite coordinates: \['b'\]"):
        extract_chips(units, source, SIZE, tmp_path, 0.2)


def test_demo_study_exclusions_match_the_generators_truth(tiny_study, tmp_path):
    """The reader and the generator agree on which units are imageable."""
    from eocausal.study import load_study

    study = load_study(tiny_study)
    survey = pd.read_csv(study.survey_path)
    truth = pd.read_csv(tiny_study.parent / "truth_units.csv")
    units = survey.rename(columns={"village_code": "unit_id", "latitude": "lat", "longitude": "lon"})

    result = extract_chips(
        units, GeoTiffSource(study.imagery_path), study.imagery.chip_size_px, tmp_path / "cache",
        study.imagery.max_nodata_share,
    )

    assert (result.index["status"] == "ok").astype(int).tolist() == truth["imageable"].tolist()
    np.testing.assert_allclose(result.index["valid_share"], truth["chip_valid_share"], atol=1e-6)
    assert 0 < (truth["imageable"] == 0).sum() < len(truth) // 4  # some exclusions, not most


def test_reads_locally_is_false_for_remote_and_streaming_sources():
    from types import SimpleNamespace

    assert chips_module.reads_locally(SimpleNamespace(remote=False, read_chips=None))
    assert not chips_module.reads_locally(SimpleNamespace(remote=True, read_chips=None))  # a remote COG
    assert not chips_module.reads_locally(SimpleNamespace(iter_chips=None))  # STAC, Earth Engine
