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
    assert study.embedding.method == "rcf" and study.embedding.n_features == 1536
    assert study.embedding.filters == "mixed" and study.embedding.pool_scales == [1.0, 0.5, 0.25]
    assert study.analysis.image_components == 64 and study.analysis.chip_scale_check
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
        ({"analysis": {"image_components": 200}}, "exceeds embedding.pca_components (128)"),
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


# -- issue 16: ambiguity, seeds, names -------------------------------------------------------

def write_text(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return p


STUDY_TEXT = """\
name: s1
survey:
  path: units.csv
  unit_id: id
  lat: y
  lon: x
  treatment: t
  outcome: o
  covariates: [c1]
imagery: {source: geotiff, path: imagery/}
"""


@pytest.mark.parametrize(
    "text, key, lines",
    [
        (STUDY_TEXT + "name: s2\n", "'name'", "lines 1 and 11"),
        (STUDY_TEXT.replace("  outcome: o\n", "  outcome: o\n  treatment: t2\n"), "'treatment'", "lines 7 and 9"),
        (STUDY_TEXT + "analysis: {folds: 3, seed: 1, folds: 4}\n", "'folds'", "line 11"),
        (STUDY_TEXT + "analysis:\n  folds: 3\nanalysis:\n  folds: 4\n", "'analysis'", "lines 11 and 13"),
    ],
)
def test_duplicate_keys_are_rejected_naming_key_and_lines(tmp_path, text, key, lines):
    with pytest.raises(StudyError) as exc:
        load_study(write_text(tmp_path, text))
    message = str(exc.value)
    assert "rule 'study file keys unique' failed" in message
    assert f"key {key} given twice ({lines})" in message


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = STUDY_TEXT + "analysis:\n  <<: {folds: 3, seed: 7}\n  folds: 4\n"
    study = load_study(write_text(tmp_path, text))
    assert study.analysis.folds == 4 and study.analysis.seed == 7


def test_same_key_in_different_mappings_is_fine(tmp_path):
    text = STUDY_TEXT + "embedding: {seed: 1}\nanalysis: {seed: 2}\n"
    study = load_study(write_text(tmp_path, text))
    assert (study.embedding.seed, study.analysis.seed) == (1, 2)


@pytest.mark.parametrize("section", ["analysis", "embedding"])
@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False), (10**30, False)])
def test_seeds_within_the_generators_range(tmp_path, section, seed, ok):
    path = write(tmp_path, {**BASE, section: {"seed": seed}})
    if ok:
        assert getattr(load_study(path), section).seed == seed
        return
    with pytest.raises(StudyError) as exc:
        load_study(path)
    assert f"{section}.seed" in str(exc.value)
    assert ("greater than or equal to 0" if seed < 0 else "less than or equal to 4294967295") in str(exc.value)


@pytest.mark.parametrize(
    "name",
    ["a", "0", "my--study.v2", "a.b.c", "A_b-C.9", "x" * 64, "a" + "-" * 63, "a..", "a--", "v1.0.0-rc.1"],
)
def test_names_at_the_edges_accepted(tmp_path, name):
    assert load_study(write(tmp_path, {**BASE, "name": name})).name == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, ".hidden", "-flag", "_under", "a b", "a/b", "a\\b", "naïve", "a;b", "a'b", "a\nb", "a*", 12],
)
def test_names_at_the_edges_rejected(tmp_path, name):
    with pytest.raises(StudyError) as exc:
        load_study(write(tmp_path, {**BASE, "name": name}))
    assert "name" in str(exc.value)


def test_study_file_encoding_and_kind(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would block for ever
    with pytest.raises(StudyError, match="is not a file"):
        load_study(tmp_path / "pipe.yaml")
    text = STUDY_TEXT + "# résumé\n"
    latin = write_text(tmp_path, "")
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(StudyError, match="not UTF-8 text .* save it as UTF-8"):
        load_study(latin)
    latin.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM is fine
    (tmp_path / "units.csv").write_text("id\n")
    (tmp_path / "imagery").mkdir()
    assert load_study(latin).name == "s1"
