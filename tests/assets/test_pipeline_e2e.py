"""End-to-end: the real graph (Dagster assets, dbt-duckdb models, GX suites) on a small study."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest

from assets.runner import run_study
from eocausal.cli import main as cli_main
from eocausal.warehouse import query
from tests.assets.conftest import small_study


def published(outcome):
    return outcome.workdir / "published" / "warehouse.duckdb"


def test_whole_graph_materialises(e2e_run):
    study_path, outcome = e2e_run
    assert outcome.success, outcome.errors + outcome.failed_checks
    est = outcome.estimates
    # every estimator x feature set of the default spec, once
    assert len(est) == 16
    assert set(est["estimator"]) == {"difference_in_means", "ipw", "aipw", "dml"}
    assert set(est["feature_set"]) == {"none", "tabular", "image", "tabular+image"}
    assert (est["ci_low"] <= est["estimate"]).all() and (est["estimate"] <= est["ci_high"]).all()
    assert est["estimate_version"].nunique() == 1
    assert (est["std_error"] > 0).all()


def test_warehouse_tables_and_exclusions(e2e_run):
    study_path, outcome = e2e_run
    db = published(outcome)
    survey = pd.read_csv(study_path.parent / "villages.csv")
    units = query(db, "select * from marts.analysis_units")
    excluded = query(db, "select * from marts.unit_exclusions")
    # every survey unit is either analysed or excluded with a reason, never silently dropped
    assert len(units) + len(excluded) == len(survey)
    assert excluded["reason"].notna().all()
    chips = outcome.metadata["image_chips"]
    assert chips["n_excluded"] == len(excluded)
    # the marts hold the stored PCA's scores (embedding.pca_components), not the 132-wide embedding
    assert "embedding" not in units.columns
    assert units["image_components"].map(len).eq(min(128, len(units))).all()
    latest = query(db, "select * from marts.effect_estimates_latest")
    assert len(latest) == 16


def test_marts_have_contract_types_and_column_comments(e2e_run):
    """SQL consumers see the contracts' types (a warning column stays text when every row is
    NULL) and the column descriptions (dbt persist_docs) from the published catalog."""
    _, outcome = e2e_run
    columns = query(published(outcome), "select table_name, column_name, data_type, comment from duckdb_columns() "
                                        "where schema_name = 'marts' and table_name in ('effect_estimates', 'unit_exclusions')")
    types = {(r.table_name, r.column_name): r.data_type for r in columns.itertuples()}
    assert types[("effect_estimates", "specification_warning")] == "VARCHAR"
    assert types[("effect_estimates", "chip_scale_warning")] == "VARCHAR"
    assert types[("effect_estimates", "computed_at")] == "TIMESTAMP WITH TIME ZONE"
    comments = {(r.table_name, r.column_name): r.comment for r in columns.itertuples()}
    assert comments[("effect_estimates", "estimate")].startswith("The effect estimate")
    assert comments[("unit_exclusions", "reason")].startswith("Why:")
    tables = query(published(outcome), "select comment from duckdb_tables() where table_name = 'effect_estimates'")
    assert tables["comment"].iloc[0].startswith("Append-only history")


def test_estimates_are_versioned_from_inputs(e2e_run):
    _, outcome = e2e_run
    row = outcome.estimates.iloc[0]
    assert row["survey_version"] == outcome.metadata["survey"]["data_version"]
    assert row["embeddings_version"] == outcome.metadata["image_embeddings"]["data_version"]
    assert row["estimate_version"] == outcome.metadata["effect_estimates"]["estimate_version"]


def test_second_run_reuses_cache_and_adds_no_rows(e2e_run, capsys):
    study_path, outcome = e2e_run
    assert cli_main(["run", str(study_path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 16
    for key in ["estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n",
                "estimate_version"]:
        assert key in records[0]
    assert {r["estimate_version"] for r in records} == set(outcome.estimates["estimate_version"])
    n_rows = query(published(outcome), "select count(*) as n from marts.effect_estimates")["n"].iloc[0]
    assert n_rows == 16  # no duplicates after the second run
    # the second run read no imagery and computed no embeddings
    rerun = run_study(study_path)
    assert rerun.metadata["image_chips"]["n_chips_extracted"] == 0
    assert rerun.metadata["image_embeddings"]["from_cache"] is True
    assert rerun.metadata["effect_estimates"]["from_cache"] is True


def test_changed_analysis_adds_a_new_version(tmp_path):
    study_path = small_study(tmp_path, n_units=160, seed=5, analysis={"estimators": ["difference_in_means", "aipw"],
                                                                      "feature_sets": ["none", "image"]})
    first = run_study(study_path)
    assert first.success, first.errors
    import yaml

    doc = yaml.safe_load(study_path.read_text())
    doc["analysis"]["folds"] = 4
    study_path.write_text(yaml.safe_dump(doc))
    second = run_study(study_path)
    assert second.success, second.errors
    history = query(published(second), "select estimate_version, count(*) n from marts.effect_estimates group by 1")
    assert len(history) == 2 and (history["n"] == 4).all()
    latest = query(published(second), "select distinct estimate_version from marts.effect_estimates_latest")
    assert latest["estimate_version"].tolist() == [second.estimates["estimate_version"].iloc[0]]


@pytest.mark.parametrize(
    "corrupt, rule",
    [
        (lambda df: df.drop(columns=["aid_received"]), "required column 'aid_received' present"),
        (lambda df: df.assign(latitude=df["latitude"].where(df.index != 4, 123.0)), "lat within [-90, 90]"),
        (lambda df: df.assign(village_code=df["village_code"].where(df.index != 6, df["village_code"][5])),
         "unique unit_id"),
        (lambda df: df.assign(aid_received=df["aid_received"].where(df.index != 2, 3)), "treatment binary (0/1)"),
    ],
)
def test_bad_survey_is_rejected_and_warehouse_unchanged(e2e_run, tmp_path, corrupt, rule):
    """A bad wave replaces the survey file: the run fails naming rule and rows; the published
    warehouse and the lake keep exactly what they had."""
    import shutil

    study_path, outcome = e2e_run
    study_dir = tmp_path / "study"
    shutil.copytree(study_path.parent, study_dir, ignore=shutil.ignore_patterns("eocausal_work"))
    workdir = tmp_path / "work"
    shutil.copytree(outcome.workdir, workdir)
    db = workdir / "published" / "warehouse.duckdb"
    before = query(db, "select * from marts.effect_estimates order by estimator, feature_set")
    lake_before = (workdir / "lake" / "survey.parquet").read_bytes()

    survey_csv = study_dir / "villages.csv"
    corrupt(pd.read_csv(survey_csv)).to_csv(survey_csv, index=False)
    bad = run_study(study_dir / "study.yaml", workdir)
    assert not bad.success
    message = "\n".join(bad.errors)
    assert rule in message and "row" in message
    pd.testing.assert_frame_equal(before, query(db, "select * from marts.effect_estimates order by estimator, feature_set"))
    assert (workdir / "lake" / "survey.parquet").read_bytes() == lake_before
    with duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from marts.effect_estimates").fetchone()[0] == len(before)
