"""Malformed survey and imagery input, each run through the whole graph on top of a published study.

Every case must fail the run with a message naming the rule and the rows, units or file at fault,
and leave the published warehouse byte-for-byte as it was (and the private warehouse's history
unchanged). The cases share one working folder: a case that changed anything would fail its own
before/after comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml

from tests.conftest import write_geotiff
from tests.faults import support

pytestmark = pytest.mark.slow

SURVEY = "villages.csv"


def survey(study: Path) -> pd.DataFrame:
    return pd.read_csv(study / SURVEY, dtype=str, keep_default_na=False)


def rewrite(study: Path, change) -> None:
    df = survey(study)
    change(df)
    df.to_csv(study / SURVEY, index=False)


def set_cell(column: str, rows: list[int], value: str):
    def change(df):
        df.loc[rows, column] = value
    return change


def scene(study: Path) -> Path:
    [tif] = (study / "imagery").glob("*.tif")
    return tif


def rewrite_scene(study: Path, data=None, crs="keep", dtype=None, nodata=None) -> None:
    path = scene(study)
    with rasterio.open(path) as src:
        array, profile = src.read(), src.profile
    array = array if data is None else data(array)
    path.unlink()
    write_geotiff(path, array.astype(dtype or array.dtype), profile["crs"] if crs == "keep" else crs,
                  profile["transform"], nodata=nodata)


def edit_study(study: Path, section: str, **values) -> None:
    doc = yaml.safe_load((study / "study.yaml").read_text())
    doc[section].update(values)
    (study / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def swap_lat_lon(df):
    df["latitude"], df["longitude"] = df["longitude"].copy(), df["latitude"].copy()


def _dup_id(df):
    df.loc[7, "village_code"] = df.loc[3, "village_code"]


def _one_arm(df):
    df["aid_received"] = "1"


def _inf_block(a):
    a = a.astype("float32")
    a[:, 100:300, 100:300] = np.inf  # +inf pixels: a float check passes them, sums overflow
    return a


def _yes_no(df):
    df["aid_received"] = df["aid_received"].map({"0": "no", "1": "yes"})


# (case, how to break the study folder, substrings the failure message must contain)
CASES = [
    # -- survey: structure and encoding
    ("missing_column", lambda s: rewrite(s, lambda df: df.drop(columns=["aid_received"], inplace=True)),
     ["required column 'aid_received' present"]),
    ("empty_file", lambda s: (s / SURVEY).write_bytes(b""), ["survey file is empty"]),
    ("header_only", lambda s: (s / SURVEY).write_text((s / SURVEY).read_text().splitlines()[0] + "\n"),
     ["header but no rows"]),
    ("latin1_encoding", lambda s: (s / SURVEY).write_bytes(
        (s / SURVEY).read_text().replace("V0005", "São-5").encode("latin-1")), ["not UTF-8"]),
    ("utf16_encoding", lambda s: (s / SURVEY).write_bytes((s / SURVEY).read_text().encode("utf-16")),
     ["not UTF-8"]),
    ("semicolon_delimited", lambda s: (s / SURVEY).write_text((s / SURVEY).read_text().replace(",", ";")),
     ["required column 'village_code' present", "required column 'aid_received' present"]),
    ("ragged_rows", lambda s: (s / SURVEY).write_text(
        (s / SURVEY).read_text().replace("\nV0004,", "\nV0004,extra,fields,", 1)), ["could not be parsed", "line"]),
    ("binary_garbage", lambda s: (s / SURVEY).write_bytes(np.random.default_rng(0).bytes(4096)),
     ["survey file"]),
    # -- survey: types and values
    ("text_in_outcome", lambda s: rewrite(s, set_cell("asset_index", [5], "high")),
     ["rule 'outcome numeric' failed", "rows 5", "high"]),
    ("dms_latitude", lambda s: rewrite(s, set_cell("latitude", [8], "41°58'N")),
     ["rule 'lat numeric' failed", "rows 8"]),
    ("treatment_yes_no", lambda s: rewrite(s, _yes_no), ["rule 'treatment numeric' failed", "rows 0, 1, 2"]),
    ("empty_outcome", lambda s: rewrite(s, set_cell("asset_index", [3, 4], "")),
     ["rule 'outcome not null' failed", "rows 3, 4"]),
    ("nan_outcome", lambda s: rewrite(s, set_cell("asset_index", [6], "NaN")),
     ["rule 'outcome not null' failed", "rows 6"]),
    ("inf_outcome", lambda s: rewrite(s, set_cell("asset_index", [7], "inf")),
     ["rule 'outcome finite (|value| <= 1e15)' failed", "rows 7"]),
    ("huge_outcome", lambda s: rewrite(s, set_cell("asset_index", [9], "9.96921e36")),  # a netCDF fill value
     ["rule 'outcome finite (|value| <= 1e15)' failed", "rows 9"]),
    ("huge_covariate", lambda s: rewrite(s, set_cell("market_access", [10], "1e200")),
     ["rule 'cov_market_access finite (|value| <= 1e15)' failed", "rows 10"]),
    ("missing_covariate", lambda s: rewrite(s, set_cell("household_size", [11], "")),
     ["rule 'cov_household_size not null' failed", "rows 11"]),
    ("missing_unit_id", lambda s: rewrite(s, set_cell("village_code", [0], "")),
     ["rule 'unit_id not null' failed", "rows 0"]),
    ("duplicated_ids", lambda s: rewrite(s, _dup_id), ["rule 'unique unit_id' failed", "rows 3, 7"]),
    ("lat_out_of_range", lambda s: rewrite(s, set_cell("latitude", [4], "123.0")),
     ["rule 'lat within [-90, 90]' failed", "rows 4"]),
    ("lon_out_of_range", lambda s: rewrite(s, set_cell("longitude", [2], "-200")),
     ["rule 'lon within [-180, 180]' failed", "rows 2"]),
    ("treatment_not_binary", lambda s: rewrite(s, set_cell("aid_received", [2], "2")),
     ["rule 'treatment binary (0/1)' failed", "rows 2"]),
    ("one_arm_only", lambda s: rewrite(s, _one_arm), ["rule 'treatment arm 0 present' failed"]),
    ("swapped_lat_lon", lambda s: rewrite(s, swap_lat_lon),
     ["chip_usability", "outside_coverage", "are lat and lon swapped", "rows 0, 1, 2"]),
    # -- imagery
    ("corrupt_tiff", lambda s: scene(s).write_bytes(scene(s).read_bytes()[: scene(s).stat().st_size // 3]),
     ["image_chips", "scene.tif", "corrupt"]),
    ("not_a_tiff", lambda s: scene(s).write_text("this is not an image\n"), ["scene.tif", "not a TIFF"]),
    ("crs_missing", lambda s: rewrite_scene(s, crs=None), ["scene.tif", "no CRS"]),
    ("empty_band_list", lambda s: edit_study(s, "imagery", bands=[]), ["'bands' is empty"]),
    ("band_out_of_range", lambda s: edit_study(s, "imagery", bands=[1, 7]), ["band indexes [7] out of range"]),
    ("one_pixel_raster", lambda s: rewrite_scene(s, data=lambda a: a[:, :1, :1]),
     ["chip_usability", "have a usable chip", "rows 0, 1, 2"]),
    ("all_nodata_imagery", lambda s: rewrite_scene(s, data=lambda a: np.zeros_like(a)),
     ["chip_usability", "nodata_share_above_max", "rows 0, 1, 2"]),
    ("nan_imagery", lambda s: rewrite_scene(s, data=lambda a: np.full(a.shape, np.nan), dtype="float32"),
     ["chip_usability", "nodata_share_above_max"]),
    ("inf_pixels", lambda s: rewrite_scene(s, data=_inf_block, dtype="float32"),
     ["image_embeddings", "rule 'embedding values finite' failed", "units V0"]),
    ("no_imagery_files", lambda s: scene(s).unlink(), ["no GeoTIFF"]),
]


@pytest.fixture(scope="module")
def shared_workdir(ops):
    _, workdir = support.scenario(ops, "bad_input")
    return workdir


def _state(workdir: Path) -> dict:
    return {
        "published": support.file_sha256(workdir / "published" / "warehouse.duckdb"),
        "history": support.estimate_history(workdir / "warehouse.duckdb"),
        "estimate_files": sorted(p.name for p in (workdir / "lake" / "effect_estimates").glob("*.parquet")),
    }


@pytest.mark.parametrize("case, breaker, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_and_nothing_published_changes(ops, shared_workdir, tmp_path, case, breaker, expected):
    from assets.runner import run_study

    study = tmp_path / "study"
    shutil.copytree(ops.study_dir, study, ignore=shutil.ignore_patterns("eocausal_work"))
    breaker(study)
    before = _state(shared_workdir)

    outcome = run_study(study / "study.yaml", shared_workdir)

    message = "\n".join(outcome.errors + outcome.failed_checks)
    (ops.logs / f"bad_input_{case}.txt").write_text(message)
    assert not outcome.success, f"{case} was accepted"
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"
    after = _state(shared_workdir)
    assert after["published"] == before["published"], f"{case} changed the published warehouse"
    pd.testing.assert_frame_equal(after["history"], before["history"])
    assert after["estimate_files"] == before["estimate_files"]


def test_at_least_twenty_kinds():
    assert len({c[0] for c in CASES}) >= 20
