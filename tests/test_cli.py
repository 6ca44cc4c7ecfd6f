"""`eocausal run` and `validate` on input the contract rejects (exit 2, the rule, no traceback) and on a
run whose output lacks requested estimates (exit 1, the rows named). The pipeline is replaced by a
stand-in: these cases must be decided before it runs, or from what it returns."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from eocausal.cli import main
from eocausal.quality import requested_estimates
from eocausal.study import AnalysisSpec
from tests.conftest import from_origin, write_geotiff

ANALYSIS = {"estimators": ["difference_in_means", "ipw"], "feature_sets": ["none", "tabular"], "folds": 3}


def study_folder(tmp_path: Path, n: int = 12, name: str = "s1", analysis: dict | None = None, change=None) -> Path:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "code": [f"v{i:03d}" for i in range(n)], "lat": rng.uniform(-25, -24, n), "lon": rng.uniform(-54, -53, n),
        "aid": [i % 2 for i in range(n)], "assets": rng.normal(size=n), "hh": rng.integers(1, 9, n),
    })
    if change:
        change(df)
    df.to_csv(tmp_path / "units.csv", index=False)
    # run and validate check the imagery before any work: a small scene with every unit's chip window
    # inside it (units in lon -54..-53, lat -25..-24; 16 px chips of 1/32 degree)
    write_geotiff(tmp_path / "imagery" / "scene.tif", np.ones((1, 96, 96), dtype="uint8"), "EPSG:4326",
                  from_origin(-55.0, -23.0, 1 / 32, 1 / 32))
    doc = {"name": name,
           "survey": {"path": "units.csv", "unit_id": "code", "lat": "lat", "lon": "lon", "treatment": "aid",
                      "outcome": "assets", "covariates": ["hh"]},
           "imagery": {"source": "geotiff", "path": "imagery/", "chip_size_px": 16},
           "analysis": analysis or ANALYSIS}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path / "study.yaml"


class FakeRunner:
    """Stands in for assets.runner: records calls, returns the outcome it was given."""

    def __init__(self, estimates: pd.DataFrame | None = None):
        self.calls = []
        self.estimates = estimates

    def run_study(self, study_path, workdir=None, **options):
        self.calls.append(study_path)
        return types.SimpleNamespace(success=True, workdir=Path(study_path).parent / "eocausal_work",
                                     estimates=self.estimates, metadata={}, errors=[], failed_checks=[],
                                     log_path=None)


@pytest.fixture
def runner(monkeypatch):
    fake = FakeRunner()
    module = types.ModuleType("assets.runner")
    module.run_study = fake.run_study
    monkeypatch.setitem(sys.modules, "assets.runner", module)
    return fake


def _one_treated(df):
    df["aid"] = [1] + [0] * (len(df) - 1)


def _constant_outcome(df):
    df["assets"] = 3.0


def _constant_covariate(df):
    df["hh"] = 2


def _one_arm(df):
    df["aid"] = 1


def _na_ids(df):
    df.loc[0, "code"], df.loc[1, "code"] = "NA", "NULL"


@pytest.mark.parametrize("change, analysis, words", [
    (None, {**ANALYSIS, "folds": 7}, ["at least 7 treated units (analysis.folds = 7", "6 treated units"]),
    (_one_treated, ANALYSIS, ["at least 3 treated units", "1 treated units: too few for any cross-fitting"]),
    (_constant_outcome, ANALYSIS, ["rule 'outcome not constant' failed", "every unit has outcome = 3.0"]),
    (_constant_covariate, ANALYSIS, ["rule 'cov_hh not constant' failed", "every unit has cov_hh = 2.0"]),
    (_one_arm, ANALYSIS, ["rule 'treatment arm 0 present' failed", "treatment is constant"]),
])
def test_degenerate_designs_exit_2_before_the_pipeline(tmp_path, capsys, runner, change, analysis, words):
    study = study_folder(tmp_path, analysis=analysis, change=change)
    assert main(["run", str(study), "--json"]) == 2
    err = capsys.readouterr()
    assert runner.calls == [] and err.out == ""
    assert err.err.startswith("eocausal: survey rejected: survey: ")
    for w in words:
        assert w in err.err
    assert "Traceback" not in err.err
    assert main(["validate", str(study)]) == 2
    assert words[0] in capsys.readouterr().err


@pytest.mark.parametrize("section, seed", [("analysis", 2**32), ("embedding", -1)])
def test_seed_out_of_range_exits_2(tmp_path, capsys, runner, section, seed):
    study = study_folder(tmp_path)
    doc = yaml.safe_load(study.read_text())
    doc.setdefault(section, {})["seed"] = seed
    study.write_text(yaml.safe_dump(doc))
    assert main(["run", str(study)]) == 2
    err = capsys.readouterr().err
    assert f"{section}.seed" in err and "Traceback" not in err and runner.calls == []


def test_duplicate_key_and_duplicate_column_exit_2(tmp_path, capsys, runner):
    study = study_folder(tmp_path)
    study.write_text(study.read_text() + "name: s2\n")
    assert main(["run", str(study)]) == 2
    assert "key 'name' given twice" in capsys.readouterr().err
    study = study_folder(tmp_path)
    csv = tmp_path / "units.csv"
    csv.write_text(csv.read_text().replace(",hh\n", ",aid\n", 1))
    assert main(["run", str(study)]) == 2
    assert "rule 'column names unique' failed: 'aid' at columns 4, 6" in capsys.readouterr().err
    assert runner.calls == []


def test_na_ids_pass_the_preflight(tmp_path, capsys, runner):
    study = study_folder(tmp_path, change=_na_ids)
    assert main(["validate", str(study)]) == 0
    runner.estimates = estimates(ANALYSIS)
    assert main(["run", str(study), "--json"]) == 0
    assert runner.calls == [study]


def estimates(analysis: dict, drop: int = 0) -> pd.DataFrame:
    rows = requested_estimates(AnalysisSpec(**analysis))[drop:]
    return pd.DataFrame([
        {"estimator": e, "feature_set": f, "estimand": m, "outcome_source": s, "estimate": 1.0, "std_error": 0.1,
         "ci_low": 0.8, "ci_high": 1.2, "n": 12, "estimate_version": "v1", "study": "s1",
         "computed_at": pd.Timestamp("2024-01-01")}
        for e, f, m, s in rows
    ])


def test_run_with_every_requested_row_exits_0(tmp_path, capsys, runner):
    study = study_folder(tmp_path)
    runner.estimates = estimates(ANALYSIS)
    assert main(["run", str(study), "--json"]) == 0
    assert len(__import__("json").loads(capsys.readouterr().out)) == 4


@pytest.mark.parametrize("as_json", [True, False])
@pytest.mark.parametrize("drop", [1, 4])
def test_run_missing_rows_fails_naming_them(tmp_path, capsys, runner, as_json, drop):
    study = study_folder(tmp_path, name="my--study.v2")
    runner.estimates = estimates(ANALYSIS, drop=drop)
    assert main(["run", str(study), *(["--json"] if as_json else [])]) == 1
    out = capsys.readouterr()
    assert out.out == ""  # nothing printed as if it were the result
    assert "rule 'every requested estimate present' failed for study 'my--study.v2'" in out.err
    assert f"{drop} of 4 requested rows" in out.err
    assert "difference_in_means x none x ATE x measured" in out.err
    assert "Traceback" not in out.err


# --- validate checks the imagery against every unit, and writes nothing ----------------------------


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def _move_units(df, outside=(), edge=()):
    for i in outside:  # far from the scene
        df.loc[i, "lon"], df.loc[i, "lat"] = 10.0, 10.0
    for i in edge:  # on the scene's last column: half the chip window off the scene
        df.loc[i, "lon"], df.loc[i, "lat"] = -52.01, -24.5


def test_validate_names_units_outside_the_imagery_and_mostly_nodata_and_writes_nothing(tmp_path, capsys, runner):
    study = study_folder(tmp_path, n=16, change=lambda df: _move_units(df, outside=(0, 1), edge=(2,)))
    work = tmp_path / "eocausal_work"
    work.mkdir()
    (work / "keep.txt").write_text("an earlier run's file\n")
    before = _tree(tmp_path)
    assert main(["validate", str(study)]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) open as GeoTIFF (scene.tif); CRS EPSG:4326 (WGS 84); 1 band(s) read; chips 16 px" in out
    assert "14 of 16 units inside the imagery; 13 usable" in out
    assert "2 unit(s) outside the imagery, to be excluded (outside_coverage): v000, v001" in out
    assert "1 unit(s) with more than 0.2 nodata in their chip window, to be excluded (nodata_share_above_max): " \
           "v002 (44%)" in out
    assert _tree(tmp_path) == before  # the study folder and the working folder are unchanged
    assert runner.calls == []


def test_validate_rejects_imagery_that_leaves_an_arm_too_few_units(tmp_path, capsys, runner):
    study = study_folder(tmp_path, change=lambda df: _move_units(df, outside=range(0, 12, 2)))  # every control unit
    before = _tree(tmp_path)
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert "imagery rejected: rule 'units per arm >= analysis.folds (3) after imaging' failed: usable units control 0" \
           in err and "outside: v000, v002" in err and "Traceback" not in err
    assert _tree(tmp_path) == before
    study = study_folder(tmp_path, change=lambda df: _move_units(df, outside=range(12)))
    before = _tree(tmp_path)
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert "rule 'units inside the imagery' failed: none of the 12 units lies inside the imagery" in err
    assert "the imagery covers lon -55.0000..-52.0000, lat -26.0000..-23.0000" in err
    assert _tree(tmp_path) == before
