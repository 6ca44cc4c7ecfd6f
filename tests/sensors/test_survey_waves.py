"""The landing-folder sensor, invoked with Dagster's sensor context on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sensors.survey_waves import SURVEY_WAVE_SENSOR


def drop(landing: Path, name: str, df: pd.DataFrame, mtime: int) -> Path:
    """A wave written elsewhere and moved in (as writers should), with a chosen mtime for ordering."""
    landing.mkdir(parents=True, exist_ok=True)
    part = landing / f"{name}.part"
    df.to_csv(part, index=False)
    os.utime(part, (mtime, mtime))
    path = landing / name
    os.replace(part, path)
    return path


def tick(defs, cursor=None):
    # the one study's sensor: <safe study>__survey_wave_sensor
    [sensor] = [s for s in defs.sensors if s.name.endswith(f"__{SURVEY_WAVE_SENSOR}")]
    result = sensor(dg.build_sensor_context(cursor=cursor))
    return result


def test_sensor_is_wired_to_the_refresh_job(defs_for, names):
    sensor = defs_for.resolve_sensor_def(names(SURVEY_WAVE_SENSOR))
    assert sensor.job_name == names("refresh_job")  # a refresh's first wave (sensors/refresh.py: the rest)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_no_landing_folder_means_nothing_to_do(defs_for):
    result = tick(defs_for)
    assert not result.run_requests
    assert "no new valid survey wave" in result.skip_reason.skip_message
    assert json.loads(result.cursor) == {}


def test_good_wave_installs_and_requests_one_run(defs_for, study_dir, survey):
    wave = survey.copy()
    wave["asset_index"] = (pd.to_numeric(wave["asset_index"]) + 0.5).round(4).astype(str)
    path = drop(study_dir / "landing", "wave_2.csv", wave, mtime=1_700_000_000)

    result = tick(defs_for)
    [request] = result.run_requests
    assert request.tags["eocausal/trigger"] == "survey_wave"
    assert request.tags["eocausal/survey_wave"] == "wave_2.csv"
    assert request.run_key.startswith("survey-wave:wave_2.csv:")
    # the study's survey is now the wave, byte for byte; the wave stays in landing/ as history
    assert (study_dir / "villages.csv").read_bytes() == path.read_bytes()
    assert path.exists()
    assert "wave_2.csv" in json.loads(result.cursor)

    # the next tick, with the cursor, sees nothing new
    again = tick(defs_for, cursor=result.cursor)
    assert not again.run_requests and again.skip_reason is not None


def test_wave_rewritten_in_place_counts_as_new(defs_for, study_dir, survey):
    landing = study_dir / "landing"
    drop(landing, "wave.csv", survey, mtime=1_700_000_000)
    first = tick(defs_for)
    changed = survey.iloc[:-5]
    drop(landing, "wave.csv", changed, mtime=1_700_000_100)
    second = tick(defs_for, cursor=first.cursor)
    assert len(second.run_requests) == 1
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert len(pd.read_csv(study_dir / "villages.csv")) == len(survey) - 5


def test_bad_wave_is_quarantined_with_its_report(defs_for, study_dir, survey):
    before = (study_dir / "villages.csv").read_bytes()
    bad = survey.copy()
    bad.loc[7, "village_code"] = bad.loc[3, "village_code"]  # duplicated id
    bad.loc[11, "latitude"] = "123.5"  # out of range
    path = drop(study_dir / "landing", "wave_bad.csv", bad, mtime=1_700_000_000)

    result = tick(defs_for)
    assert not result.run_requests
    assert "1 quarantined" in result.skip_reason.skip_message
    assert not path.exists()
    quarantine = study_dir / "landing" / "quarantine"
    [moved] = [p for p in quarantine.iterdir() if p.name.endswith("_wave_bad.csv")]
    report = json.loads(moved.with_name(moved.name + ".report.json").read_text())
    assert report["accepted"] is False and report["file"] == "wave_bad.csv"
    rules = {f["rule"]: f for f in report["failures"]}
    assert rules["unique unit_id"]["rows"] == [3, 7]
    assert rules["lat within [-90, 90]"]["rows"] == [11]
    assert "unique unit_id" in report["message"] and "rows 3, 7" in report["message"]
    # the study's survey is untouched and the quarantined file is not looked at again
    assert (study_dir / "villages.csv").read_bytes() == before
    assert json.loads(result.cursor) == {}
    assert not tick(defs_for, cursor=result.cursor).run_requests


def test_one_scan_with_bad_and_good_waves(defs_for, study_dir, survey):
    landing = study_dir / "landing"
    older = drop(landing, "wave_a.csv", survey.iloc[:-10], mtime=1_700_000_000)
    drop(landing, "wave_b.csv", survey.drop(columns=["aid_received"]), mtime=1_700_000_050)
    newest = drop(landing, "wave_c.csv", survey.iloc[:-20], mtime=1_700_000_100)
    # still being written, hidden, or a folder: never read
    (landing / "wave_d.csv.part").write_text("village_code\n")
    (landing / ".wave_e.csv").write_text("village_code\n")

    result = tick(defs_for)
    [request] = result.run_requests  # one run, for the newest good wave
    assert request.tags["eocausal/survey_wave"] == "wave_c.csv"
    assert (study_dir / "villages.csv").read_bytes() == newest.read_bytes()
    assert set(json.loads(result.cursor)) == {"wave_a.csv", "wave_c.csv"}
    assert older.exists() and (landing / "wave_d.csv.part").exists() and (landing / ".wave_e.csv").exists()
    [report] = (landing / "quarantine").glob("*_wave_b.csv.report.json")
    assert "required column 'aid_received' present" in json.loads(report.read_text())["message"]


@pytest.mark.parametrize("kind", ["symlink", "parquet", "not_utf8", "empty"])
def test_unusable_files_are_quarantined(defs_for, study_dir, survey, tmp_path, kind):
    landing = study_dir / "landing"
    landing.mkdir()
    outside = tmp_path / "outside.csv"
    survey.to_csv(outside, index=False)
    if kind == "symlink":
        (landing / "wave.csv").symlink_to(outside)
        expected = "not a regular file"
    elif kind == "parquet":
        survey.to_parquet(landing / "wave.parquet")
        expected = "format '.csv'"
    elif kind == "not_utf8":
        (landing / "wave.csv").write_bytes("village_code,latitude\nS\xe3o Paulo,1\n".encode("latin-1"))
        expected = "not UTF-8"
    else:
        (landing / "wave.csv").write_bytes(b"")
        expected = "empty"
    result = tick(defs_for)
    assert not result.run_requests
    [report] = (landing / "quarantine").glob("*.report.json")
    assert expected in json.loads(report.read_text())["message"]
    assert outside.exists() and not any(p.name.startswith("wave") for p in landing.iterdir())
