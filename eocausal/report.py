"""The study report: one self-contained HTML file (figures embedded as base64 PNG, and written
beside it) per study version.

Sections: data quality (units used and excluded, by reason), effect estimates (forest plot across
estimators x feature sets, the table), overlap (propensity histograms by arm), covariate balance
(love plot), heterogeneity (held-out CATE distributions, the RATE/TOC curve with AUTOC and Qini,
PEHE when the truth is known), effect clusters, the transport map, and saliency panels.

Everything here takes plain tables and file paths (no Dagster, no warehouse connection), so a
notebook can build the same report from the lake.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# Bump when the report's content changes for the same inputs.
CODE_VERSION = "report-1"
FEATURE_SET_ORDER = ("none", "tabular", "image", "tabular+image")
_COLOURS = {"none": "#7f7f7f", "tabular": "#1f77b4", "image": "#2ca02c", "tabular+image": "#d62728"}


@dataclass
class ReportInputs:
    study: str
    version: str  # the report's version (ties the figures to one state of the inputs)
    estimates: pd.DataFrame  # one estimate version: effect_estimates rows
    n_survey_units: int
    exclusions: pd.DataFrame  # unit_id, reason
    truth_ate: float | None = None
    truth_dml: float | None = None  # the partially linear model's (variance-weighted) target
    cate_predictions: pd.DataFrame | None = None
    cate_evaluation: pd.DataFrame | None = None
    clusters: dict | None = None  # the cluster model's summary (see assets.heterogeneity)
    transport_png: Path | None = None
    transport_summary: dict | None = None
    saliency_pngs: list[Path] = field(default_factory=list)
    saliency_summary: dict | None = None
    truth_tau: pd.DataFrame | None = None  # unit_id, tau (simulated studies)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    html_path: Path
    figures: dict  # name -> PNG path
    key_figures: list[str]  # names of the figures worth showing first (Dagster metadata)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _ordered_sets(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [fs for fs in FEATURE_SET_ORDER if fs in present] + [fs for fs in present if fs not in FEATURE_SET_ORDER]


# --- figures ----------------------------------------------------------------------------------


def forest_plot(estimates: pd.DataFrame, truth: float | None, path: Path) -> Path:
    plt = _plt()
    est = estimates[estimates["estimand"] == "ATE"] if (estimates["estimand"] == "ATE").any() else estimates
    sets = _ordered_sets(est["feature_set"])
    estimators = list(dict.fromkeys(est["estimator"]))
    # With outcome imputation each spec has several rows (outcome_source): one line each.
    sources = (list(dict.fromkeys(est["outcome_source"].fillna("measured")))
               if "outcome_source" in est.columns else [None])
    markers = dict(zip(sources, "osD^v"))
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(est) + 0.35 * len(estimators) + 1.2))
    y, ticks = 0.0, []
    for estimator in estimators:
        for fs in sets:
            for source in sources:
                row = est[(est["estimator"] == estimator) & (est["feature_set"] == fs)]
                if source is not None:
                    row = row[row["outcome_source"].fillna("measured") == source]
                if row.empty:
                    continue
                r = row.iloc[0]
                ax.errorbar(r["estimate"], y, xerr=[[r["estimate"] - r["ci_low"]], [r["ci_high"] - r["estimate"]]],
                            fmt=markers.get(source, "o"), color=_COLOURS.get(fs, "k"), ms=4, capsize=2)
                label = f"{estimator} | {fs}" + (f" | {source}" if len(sources) > 1 else "")
                ticks.append((y, label))
                y += 1.0
        y += 0.6  # a gap between estimators
    ax.set_yticks([t for t, _ in ticks])
    ax.set_yticklabels([lab for _, lab in ticks], fontsize=8)
    if truth is not None:
        ax.axvline(truth, color="k", ls="--", lw=1, label=f"truth {truth:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ATE estimate with 95% CI")
    ax.set_title("Effect estimates: estimators x feature sets")
    fig.tight_layout()
    return _save(fig, path)


def _diagnostics(estimates: pd.DataFrame, estimator_preference=("aipw", "ipw", "dml")) -> dict[str, dict]:
    """Per feature set, the diagnostics JSON of the first preferred estimator that has a propensity."""
    out = {}
    for fs in _ordered_sets(estimates["feature_set"]):
        for estimator in estimator_preference:
            rows = estimates[(estimates["feature_set"] == fs) & (estimates["estimator"] == estimator)]
            if "outcome_source" in rows.columns:  # the measured-outcome row first
                rows = rows.sort_values("outcome_source", key=lambda c: c.fillna("measured") != "measured")
            if rows.empty:
                continue
            diag = json.loads(rows.iloc[0]["diagnostics"] or "{}")
            if diag.get("propensity"):
                out[fs] = diag
                break
    return out


def overlap_plot(estimates: pd.DataFrame, path: Path) -> Path | None:
    diags = _diagnostics(estimates)
    if not diags:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(diags), figsize=(3.4 * len(diags), 2.9), squeeze=False)
    for ax, (fs, diag) in zip(axes[0], diags.items()):
        hist = diag["propensity"]["histogram"]
        edges = np.asarray(hist["bin_edges"])
        width = np.diff(edges)
        for arm, colour in (("treated", "#d62728"), ("control", "#1f77b4")):
            counts = np.asarray(hist[arm], dtype=float)
            density = counts / max(counts.sum(), 1) / width
            ax.bar(edges[:-1], density, width=width, align="edge", alpha=0.5, color=colour, label=arm)
        clip = diag.get("clip")
        if clip:
            for v in (clip, 1 - clip):
                ax.axvline(v, color="k", lw=0.7, ls=":")
        auc = diag["propensity"].get("auc")
        ax.set_title(f"{fs} (AUC {auc:.2f})" if auc is not None else fs, fontsize=9)
        ax.set_xlabel("cross-fitted propensity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Overlap: propensity by arm", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def love_plot(estimates: pd.DataFrame, path: Path) -> Path | None:
    diags = _diagnostics(estimates, ("aipw", "ipw"))
    fs = next((s for s in ("tabular+image", "image", "tabular") if s in diags), None)
    if fs is None:
        return None
    rows = list(diags[fs].get("balance", {}).get("columns", []))
    rows += list(diags[fs].get("balance_components", {}).get("columns", []) or [])
    rows = [r for r in rows if r.get("smd_before") is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.26 * len(rows) + 1.3))
    ys = np.arange(len(rows))
    before = [abs(r["smd_before"]) for r in rows]
    after = [abs(r["smd_after"]) if r.get("smd_after") is not None else np.nan for r in rows]
    ax.scatter(before, ys, facecolors="none", edgecolors="#1f77b4", label="unweighted")
    ax.scatter(after, ys, color="#d62728", label="inverse-propensity weighted")
    ax.axvline(0.1, color="k", ls="--", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["column"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("|standardised mean difference|")
    ax.set_title(f"Covariate balance ({fs} propensity)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def cate_distribution_plot(predictions: pd.DataFrame, truth_tau: pd.DataFrame | None, path: Path) -> Path | None:
    if predictions is None or predictions.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    values = [predictions.loc[predictions["feature_set"] == fs, "cate"]
              for fs in _ordered_sets(predictions["feature_set"])]
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    if truth_tau is not None and len(truth_tau):
        lo, hi = min(lo, float(truth_tau["tau"].min())), max(hi, float(truth_tau["tau"].max()))
    bins = np.linspace(lo, hi, 40)
    for fs in _ordered_sets(predictions["feature_set"]):
        v = predictions.loc[predictions["feature_set"] == fs, "cate"]
        ax.hist(v, bins=bins, histtype="step", lw=1.6, color=_COLOURS.get(fs, "k"), label=f"{fs}", density=True)
    if truth_tau is not None and len(truth_tau):
        ax.hist(truth_tau["tau"], bins=bins, color="0.6", alpha=0.45, label="true effect", density=True)
    ax.set_xlabel("held-out CATE prediction (DR-learner)")
    ax.set_ylabel("density")
    ax.set_title("Distribution of conditional effects")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def rate_plot(evaluation: pd.DataFrame, path: Path) -> Path | None:
    if evaluation is None or evaluation.empty:
        return None
    autoc = evaluation[evaluation["metric"] == "rate_autoc"]
    if autoc.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r in autoc.itertuples():
        d = json.loads(r.details)
        q, toc, se = np.asarray(d["q"]), np.asarray(d["toc"]), np.asarray(d["toc_std_error"])
        colour = _COLOURS.get(r.feature_set, "k")
        ax.plot(q, toc, color=colour,
                label=f"{r.feature_set}: AUTOC {r.estimate:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]")
        ax.fill_between(q, toc - 1.96 * se, toc + 1.96 * se, color=colour, alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("treated fraction q (units ranked by held-out CATE)")
    ax.set_ylabel("TOC(q) = ATE(top q) - ATE")
    ax.set_title("Targeting operator characteristic (RATE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def cluster_plot(clusters: dict, path: Path) -> Path | None:
    if not clusters or not clusters.get("k"):
        return None
    plt = _plt()
    k = int(clusters["k"])
    mu = np.asarray(clusters["mu"])
    se = np.asarray(clusters["mu_std_error"])
    share = np.asarray(clusters["shares"])
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    xs = np.arange(k)
    ax.bar(xs, mu, yerr=1.96 * se, color="#9467bd", alpha=0.8, capsize=4)
    for x, m, s in zip(xs, mu, share):
        ax.text(x, m, f" {s:.0%}", ha="left", va="bottom", fontsize=8)
    if clusters.get("true_effects"):
        for j, t in enumerate(clusters["true_effects"]):
            ax.axhline(t, color="k", ls=":", lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"cluster {j}" for j in xs])
    ax.set_ylabel("cluster effect (95% CI)")
    ax.set_title(f"Image effect clusters (K = {k}; % = share of units)")
    fig.tight_layout()
    return _save(fig, path)


# --- HTML -------------------------------------------------------------------------------------


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return f"<p class='muted'>({html.escape(alt)}: not available)</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _is_number(v) -> bool:
    return isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool)


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = "".join(
            f"<td>{html.escape(_fmt(v) if _is_number(v) else str(v))}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.6rem 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.6rem 0; }
.muted { color: #777; }
.kpi { display: inline-block; margin: 0 1.2rem 0.6rem 0; padding: 0.4rem 0.8rem; background: #f6f8fa;
       border-radius: 6px; } .kpi b { display: block; font-size: 1.15rem; }
.ok { color: #2a7d2a; } .warn { color: #b35900; }
"""


def build_report(inputs: ReportInputs, out_dir: Path) -> Report:
    """Write report.html (self-contained) and its PNGs into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    est = inputs.estimates
    figures: dict[str, Path] = {}

    def add(name, path):
        if path is not None:
            figures[name] = path

    add("forest", forest_plot(est, inputs.truth_ate, out_dir / "forest.png"))
    add("overlap", overlap_plot(est, out_dir / "overlap.png"))
    add("balance", love_plot(est, out_dir / "balance.png"))
    add("cate_distribution",
        cate_distribution_plot(inputs.cate_predictions, inputs.truth_tau, out_dir / "cate_distribution.png"))
    add("rate", rate_plot(inputs.cate_evaluation, out_dir / "rate.png"))
    add("clusters", cluster_plot(inputs.clusters, out_dir / "clusters.png"))
    if inputs.transport_png is not None and Path(inputs.transport_png).exists():
        figures["transport"] = Path(inputs.transport_png)
    for i, p in enumerate(inputs.saliency_pngs):
        if Path(p).exists():
            figures[f"saliency_{i}"] = Path(p)

    parts = [f"<h1>Study report: {html.escape(inputs.study)}</h1>",
             f"<p class='muted'>report version {html.escape(inputs.version)} · estimate version "
             f"{html.escape(str(est['estimate_version'].iloc[0]) if len(est) else '–')}</p>"]
    parts += _quality_section(inputs)
    parts += _estimates_section(inputs, figures)
    parts += _heterogeneity_section(inputs, figures)
    parts += _transport_section(inputs, figures)
    parts += _saliency_section(inputs, figures)
    if inputs.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inputs.notes) + "</ul>")
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>eocausal report: {html.escape(inputs.study)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts) + "</body></html>"
    )
    html_path = out_dir / "report.html"
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=out_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(document)
    os.chmod(tmp, 0o644)  # a report is for reading (mkstemp makes files private)
    os.replace(tmp, html_path)
    key = [name for name in ("forest", "rate", "transport") if name in figures]
    return Report(html_path, figures, key)


def _quality_section(inputs: ReportInputs) -> list[str]:
    est = inputs.estimates
    n_used = int(est["n"].max()) if len(est) else 0
    reasons = inputs.exclusions["reason"].value_counts() if len(inputs.exclusions) else pd.Series(dtype=int)
    out = ["<h2>Data quality</h2>",
           f"<div class='kpi'>survey units<b>{inputs.n_survey_units}</b></div>",
           f"<div class='kpi'>analysed<b>{n_used}</b></div>",
           f"<div class='kpi'>excluded<b>{len(inputs.exclusions)}</b></div>"]
    if len(reasons):
        out.append(_table(pd.DataFrame({"reason": reasons.index, "units": reasons.to_numpy()})))
    else:
        out.append("<p class='ok'>No unit was excluded.</p>")
    return out


def _fragility_lines(est: pd.DataFrame) -> list[str]:
    """The fragility checks (eocausal.estimate.fragility) as warnings above the estimates."""
    from eocausal.estimate.effects import fragility_summary

    out = []
    for column, what in (("specification_warning", "Specification check"), ("chip_scale_warning", "Chip-scale check")):
        warning, detail = fragility_summary(est, column)
        if warning:
            out.append(f"<p class='warn'><b>Warning — {what.lower()}:</b> {html.escape(warning)}</p>")
        else:
            out.append(f"<p class='muted'>{what}: {html.escape(detail)}</p>")
    return out


def _estimates_section(inputs: ReportInputs, figures) -> list[str]:
    est = inputs.estimates
    out = ["<h2>Effect estimates</h2>"]
    if inputs.truth_ate is not None:
        dml = ("" if inputs.truth_dml is None else
               f" dml (the partially linear model) targets the effect weighted by Var(D | X), here"
               f" <b>{inputs.truth_dml:.3f}</b>; its bias is against that.")
        out.append(f"<p>Known (simulated) ATE: <b>{inputs.truth_ate:.3f}</b> (dashed line).{dml}</p>")
    out += _fragility_lines(est)
    out.append(_img(figures.get("forest"), "forest plot"))
    cols = ["estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n"]
    if "outcome_source" in est.columns and est["outcome_source"].nunique() > 1:
        cols.insert(3, "outcome_source")
    table = est[cols].copy()
    if inputs.truth_ate is not None:
        target = np.where((table["estimator"] == "dml") & (inputs.truth_dml is not None),
                          inputs.truth_dml if inputs.truth_dml is not None else np.nan, inputs.truth_ate)
        table["bias"] = table["estimate"] - target
    out.append(_table(table))
    out.append("<h3>Overlap</h3>" + _img(figures.get("overlap"), "propensity histograms"))
    out.append("<h3>Balance</h3>" + _img(figures.get("balance"), "love plot"))
    return out


def _heterogeneity_section(inputs: ReportInputs, figures) -> list[str]:
    ev = inputs.cate_evaluation
    out = ["<h2>Heterogeneity (DR-learner CATE)</h2>"]
    if ev is None or ev.empty:
        return out + ["<p class='muted'>Heterogeneity analysis is off or produced no estimates.</p>"]
    out.append("<p>Pseudo-outcomes are cross-fitted AIPW scores (nuisances on every confounder); the final "
               "stage regresses them on each feature set. RATE ranks units by their <i>held-out</i> CATE and "
               "averages the TOC curve (AUTOC: uniform weights, Qini: weights q; grf normalisation, half-sample "
               "bootstrap CIs). A CI above 0 means the ranking finds units with larger effects.</p>")
    wide = ev.pivot_table(index="feature_set", columns="metric", values="estimate", aggfunc="first")
    rows = []
    for fs in _ordered_sets(ev["feature_set"]):
        row = {"feature set": fs}
        for metric, label in (("rate_autoc", "AUTOC"), ("rate_qini", "Qini")):
            r = ev[(ev["feature_set"] == fs) & (ev["metric"] == metric)]
            if len(r):
                r = r.iloc[0]
                row[label] = f"{r['estimate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        if "pehe" in wide.columns and fs in wide.index:
            row["PEHE"] = _fmt(wide.loc[fs, "pehe"])
        if "cate_sd" in wide.columns and fs in wide.index:
            row["sd of CATE"] = _fmt(wide.loc[fs, "cate_sd"])
        rows.append(row)
    out.append(_table(pd.DataFrame(rows)))
    pehe_rows = ev[ev["metric"] == "pehe"]
    if len(pehe_rows):
        constant = json.loads(pehe_rows.iloc[0]["details"]).get("pehe_constant_ate")
        if constant is not None:
            out.append(f"<p>PEHE = root mean squared error of the held-out CATE against the simulated truth; "
                       f"predicting the ATE for everyone gives {constant:.3f}.</p>")
    out.append(_img(figures.get("cate_distribution"), "CATE distribution"))
    out.append(_img(figures.get("rate"), "RATE curve"))
    c = inputs.clusters
    if c and c.get("k"):
        out.append("<h3>Image effect clusters</h3>")
        text = (f"K = {c['k']}" + (" (chosen by held-out fit)" if c.get("chosen_by_held_out_fit") else "")
                + f"; EM {'converged' if c.get('converged') else 'did not converge'} in {c.get('n_iter')} iterations.")
        if c.get("ari_posterior") is not None:
            text += (f" Adjusted Rand index against the simulated clusters: {c['ari_posterior']:.3f} (posterior), "
                     f"{c['ari_membership']:.3f} (image-predicted membership).")
        out.append(f"<p>{html.escape(text)}</p>")
        out.append(_img(figures.get("clusters"), "cluster effects"))
    return out


def _transport_section(inputs: ReportInputs, figures) -> list[str]:
    out = ["<h2>Transport: predicted effects beyond the study</h2>"]
    s = inputs.transport_summary
    if s:
        out.append(f"<p>{s.get('n_predicted', 0)} of {s.get('n_cells', 0)} grid cells predicted "
                   f"({s.get('cell_size_km', float('nan')):.2f} km cells); "
                   f"{s.get('n_outside_hull', 0)} lie outside the "
                   "convex hull of the study's units, where the map extrapolates. The standard error is the "
                   "sampling error of the fitted image model, not the error of extrapolation.</p>")
    out.append(_img(figures.get("transport"), "transport map"))
    return out


def _saliency_section(inputs: ReportInputs, figures) -> list[str]:
    out = ["<h2>Saliency: what in the image drives the models</h2>",
           "<p>Gradient of the image-only treatment model's logit (and of the unit's most likely effect cluster's "
           "log-probability) with respect to each normalised pixel, back-propagated through the random "
           "convolutional features and the PCA.</p>"]
    names = [n for n in figures if n.startswith("saliency_")]
    if not names:
        out.append("<p class='muted'>(no saliency panels)</p>")
    for n in names:
        out.append(_img(figures[n], n))
    return out


def png_markdown(path: Path, alt: str) -> str:
    """Markdown embedding a PNG as a base64 data URI (for Dagster's MetadataValue.md)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
