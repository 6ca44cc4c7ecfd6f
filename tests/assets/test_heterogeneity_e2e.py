"""End-to-end heterogeneity stages in the real graph: CATE, effect clusters, transport, saliency,
their marts in the published warehouse, and the study report rendered in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assets.runner import run_study
from eocausal.cli import main as cli_main
from eocausal.layout import Layout
from eocausal.warehouse import query
from tests.assets.conftest import small_study
from tests.test_report import needs_chromium, render_in_chromium, screenshot_path


def published(outcome) -> Path:
    return outcome.workdir / "published" / "warehouse.duckdb"


def test_heterogeneity_assets_materialise_and_land_in_the_warehouse(e2e_run):
    study_path, outcome = e2e_run
    assert outcome.success, outcome.errors + outcome.failed_checks
    meta = outcome.metadata
    db = published(outcome)
    units = query(db, "select count(*) as n from marts.analysis_units")["n"].iloc[0]
    cate = query(db, "select * from marts.cate_predictions")
    assert cate["cate_version"].nunique() == 1
    assert cate["cate_version"].iloc[0] == meta["cate_estimates"]["cate_version"]
    assert sorted(cate["feature_set"].unique()) == ["image", "tabular", "tabular+image"]
    assert len(cate) == 3 * units
    evaluation = query(db, "select * from marts.cate_evaluation")
    metrics = set(evaluation["metric"])
    assert {"rate_autoc", "rate_qini", "pehe"} <= metrics  # the simulated study's truth gives PEHE
    toc = json.loads(evaluation.query("metric == 'rate_autoc'")["details"].iloc[0])
    assert toc["normalisation"] == "grf" and toc["q"][-1] == 1.0
    clusters = query(db, "select * from marts.effect_clusters")
    assert len(clusters) == units and set(clusters["cluster"]) <= {0, 1}
    assert clusters["k"].eq(2).all()
    assert meta["effect_clusters"]["k"] == 2  # (no ARI: this simulated effect is linear, not clustered)
    transport = query(db, "select * from marts.transport_predictions")
    assert len(transport) == meta["transport_predictions"]["n_cells"] > 0
    ok = transport[transport["status"] == "ok"]
    assert len(ok) == meta["transport_predictions"]["n_predicted"] > 0
    assert ok["cate"].notna().all() and ok["cate_std_error"].gt(0).all()
    tif = Path(meta["transport_predictions"]["geotiff"])
    assert tif.exists() and tif.with_name("transport_map.png").exists()
    for key in ("panel_most_likely_treated", "panel_least_likely_treated"):
        assert Path(meta["propensity_saliency"][key]).exists()
    # transport and saliency used the embedder image_embedder stored, not a refit of it
    assert not (Layout(outcome.workdir).models / "embedder").exists()


def test_report_path_metadata_and_cli(e2e_run, capsys):
    study_path, outcome = e2e_run
    report = Path(outcome.metadata["study_report"]["path"])
    assert report.exists()
    assert "data:image/png;base64," in outcome.metadata["study_report"]["figures"]
    assert cli_main(["report", str(study_path)]) == 0
    assert capsys.readouterr().out.strip() == str(report)


@needs_chromium
def test_study_report_renders_in_headless_chromium(e2e_run, tmp_path):
    _, outcome = e2e_run
    report = Path(outcome.metadata["study_report"]["path"])
    shot = screenshot_path(tmp_path, "study_report.png")
    page = render_in_chromium(report, shot, tmp_path / "profile")
    assert page["console_errors"] == []
    assert page["h1"] == "Study report: eocausal_demo"
    for section in ("Data quality", "Effect estimates", "Heterogeneity (DR-learner CATE)",
                    "Transport: predicted effects beyond the study", "Saliency: what in the image drives the models"):
        assert section in page["h2"], section
    # forest, overlap, balance, CATE distribution, RATE, clusters, transport map, 2 saliency panels
    assert len(page["images"]) >= 9
    assert all(img["w"] > 0 and img["h"] > 0 for img in page["images"])
    assert shot.stat().st_size > 50_000


@pytest.mark.slow  # a whole extra run of the graph
def test_heterogeneity_off_still_publishes(tmp_path):
    """`heterogeneity: false`: the stages write empty (typed) tables, dbt and publishing go on,
    and the report says the analysis is off."""
    study_path = small_study(tmp_path, n_units=120, seed=8, embedding={"n_features": 64})
    text = study_path.read_text() + "heterogeneity: false\n"
    study_path.write_text(text)
    outcome = run_study(study_path)
    assert outcome.success, outcome.errors + outcome.failed_checks
    db = published(outcome)
    assert query(db, "select count(*) as n from marts.cate_predictions")["n"].iloc[0] == 0
    assert query(db, "select count(*) as n from marts.transport_predictions")["n"].iloc[0] == 0
    assert outcome.metadata["cate_estimates"]["enabled"] is False
    html = Path(outcome.metadata["study_report"]["path"]).read_text(encoding="utf-8")
    assert "Heterogeneity analysis is off" in html


def test_image_components_come_from_the_stored_pca(e2e_run):
    """The embedding stage's PCA (fitted once, stored under the embeddings' version) is what the
    estimators reduce the embedding with: the CATE model's saved reduction is its leading part."""
    from eocausal.embed.reduce import PCAReduction
    from eocausal.study import load_study

    study_path, outcome = e2e_run
    study = load_study(study_path)
    stored = json.loads((outcome.workdir / "lake" / "image_embeddings" / "period=geotiff.pca.json").read_text())
    assert stored["embedding_version"] == outcome.metadata["image_embeddings"]["data_version"]
    stored_pca = PCAReduction.from_dict(stored["pca"])
    [model] = (outcome.workdir).rglob(f"cate/{study.name}-*.json")
    used = PCAReduction.from_dict(json.loads(model.read_text())["pca"])
    k = study.analysis.image_components
    assert stored_pca.n_components_ >= k == used.n_components_
    assert (used.components_ == stored_pca.components_[:k]).all()


def test_a_stage_whose_input_is_missing_fails_naming_it_and_recomputes_nothing(e2e_run, tmp_path):
    """Downstream heterogeneity assets load their inputs: with the effect-cluster output gone,
    transport and the report fail naming effect_clusters instead of silently refitting it."""
    import shutil

    import dagster as dg

    from assets.heterogeneity import study_report, transport_predictions
    from assets.resources import StudyResource, WarehouseResource

    study_path, outcome = e2e_run
    workdir = tmp_path / "work"
    shutil.copytree(outcome.workdir, workdir)
    removed = sorted((workdir / "lake" / "effect_clusters").glob("*.parquet"))
    assert removed
    for path in removed:
        path.unlink()
    resources = {"study": StudyResource(study_path=str(study_path)), "warehouse": WarehouseResource(root=str(workdir))}
    for asset in (transport_predictions, study_report):
        result = dg.materialize([asset], resources=resources, raise_on_error=False)
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "effect_clusters has not been materialised" in str(failure.event_specific_data.error)
    assert not list((workdir / "lake" / "effect_clusters").glob("*.parquet"))  # nothing refitted


def test_cate_nuisances_adjust_for_what_the_headline_adjusts_for(e2e_run):
    """With the context default, the CATE's pseudo-outcomes come from nuisance models on the headline's
    features (tabular, chip and context components, read from image_context): their mean and SE are
    the headline tabular+image AIPW's."""
    import pandas as pd

    from eocausal.study import load_study

    study_path, outcome = e2e_run
    study = load_study(study_path)
    assert study.analysis.context_components > 0
    assert outcome.metadata["image_context"]["n_usable"] > 0
    [model] = (outcome.workdir).rglob(f"cate/{study.name}-*.json")
    diagnostics = json.loads(model.read_text())["pseudo_outcome_diagnostics"]
    version = outcome.metadata["effect_estimates"]["estimate_version"]
    table = pd.read_parquet(outcome.workdir / "lake" / "effect_estimates" / f"{study.name}-{version}.parquet")
    [headline] = table[(table["estimator"] == "aipw") & (table["feature_set"] == "tabular+image")
                       & (table["estimand"] == "ATE")].itertuples()
    assert diagnostics["aipw_ate"] == pytest.approx(headline.estimate, abs=1e-9)
    assert diagnostics["aipw_ate_std_error"] == pytest.approx(headline.std_error, rel=1e-6)
