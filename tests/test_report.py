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
            " height: document.documentElement.scrollHeight}"
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
