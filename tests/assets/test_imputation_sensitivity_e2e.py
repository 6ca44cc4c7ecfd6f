"""End-to-end: robustness values in the warehouse, the sensitivity asset, and a study with missing
outcomes through the real graph (Dagster assets, dbt-duckdb models, GX suites)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from assets.runner import run_study
from eocausal.simulate import write_imputation_study, write_procedural_scene
from eocausal.warehouse import query


def published(outcome) -> Path:
    return outcome.workdir / "published" / "warehouse.duckdb"


def test_estimates_carry_robustness_values_and_the_sensitivity_asset_draws_them(e2e_run):
    _, outcome = e2e_run
    assert outcome.success, outcome.errors + outcome.failed_checks
    est = outcome.estimates
    assert (est["outcome_source"] == "measured").all()
    ovb = est["estimator"].isin(["aipw", "dml"])
    assert est.loc[ovb, "robustness_value"].between(0, 1).all()
    assert est.loc[~ovb, "robustness_value"].isna().all()
    assert (est.loc[ovb, "robustness_value_alpha"] <= est.loc[ovb, "robustness_value"]).all()
    stats = json.loads(est.loc[ovb, "sensitivity"].iloc[0])["stats"]
    assert {"theta", "sigma2", "nu2", "cov"} <= set(stats) and not stats["notes"]

    meta = outcome.metadata["effect_sensitivity"]
    assert meta["n_estimates"] == int(ovb.sum())
    assert meta["estimate_version"] == est["estimate_version"].iloc[0]
    figures = meta["figures"]
    assert len(figures) == int(ovb.sum())
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in figures.values())
    assert "| RV |" in meta["robustness"] and "as strong as the image" in meta["robustness"]
    assert outcome.metadata["imputed_outcomes"]["outcome_imputation"] is False
    assert "RV_alpha" in outcome.metadata["effect_estimates"]["estimates"]


@pytest.mark.slow
def test_study_with_missing_outcomes_runs_end_to_end(tmp_path):
    scene = write_procedural_scene(tmp_path / "scene_src" / "scene.tif", width=640, height=560, seed=3)
    study_path = write_imputation_study(tmp_path / "study", missing_share=0.6, n_units=240, seed=3, scene=scene,
                                        chip_size_px=32)
    doc = yaml.safe_load(study_path.read_text())
    doc["embedding"].update({"n_features": 128, "batch_size": 128})
    doc["analysis"].update({"folds": 3, "image_components": 8, "estimators": ["difference_in_means", "aipw", "dml"],
                            "feature_sets": ["none", "tabular+image"]})
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    outcome = run_study(study_path)
    assert outcome.success, outcome.errors
    # only the imputation model's fit (a warning) may fail on so few units
    assert all(c.startswith("imputed_outcomes:imputation_model_fit") for c in outcome.failed_checks)
    est = outcome.estimates
    assert len(est) == 3 * 2 * 3
    assert set(est["outcome_source"]) == {"measured", "imputed_corrected", "imputed_plugin"}
    n_missing = outcome.metadata["survey"]["n_outcome_missing"]
    assert n_missing == 144
    imputed = outcome.metadata["imputed_outcomes"]
    assert imputed["outcome_imputation"] is True and imputed["n_missing"] + imputed["n_measured"] == imputed["n_units"]
    corrected = est[est["outcome_source"] == "imputed_corrected"]
    assert (corrected["n"] == imputed["n_units"]).all()
    assert (est[est["outcome_source"] == "measured"]["n"] == imputed["n_measured"]).all()
    # per-unit imputations in the lake, keyed to the estimate version
    frame = pd.read_parquet(imputed["path"])
    assert len(frame) == imputed["n_units"] and frame["predicted_outcome"].notna().all()
    # the dbt outcome tests allowed the gaps, the warehouse holds them
    units = query(published(outcome), "select count(*) filter (where outcome is null) as n from marts.analysis_units")
    assert units["n"].iloc[0] == imputed["n_missing"]

    rerun = run_study(study_path)
    assert rerun.metadata["imputed_outcomes"]["from_cache"] is True
    assert rerun.metadata["effect_estimates"]["from_cache"] is True
    n_rows = query(published(rerun), "select count(*) as n from marts.effect_estimates")["n"].iloc[0]
    assert n_rows == len(est)


NEW_COLUMNS = ["outcome_source", "n_outcome_observed", "robustness_value", "robustness_value_alpha", "sensitivity"]


@pytest.mark.slow
def test_history_written_before_the_new_columns_still_loads(e2e_run, tmp_path):
    """A lake file and a warehouse table from before the sensitivity/imputation columns existed:
    the source reads the files by name (old rows get NULLs) and the incremental model adds the
    columns instead of failing."""
    study_path, outcome = e2e_run
    study_dir = tmp_path / "study"
    shutil.copytree(study_path.parent, study_dir, ignore=shutil.ignore_patterns("eocausal_work"))
    workdir = tmp_path / "work"
    shutil.copytree(outcome.workdir, workdir)
    version = outcome.estimates["estimate_version"].iloc[0]
    current = workdir / "lake" / "effect_estimates" / f"{outcome.estimates['study'].iloc[0]}-{version}.parquet"
    old = pd.read_parquet(current).drop(columns=NEW_COLUMNS).assign(estimate_version="old0000000000000")
    old.to_parquet(current.with_name("eocausal_demo-old0000000000000.parquet"), index=False)
    current.unlink()  # the current version is computed afresh below
    with duckdb.connect(str(workdir / "warehouse.duckdb")) as con:
        con.execute("delete from marts.effect_estimates")
        for col in NEW_COLUMNS:
            con.execute(f"alter table marts.effect_estimates drop column {col}")
        con.execute("insert into marts.effect_estimates by name select * from read_parquet(?)",
                    [str(current.with_name("eocausal_demo-old0000000000000.parquet"))])

    rerun = run_study(study_dir / "study.yaml", workdir)
    assert rerun.success, rerun.errors + rerun.failed_checks
    history = query(published(rerun), "select estimate_version, outcome_source, robustness_value, estimator"
                                      " from marts.effect_estimates")
    old_rows = history[history["estimate_version"] == "old0000000000000"]
    new_rows = history[history["estimate_version"] == version]
    assert len(old_rows) == len(new_rows) == 16
    assert old_rows["outcome_source"].isna().all() and old_rows["robustness_value"].isna().all()
    assert new_rows.loc[new_rows["estimator"].isin(["aipw", "dml"]), "robustness_value"].notna().all()
