"""The study report: figures from plain tables, one self-contained HTML file, and that file rendered
in headless Chromium (Debian's chromium + chromium-driver) without errors, with a screenshot
(EOCAUSAL_REPORT_SCREENSHOT names where; default: the test's temporary folder)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eocausal.report import ReportInputs, build_report, png_markdown

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (`make test` installs them)",
)
_RENDER_LIMIT_S = 120  # a safety net against a hung browser, not a timing assertion


def render_in_chromium(html_path: Path, screenshot: Path, profile_dir: Path) -> dict:
    """Open a local HTML file in headless Chromium; return what the page holds and the browser's
    console errors, after saving a full-page screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1000", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(Path(html_path).resolve().as_uri())
        deadline = time.monotonic() + _RENDER_LIMIT_S
        while driver.execute_script("return document.readyState") != "complete" or not driver.execute_script(
            "return Array.from(document.images).every(i => i.complete)"
        ):
            if time.monotonic() > deadline:
                pytest.fail("the report did not finish loading in Chromium")
            time.sleep(0.2)
        page = driver.execute_script(
            "return {title: document.title, h1: document.querySelector('h1').innerText,"
            " h2: Array.from(document.querySelectorAll('h2')).map(e => e.innerText),"
            " images: Array.from(document.images).map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight})),"
            " height: document.documentElement.scrollHeight,"
            " headline_bottom: document.querySelector('.headline') ?"
            "   document.querySelector('.headline').getBoundingClientRect().bottom : null}"
        )
        driver.set_window_size(1280, min(int(page["height"]) + 40, 16000))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        page["console_errors"] = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        return page
    finally:
        driver.quit()


def screenshot_path(default_dir: Path, name: str) -> Path:
    folder = os.environ.get("EOCAUSAL_REPORT_SCREENSHOT_DIR")
    return (Path(folder) if folder else default_dir) / name


# --- synthetic inputs ---------------------------------------------------------------------------


def _diagnostics(rng) -> str:
    edges = np.linspace(0, 1, 21)
    treated = rng.integers(0, 30, 20)
    control = rng.integers(0, 30, 20)
    columns = [{"column": c, "smd_before": float(rng.normal()), "smd_after": float(rng.normal(scale=0.05))}
               for c in ("cov_a", "image_pc1", "image_pc2")]
    return json.dumps({
        "clip": 0.01,
        "propensity": {"auc": 0.74, "histogram": {"bin_edges": edges.tolist(), "treated": treated.tolist(),
                                                  "control": control.tolist()}},
        "balance": {"columns": columns, "max_abs_smd_before": 1.0, "max_abs_smd_after": 0.1},
    })


def _inputs(tmp_path: Path) -> ReportInputs:
    from eocausal.interpret import plot_saliency_panel

    rng = np.random.default_rng(0)
    rows = []
    for estimator in ("difference_in_means", "ipw", "aipw", "dml"):
        for fs in ("none", "tabular", "image", "tabular+image"):
            est = float(rng.normal(1.0, 0.5))
            rows.append({"study": "s", "estimate_version": "v1", "estimand": "ATE", "estimator": estimator,
                         "feature_set": fs, "estimate": est, "std_error": 0.1, "ci_low": est - 0.2,
                         "ci_high": est + 0.2, "n": 500, "diagnostics": _diagnostics(rng)})
    estimates = pd.DataFrame(rows)
    preds = pd.concat([
        pd.DataFrame({"unit_id": [f"U{i}" for i in range(200)], "feature_set": fs, "cate": rng.normal(1, s, 200)})
        for fs, s in (("tabular", 0.1), ("image", 0.5), ("tabular+image", 0.5))
    ])
    q = [0.25, 0.5, 0.75, 1.0]
    evaluation = pd.DataFrame([
        {"feature_set": fs, "metric": m, "estimate": e, "std_error": 0.05, "ci_low": e - 0.1, "ci_high": e + 0.1,
         "details": json.dumps({"q": q, "toc": [e * 2, e, e / 2, 0.0], "toc_std_error": [0.1, 0.08, 0.05, 0.0],
                                "pehe_constant_ate": 0.5})}
        for fs in ("tabular", "image", "tabular+image")
        for m, e in (("rate_autoc", 0.3 if fs != "tabular" else 0.0), ("rate_qini", 0.1), ("pehe", 0.3), ("cate_sd", 0.4))
    ])
    clusters = {"k": 2, "mu": [0.2, 2.1], "mu_std_error": [0.1, 0.2], "shares": [0.6, 0.4], "converged": True,
                "n_iter": 12, "ari_posterior": 0.6, "ari_membership": 0.65, "true_effects": [0.0, 2.0]}
    chips = rng.gamma(2, 100, size=(2, 3, 16, 16))
    valid = np.ones((2, 16, 16), dtype=bool)
    maps = rng.random((2, 16, 16))
    panel = plot_saliency_panel(chips, valid, maps, maps, ["U1", "U2"], "panel", tmp_path / "panel.png")
    return ReportInputs(
        study="s", version="r1", estimates=estimates, n_survey_units=520,
        exclusions=pd.DataFrame({"unit_id": ["X1", "X2", "X3"], "reason": ["nodata_share_above_max"] * 2 + ["outside_coverage"]}),
        truth_ate=1.0, cate_predictions=preds, cate_evaluation=evaluation, clusters=clusters,
        transport_png=panel, transport_summary={"n_cells": 10, "n_predicted": 8, "cell_size_km": 2.0, "n_outside_hull": 1},
        saliency_pngs=[panel], truth_tau=pd.DataFrame({"unit_id": ["U1"], "tau": [1.0]}),
        notes=["a note"],
    )


def test_report_is_one_self_contained_file(tmp_path):
    report = build_report(_inputs(tmp_path), tmp_path / "report")
    html = report.html_path.read_text(encoding="utf-8")
    for section in ("Data quality", "Effect estimates", "Overlap", "Balance", "Heterogeneity", "Image effect clusters",
                    "Transport", "Saliency", "Notes"):
        assert section in html, section
    # every image is embedded; nothing is fetched from anywhere
    sources = re.findall(r"src='([^']*)'", html)
    assert len(sources) >= 8 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in html and "https://" not in html
    for name in ("forest", "overlap", "balance", "cate_distribution", "rate", "clusters"):
        assert report.figures[name].read_bytes()[:4] == b"\x89PNG", name
    assert report.key_figures == ["forest", "rate", "transport"]
    # exclusions by reason, and the simulated truth's bias column
    assert "nodata_share_above_max" in html and "<th>bias</th>" in html
    assert "0.650 (image-predicted membership)" in html
    assert oct(report.html_path.stat().st_mode)[-3:] == "644"


def test_bias_is_against_each_estimators_target(tmp_path):
    inputs = _inputs(tmp_path)
    inputs.truth_dml = 0.8
    html = build_report(inputs, tmp_path / "report").html_path.read_text(encoding="utf-8")
    assert "targets the effect weighted by Var(D | X), here <b>0.800</b>" in html
    est = inputs.estimates
    for estimator, target in (("dml", 0.8), ("aipw", 1.0)):
        row = est[(est["estimator"] == estimator)].iloc[0]
        assert f"{row['estimate'] - target:.3f}" in html, estimator


def test_report_without_heterogeneity(tmp_path):
    inputs = _inputs(tmp_path)
    inputs.cate_predictions = inputs.cate_evaluation = None
    inputs.clusters = {"k": 0, "note": "off"}
    inputs.transport_png, inputs.transport_summary, inputs.saliency_pngs = None, None, []
    html = build_report(inputs, tmp_path / "report").html_path.read_text(encoding="utf-8")
    assert "Heterogeneity analysis is off" in html
    assert "(transport map: not available)" in html


def test_png_markdown(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    fig.savefig(tmp_path / "tiny.png")
    plt.close(fig)
    assert png_markdown(tmp_path / "tiny.png", "tiny").startswith("![tiny](data:image/png;base64,iVBOR")


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    report = build_report(_inputs(tmp_path), tmp_path / "report")
    shot = screenshot_path(tmp_path, "report_synthetic.png")
    page = render_in_chromium(report.html_path, shot, tmp_path / "profile")
    assert page["console_errors"] == []
    assert page["title"] == "eocausal report: s" and page["h1"] == "Study report: s"
    assert len(page["images"]) >= 8 and all(img["w"] > 0 and img["h"] > 0 for img in page["images"])
    assert shot.read_bytes()[:4] == b"\x89PNG"
    # the answer is on the first screen (a 1280 x 1000 window), above every section
    assert page["headline_bottom"] is not None and page["headline_bottom"] < 900


# --- the answer first: headline, matrix, units, exports ------------------------------------------


def _demo_like_estimates() -> pd.DataFrame:
    """A demo-shaped version: the naive and tabular estimates biased, the image-adjusted ones not."""
    values = {("difference_in_means", fs): 3.9 for fs in ("none", "tabular", "image", "tabular+image")}
    values.update({("aipw", "none"): 3.9, ("aipw", "tabular"): 3.3, ("aipw", "image"): 1.2, ("aipw", "tabular+image"): 1.1,
                   ("dml", "none"): 3.9, ("dml", "tabular"): 3.4, ("dml", "image"): 1.4, ("dml", "tabular+image"): 1.3})
    rng = np.random.default_rng(1)
    rows = []
    for (estimator, fs), est in values.items():
        rows.append({"study": "s", "estimate_version": "v1", "estimand": "ATE", "estimator": estimator,
                     "feature_set": fs, "estimate": est, "std_error": 0.2, "ci_low": est - 0.4, "ci_high": est + 0.4,
                     "n": 480, "n_features": {"none": 0, "tabular": 2, "image": 16, "tabular+image": 18}[fs],
                     "outcome_source": "measured", "diagnostics": _diagnostics(rng),
                     "robustness_value": 0.3 if estimator != "difference_in_means" else np.nan,
                     "robustness_value_alpha": 0.2 if estimator != "difference_in_means" else np.nan,
                     "specification_warning": None, "chip_scale_warning": None,
                     "fragility": json.dumps({"specification": {"max_abs_z": 0.4, "threshold": 3.0},
                                              "chip_scale": {"skipped": "off"}})})
    return pd.DataFrame(rows)


def test_headline_recommends_tabular_image_aipw_and_says_what_the_image_changed():
    from eocausal.report import headline

    est = _demo_like_estimates()
    h = headline(est)
    assert (h.estimator, h.feature_set, h.estimate) == ("aipw", "tabular+image", 1.1)
    assert h.naive["estimate"] == 3.9
    assert h.without_image["feature_set"] == "tabular" and h.image_shift == pytest.approx(1.1 - 3.3)
    verdicts = {v.name: v for v in h.verdicts}
    assert set(verdicts) == {"overlap", "sensitivity", "specification", "chip scale"}
    assert verdicts["sensitivity"].status == "ok" and "RV 0.30" in verdicts["sensitivity"].text
    assert verdicts["specification"].status == "ok" and verdicts["chip scale"].status == "unknown"
    assert "moved the estimate by -2.200" in " ".join(h.sentences())
    # without AIPW on the image, the next best: DML with the image
    h = headline(est[~((est["estimator"] == "aipw") & est["feature_set"].str.contains("image"))])
    assert (h.estimator, h.feature_set) == ("dml", "tabular+image")
    # a warning and a fragile robustness value show as warnings
    est.loc[:, "specification_warning"] = "estimates disagree"
    est.loc[est["estimator"] == "aipw", "robustness_value"] = 0.04
    verdicts = {v.name: v for v in headline(est).verdicts}
    assert verdicts["specification"].status == "warn" and verdicts["specification"].text == "estimates disagree"
    assert verdicts["sensitivity"].status == "warn"


def test_matrix_shows_the_difference_in_means_once():
    from eocausal.report import estimates_matrix

    matrix = estimates_matrix(_demo_like_estimates())
    assert list(matrix.columns) == ["none", "tabular", "image", "tabular+image"]
    assert list(matrix.index) == ["difference in means", "AIPW", "DML (partially linear)"]
    assert matrix.loc["difference in means"].tolist() == ["3.900 [3.500, 4.300]", "", "", ""]
    assert matrix.loc["AIPW", "tabular+image"] == "1.100 [0.700, 1.500]"


def _units(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    survey = pd.DataFrame({"unit_id": [f"U{i:02d}" for i in range(n)], "lat": -25.3 + rng.random(n) * 0.1,
                           "lon": -54.6 + rng.random(n) * 0.1, "treatment": rng.integers(0, 2, n).astype("int8"),
                           "outcome": rng.normal(size=n)})
    exclusions = pd.DataFrame({"unit_id": ["U00", "U01", "U02"],
                               "reason": ["outside_coverage", "nodata_share_above_max", "nodata_share_above_max"]})
    preds = pd.DataFrame({"unit_id": survey["unit_id"][3:], "feature_set": "tabular+image",
                          "propensity": np.linspace(0.05, 0.95, n - 3), "cate": rng.normal(1, 0.3, n - 3),
                          "cate_std_error": 0.2})
    from eocausal.report import unit_table

    return unit_table(survey, exclusions, preds)


def test_unit_table_map_and_example_chips():
    from matplotlib.figure import Figure

    from eocausal.imagery.preview import ScenePreview
    from eocausal.report import example_chips_figure, example_units, unit_map_figure

    units = _units()
    assert units.set_index("unit_id").loc["U01", "reason"] == "nodata_share_above_max"
    assert (units["status"] == "excluded").sum() == 3 and units.loc[units["status"] == "excluded", "propensity"].isna().all()
    scene = ScenePreview(np.random.default_rng(0).random((20, 30, 3)), (-54.62, -54.48, -25.32, -25.18), ("a.tif",))
    fig = unit_map_figure(units, scene)
    assert isinstance(fig, Figure)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(lab.startswith("treated (") for lab in labels) and any(lab.startswith("control (") for lab in labels)
    assert "excluded: outside coverage (1)" in labels and "excluded: nodata share above max (2)" in labels
    groups = example_units(units, k=3)
    assert groups["most_likely_treated"] == ["U39", "U38", "U37"] and groups["least_likely_treated"] == ["U03", "U04", "U05"]
    chips = {name: (ids, np.random.default_rng(1).random((3, 3, 8, 8)), np.ones((3, 8, 8), bool))
             for name, ids in groups.items()}
    fig = example_chips_figure(chips, units)
    assert len(fig.axes) == 6 and "e = 0.95" in fig.axes[0].get_xlabel()
    assert unit_map_figure(units.iloc[:0]) is None and example_chips_figure({}, units) is None


def test_report_answers_first_and_exports_geoparquet(tmp_path):
    import pyarrow.parquet as pq

    from eocausal.geoparquet import read_wkb_point

    inputs = _inputs(tmp_path)
    inputs.estimates = _demo_like_estimates()
    inputs.units = _units()
    from eocausal.report import example_units

    inputs.example_chips = {name: (ids, np.random.default_rng(1).random((len(ids), 3, 8, 8)),
                                   np.ones((len(ids), 8, 8), bool))
                            for name, ids in example_units(inputs.units, k=2).items()}
    inputs.pca_explained_variance = list(np.linspace(0.3, 0.001, 32) / np.linspace(0.3, 0.001, 32).sum())
    raster = tmp_path / "transport_cate.tif"
    raster.write_bytes(b"II*\x00")
    inputs.transport_raster = raster
    report = build_report(inputs, tmp_path / "report")
    html = report.html_path.read_text(encoding="utf-8")
    # the headline comes before every section, and says the answer
    first_h2 = html.index("<h2>")
    head = html[html.index("class='headline'"):first_h2]
    assert "1.100" in head and "95% CI [0.700, 1.500]" in head and "AIPW with the tabular covariates and the image" in head
    assert "Naive difference in means: <b>3.900</b>" in head and "moved the estimate by <b>-2.200</b>" in head
    for verdict in ("Overlap:", "Sensitivity:", "Specification:", "Chip scale:"):
        assert verdict in head, verdict
    # the matrix: the naive estimate once, the recommended cell marked
    assert "<td>difference in means</td><td>3.900 [3.500, 4.300]</td><td colspan='3'" in html
    assert "the same under every feature set" in html and "class='recommended'>1.100 [0.700, 1.500]" in html
    for name in ("unit_map", "example_chips", "pca_variance"):
        assert name in report.figures and report.figures[name].read_bytes()[:4] == b"\x89PNG", name
    assert "leading 16 principal components" in html
    # GeoParquet: points for the units, the study area for the estimates, linked from the report
    units = pq.read_table(report.downloads["units"])
    geo = json.loads(units.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["geometry_types"] == ["Point"]
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "OGC", "code": "CRS84"}
    frame = units.to_pandas()
    lon, lat = read_wkb_point(frame["geometry"].iloc[5])
    assert (lon, lat) == (frame["lon"].iloc[5], frame["lat"].iloc[5])
    assert {"status", "reason", "propensity", "cate", "treatment"} <= set(frame.columns)
    estimates = pq.read_table(report.downloads["estimates"])
    assert json.loads(estimates.schema.metadata[b"geo"])["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    assert estimates.num_rows == len(inputs.estimates)
    assert "href='units.parquet'" in html and "href='../transport_cate.tif'" in html


def test_geoparquet_reads_in_geopandas_when_installed(tmp_path):
    gpd = pytest.importorskip("geopandas")
    from eocausal.geoparquet import write_points

    path = write_points(pd.DataFrame({"unit_id": ["a", "b"], "lon": [10.0, 11.0], "lat": [1.0, 2.0]}), tmp_path / "u.parquet")
    frame = gpd.read_parquet(path)
    assert frame.crs.to_string() == "OGC:CRS84" and frame.geometry.x.tolist() == [10.0, 11.0]


FIGURE_FUNCTIONS = """
import json, sys
import matplotlib
matplotlib.use("svg")  # whatever the caller chose must stay chosen
sys.path.insert(0, %r)
from tests.test_report import _demo_like_estimates, _units
from eocausal import report
est = _demo_like_estimates()
figs = [report.forest_figure(est, 1.0), report.overlap_figure(est), report.love_figure(est),
        report.unit_map_figure(_units()), report.pca_variance_figure([0.5, 0.3, 0.2], 2),
        report.cluster_figure({"k": 2, "mu": [0.2, 2.1], "mu_std_error": [0.1, 0.2], "shares": [0.6, 0.4]})]
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules,
                  "types": sorted({type(f).__name__ for f in figs})}))
"""


def test_figures_are_built_without_pyplot_or_a_backend(tmp_path):
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", FIGURE_FUNCTIONS % (repo,)], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"backend": "svg", "pyplot": False, "types": ["Figure"]}


def test_no_library_module_chooses_a_matplotlib_backend():
    import ast

    import eocausal

    offenders = []
    for path in Path(eocausal.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib":
                offenders.append(f"{path.name}:{node.lineno}")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n == "matplotlib.pyplot"]
    assert offenders == []
