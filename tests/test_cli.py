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
    # run and validate check that the imagery opens before any work: a tiny scene over the units
    write_geotiff(tmp_path / "imagery" / "scene.tif", np.ones((1, 16, 16), dtype="uint8"), "EPSG:4326",
                  from_origin(-54.0, -24.0, 1 / 16, 1 / 16))
    doc = {"name": name,
           "survey": {"path": "units.csv", "unit_id": "code", "lat": "lat", "lon": "lon", "treatment": "aid",
                      "outcome": "assets", "covariates": ["hh"]},
           "imagery": {"source": "geotiff", "path": "imagery/"},
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
