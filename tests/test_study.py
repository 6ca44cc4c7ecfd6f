from pathlib import Path

import pytest
import yaml

from eocausal.study import StudyError, default_workdir, load_study

BASE = {
    "name": "s1",
    "survey": {"path": "units.csv", "unit_id": "id", "lat": "y", "lon": "x", "treatment": "t",
               "outcome": "o", "covariates": ["c1"]},
    "imagery": {"source": "geotiff", "path": "imagery/", "chip_size_px": 32},
}


def write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_defaults_and_paths(tmp_path):
    study = load_study(write(tmp_path, BASE))
    assert study.analysis.estimators == ["difference_in_means", "ipw", "aipw", "dml"]
    assert study.analysis.feature_sets == ["none", "tabular", "image", "tabular+image"]
    assert study.analysis.folds == 5
    assert study.embedding.method == "rcf" and study.embedding.n_features == 1024
    assert study.survey_path == (tmp_path / "units.csv").resolve()
    assert study.imagery_path == (tmp_path / "imagery").resolve()
    assert load_study(tmp_path).name == "s1"  # a folder means its study.yaml
    assert default_workdir(tmp_path / "study.yaml") == tmp_path.resolve() / "eocausal_work"


def test_spec_hash_changes_with_analysis(tmp_path):
    a = load_study(write(tmp_path, BASE))
    b = load_study(write(tmp_path, {**BASE, "analysis": {"folds": 3}}))
    assert a.spec_hash("analysis") != b.spec_hash("analysis")
    assert a.spec_hash("analysis") == load_study(write(tmp_path, BASE)).spec_hash("analysis")


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"survey": {**BASE["survey"], "path": "../outside.csv"}}, "escapes the study folder"),
        ({"imagery": {"source": "geotiff", "path": "/etc"}}, "escapes the study folder"),
        ({"name": "bad name; drop table"}, "name"),
        ({"analysis": {"estimators": ["ols"]}}, "analysis.estimators"),
        ({"analysis": {"folds": 1}}, "analysis.folds"),
        ({"survey": {**BASE["survey"], "outcome": "t"}}, "distinct"),
        ({"survey": {**BASE["survey"], "covariates": []}}, "covariates is empty"),
        ({"imagery": {"source": "geotiff"}}, "imagery.path is required"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_contract_violations_are_named(tmp_path, patch, words):
    with pytest.raises(StudyError) as exc:
        load_study(write(tmp_path, {**BASE, **patch}))
    assert words in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "study.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(bad)
    bad.write_text("- a list")
    with pytest.raises(StudyError, match="mapping"):
        load_study(bad)
