"""A finished run's results opened as Python objects (eocausal.results), and the report it wrote
answering first, with its GeoParquet exports and the transport COG."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import rasterio
from matplotlib.figure import Figure

import eocausal


def test_open_study_returns_estimates_diagnostics_cate_clusters_and_figures(e2e_run):
    study_path, outcome = e2e_run
    results = eocausal.open_study(study_path)
    assert results.name == outcome.estimates["study"].iloc[0]
    key = ["estimand", "estimator", "feature_set"]
    pd.testing.assert_frame_equal(
        results.estimates.sort_values(key).reset_index(drop=True)[key + ["estimate", "ci_low", "ci_high"]],
        outcome.estimates.sort_values(key).reset_index(drop=True)[key + ["estimate", "ci_low", "ci_high"]],
    )
    h = results.headline
    assert (h.estimator, h.feature_set) == ("aipw", "tabular+image") and h.naive is not None
    assert h.without_image["feature_set"] == "tabular"
    assert {v.name for v in h.verdicts} == {"overlap", "sensitivity", "specification", "chip scale"}
    assert results.matrix.loc["AIPW", "tabular+image"].startswith(f"{h.estimate:.3f}")
    assert len(results.diagnostics) == len(results.estimates) and results.diagnostics["propensity_auc"].notna().any()
    survey = pd.read_parquet(results.workdir / "lake" / "survey.parquet")
    assert len(results.units) == len(survey)
    assert set(results.units["status"]) <= {"analysed", "excluded"}
    assert len(results.cate) and len(results.clusters) and results.cluster_summary.get("k")
    assert results.report_path is not None and results.report_path.is_file()
    figures = results.figures
    assert {"forest", "unit_map", "overlap", "balance", "pca_variance", "cate_distribution", "rate"} <= set(figures)
    assert all(isinstance(f, Figure) for f in figures.values())
    # the same results from the working folder alone
    again = eocausal.open_study(results.workdir)
    assert again.estimate_version == results.estimate_version and again.study is not None


def test_the_runs_report_answers_first_and_exports(e2e_run):
    _, outcome = e2e_run
    html_path = outcome.metadata["study_report"]["path"]
    html = open(html_path, encoding="utf-8").read()
    assert html.index("class='headline'") < html.index("<h2>Effect estimates</h2>") < html.index("Data quality")
    assert "Naive difference in means" in html and "Adjusting for the image moved the estimate by" in html
    assert "the same under every feature set" in html
    folder = __import__("pathlib").Path(html_path).parent
    for name in ("unit_map.png", "pca_variance.png", "example_chips.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG", name
    units = pq.read_table(folder / "units.parquet")
    assert json.loads(units.schema.metadata[b"geo"])["columns"]["geometry"]["geometry_types"] == ["Point"]
    assert units.num_rows == len(pd.read_parquet(outcome.workdir / "lake" / "survey.parquet"))
    tif = outcome.metadata["transport_predictions"].get("geotiff")
    if tif:
        with rasterio.open(tif) as src:
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
