"""The study report: one self-contained HTML file (figures embedded as base64 PNG, and written
beside it) per study version.

It answers first: a headline (the recommended estimate with its CI, the naive difference in means,
how much adjusting for the image moved the estimate, and the verdicts of the overlap, sensitivity
and fragility checks), then one estimates matrix (estimator x feature set; the difference in means
once), then the units (a map by arm and exclusion reason over the imagery, example chips of the most
and least likely treated), diagnostics (overlap, balance, PCA variance explained), heterogeneity
(held-out CATE distributions, the RATE/TOC curve with AUTOC and Qini, PEHE when the truth is known),
effect clusters, the transport map, saliency panels, and downloads (GeoParquet of the units and the
estimates, the transport COG).

Every figure is built by a ``*_figure`` function as a pyplot-free matplotlib Figure
(eocausal.figures), so a notebook gets the same figures (eocausal.results.StudyResults).

Everything here takes plain tables and file paths (no Dagster, no warehouse connection), so a
notebook can build the same report from the lake.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import atomic
from eocausal.figures import new_figure, save_figure

# Bump when the report's content changes for the same inputs.
CODE_VERSION = "report-2"  # 2: headline, estimates matrix, unit map, example chips, PCA, exports
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
    units: pd.DataFrame | None = None  # unit_table(): every survey unit, its arm, status, reason, propensity
    scene: object | None = None  # eocausal.imagery.preview.ScenePreview: the imagery under the unit map
    example_chips: dict | None = None  # group -> (unit ids, chips [N, C, H, W], valid [N, H, W])
    pca_explained_variance: list | None = None  # the embedding PCA's explained variance ratio
    transport_raster: Path | None = None  # the transport COG


@dataclass
class Report:
    html_path: Path
    figures: dict  # name -> PNG path
    key_figures: list[str]  # names of the figures worth showing first (Dagster metadata)
    downloads: dict = field(default_factory=dict)  # name -> path: GeoParquet exports, transport COG


def _save(fig, path: Path) -> Path | None:
    """Write a figure built by a ``*_figure`` function (None: nothing to draw) as a PNG."""
    return None if fig is None else save_figure(fig, path, dpi=90)


def _ordered_sets(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [fs for fs in FEATURE_SET_ORDER if fs in present] + [fs for fs in present if fs not in FEATURE_SET_ORDER]


# --- the answer first: the headline and the estimates matrix ------------------------------------

# The recommended estimate: the first of these (estimator, feature set) present, on the ATE with the
# measured outcomes. Doubly robust with everything known about each unit first; the image-adjusted
# estimates before the tabular-only ones; the unadjusted difference in means last.
RECOMMENDED_ORDER = (
    ("aipw", "tabular+image"), ("aipw", "image"), ("dml", "tabular+image"), ("dml", "image"),
    ("ipw", "tabular+image"), ("ipw", "image"), ("aipw", "tabular"), ("dml", "tabular"), ("ipw", "tabular"),
    ("aipw", "none"), ("dml", "none"), ("ipw", "none"), ("difference_in_means", "none"),
)
NAIVE = "difference_in_means"
ESTIMATOR_LABELS = {"difference_in_means": "difference in means", "ipw": "Hajek IPW", "aipw": "AIPW",
                    "dml": "DML (partially linear)"}
# A robustness value below this is called fragile: a confounder explaining under 10% of the residual
# variance of treatment and outcome could explain the estimate away (a rule of thumb, not a test).
FRAGILE_RV = 0.1
_WITHOUT_IMAGE = {"tabular+image": "tabular", "image": "none"}


@dataclass
class Verdict:
    name: str  # "overlap", "sensitivity", "specification", "chip scale"
    status: str  # "ok" | "warn" | "unknown"
    text: str


@dataclass
class Headline:
    """The answer of a study: the recommended estimate, the naive one, what the image changed, and
    the verdicts of the checks on the recommended estimate."""

    estimand: str
    estimator: str
    feature_set: str
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    n: int
    naive: dict | None  # the difference in means: estimate, std_error, ci_low, ci_high
    without_image: dict | None  # the same estimator without the image features: feature_set, estimate, ci
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def image_shift(self) -> float | None:
        """How much adjusting for the image moved the estimate (recommended minus without the image)."""
        return None if self.without_image is None else self.estimate - self.without_image["estimate"]

    @property
    def label(self) -> str:
        return f"{ESTIMATOR_LABELS.get(self.estimator, self.estimator)} with {_feature_words(self.feature_set)}"

    def sentences(self) -> list[str]:
        out = [f"{self.estimand} {self.estimate:.3f} (95% CI {self.ci_low:.3f} to {self.ci_high:.3f}; "
               f"{self.label}, n = {self.n:,})."]
        if self.naive is not None and self.estimator != NAIVE:
            out.append(f"The naive difference in means is {self.naive['estimate']:.3f} "
                       f"({self.naive['ci_low']:.3f} to {self.naive['ci_high']:.3f}).")
        if self.without_image is not None:
            w = self.without_image
            out.append(f"Adjusting for the image moved the estimate by {self.image_shift:+.3f} "
                       f"(from {w['estimate']:.3f}, {ESTIMATOR_LABELS.get(self.estimator, self.estimator)} with "
                       f"{_feature_words(w['feature_set'])}).")
        return out

    def to_dict(self) -> dict:
        return {
            "estimand": self.estimand, "estimator": self.estimator, "feature_set": self.feature_set,
            "estimate": self.estimate, "std_error": self.std_error, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "n": self.n, "naive": self.naive, "without_image": self.without_image, "image_shift": self.image_shift,
            "verdicts": [{"name": v.name, "status": v.status, "text": v.text} for v in self.verdicts],
        }


def _feature_words(feature_set: str) -> str:
    return {"none": "no adjustment", "tabular": "the tabular covariates only", "image": "the image only",
            "tabular+image": "the tabular covariates and the image"}.get(feature_set, feature_set)


def _measured(estimates: pd.DataFrame) -> pd.DataFrame:
    """The rows on the measured outcomes (all rows of a study without outcome imputation)."""
    if "outcome_source" not in estimates.columns:
        return estimates
    return estimates[estimates["outcome_source"].fillna("measured") == "measured"]


def _summary(row) -> dict:
    return {k: float(row[k]) for k in ("estimate", "std_error", "ci_low", "ci_high")}


def headline(estimates: pd.DataFrame) -> Headline | None:
    """The :class:`Headline` of one estimate version's rows (None when there are none)."""
    if estimates is None or estimates.empty:
        return None
    rows = _measured(estimates)
    if (rows["estimand"] == "ATE").any():
        rows = rows[rows["estimand"] == "ATE"]
    if rows.empty:
        return None

    def find(estimator, feature_set):
        hit = rows[(rows["estimator"] == estimator) & (rows["feature_set"] == feature_set)]
        return None if hit.empty else hit.iloc[0]

    chosen = next((r for e, fs in RECOMMENDED_ORDER if (r := find(e, fs)) is not None), rows.iloc[0])
    naive_rows = rows[rows["estimator"] == NAIVE]
    naive = _summary(naive_rows.iloc[0]) if len(naive_rows) else None
    without = None
    base = _WITHOUT_IMAGE.get(str(chosen["feature_set"]))
    if base is not None and chosen["estimator"] != NAIVE:
        other = find(chosen["estimator"], base)
        if other is not None:
            without = {"feature_set": base, **_summary(other)}
    out = Headline(
        estimand=str(chosen["estimand"]), estimator=str(chosen["estimator"]), feature_set=str(chosen["feature_set"]),
        estimate=float(chosen["estimate"]), std_error=float(chosen["std_error"]), ci_low=float(chosen["ci_low"]),
        ci_high=float(chosen["ci_high"]), n=int(chosen["n"]), naive=naive, without_image=without,
    )
    out.verdicts = [_overlap_verdict(chosen), _sensitivity_verdict(chosen)] + _fragility_verdicts(estimates)
    return out


def _overlap_verdict(row) -> Verdict:
    from eocausal.estimate.diagnostics import overlap_ok

    try:
        diagnostics = json.loads(row.get("diagnostics") or "{}")
    except (TypeError, ValueError):
        diagnostics = {}
    if not diagnostics.get("propensity"):
        return Verdict("overlap", "unknown", "not assessed: the recommended estimate has no propensity model")
    ok, message = overlap_ok(diagnostics)
    return Verdict("overlap", "ok" if ok else "warn", message)


def _sensitivity_verdict(row) -> Verdict:
    rv, rv_alpha = row.get("robustness_value"), row.get("robustness_value_alpha")
    if rv is None or not np.isfinite(rv):
        return Verdict("sensitivity", "unknown", "no robustness value for this estimator (AIPW and DML have one)")
    text = (f"RV {rv:.2f}: an unobserved confounder explaining {rv:.0%} of the residual variance of both "
            f"treatment and outcome would bring the estimate to zero")
    if rv_alpha is not None and np.isfinite(rv_alpha):
        text += (f"; RV_alpha {rv_alpha:.2f}" + (" (the CI already includes zero)" if rv_alpha <= 0 else
                 f": {rv_alpha:.0%} would make it insignificant"))
    fragile = rv < FRAGILE_RV or (rv_alpha is not None and np.isfinite(rv_alpha) and rv_alpha <= 0)
    return Verdict("sensitivity", "warn" if fragile else "ok", text)


def _fragility_verdicts(estimates: pd.DataFrame) -> list[Verdict]:
    from eocausal.estimate.effects import fragility_summary

    out = []
    for column, name in (("specification_warning", "specification"), ("chip_scale_warning", "chip scale")):
        warning, detail = fragility_summary(estimates, column)
        if warning:
            out.append(Verdict(name, "warn", str(warning)))
        else:
            out.append(Verdict(name, "ok" if detail.startswith("quiet") else "unknown", detail))
    return out


def estimates_matrix(estimates: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Estimator x feature set, each cell 'estimate [ci_low, ci_high]' (ATE, measured outcomes).

    The difference in means does not depend on the feature set: when it is the same under every
    feature set it is shown once, in the first column, and the rest of its row is empty."""
    rows = _measured(estimates)
    if (rows["estimand"] == "ATE").any():
        rows = rows[rows["estimand"] == "ATE"]
    sets = _ordered_sets(rows["feature_set"])
    order = [e for e in (NAIVE, "ipw", "aipw", "dml") if e in set(rows["estimator"])]
    order += [e for e in dict.fromkeys(rows["estimator"]) if e not in order]
    table = pd.DataFrame("", index=[ESTIMATOR_LABELS.get(e, e) for e in order], columns=sets, dtype=object)
    table.index.name = "estimator"
    for e in order:
        part = rows[rows["estimator"] == e]
        cells = {fs: f"{r['estimate']:.{digits}f} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
                 for fs, r in ((r["feature_set"], r) for _, r in part.iterrows())}
        if e == NAIVE and len(set(cells.values())) == 1:
            cells = {sets[0]: next(iter(cells.values()))}
        for fs, text in cells.items():
            table.loc[ESTIMATOR_LABELS.get(e, e), fs] = text
    return table


# --- figures ----------------------------------------------------------------------------------


def forest_plot(estimates: pd.DataFrame, truth: float | None, path: Path) -> Path:
    return _save(forest_figure(estimates, truth), path)


def forest_figure(estimates: pd.DataFrame, truth: float | None = None):
    """Every estimate with its 95% CI, grouped by estimator, coloured by feature set."""
    est = estimates[estimates["estimand"] == "ATE"] if (estimates["estimand"] == "ATE").any() else estimates
    naive = est[est["estimator"] == NAIVE]
    if len(naive) > 1 and naive["estimate"].nunique() == 1 and naive["ci_low"].nunique() == 1:
        # The same under every feature set: one line.
        est = est[(est["estimator"] != NAIVE) | (est["feature_set"] == naive["feature_set"].iloc[0])]
    sets = _ordered_sets(est["feature_set"])
    estimators = list(dict.fromkeys(est["estimator"]))
    # With outcome imputation each spec has several rows (outcome_source): one line each.
    sources = (list(dict.fromkeys(est["outcome_source"].fillna("measured")))
               if "outcome_source" in est.columns else [None])
    markers = dict(zip(sources, "osD^v"))
    fig = new_figure((7.5, 0.3 * len(est) + 0.35 * len(estimators) + 1.2))
    ax = fig.subplots()
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
    return fig


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
    return _save(overlap_figure(estimates), path)


def overlap_figure(estimates: pd.DataFrame):
    """Cross-fitted propensity histograms by arm, one panel per feature set (None: no propensity)."""
    diags = _diagnostics(estimates)
    if not diags:
        return None
    fig = new_figure((3.4 * len(diags), 2.9))
    axes = fig.subplots(1, len(diags), squeeze=False)
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
    return fig


def love_plot(estimates: pd.DataFrame, path: Path) -> Path | None:
    return _save(love_figure(estimates), path)


def love_figure(estimates: pd.DataFrame):
    """Standardised mean differences before and after weighting (None: no balance diagnostics)."""
    diags = _diagnostics(estimates, ("aipw", "ipw"))
    fs = next((s for s in ("tabular+image", "image", "tabular") if s in diags), None)
    if fs is None:
        return None
    rows = list(diags[fs].get("balance", {}).get("columns", []))
    rows += list(diags[fs].get("balance_components", {}).get("columns", []) or [])
    rows = [r for r in rows if r.get("smd_before") is not None]
    if not rows:
        return None
    fig = new_figure((6.5, 0.26 * len(rows) + 1.3))
    ax = fig.subplots()
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
    return fig


def cate_distribution_plot(predictions: pd.DataFrame, truth_tau: pd.DataFrame | None, path: Path) -> Path | None:
    return _save(cate_distribution_figure(predictions, truth_tau), path)


def cate_distribution_figure(predictions: pd.DataFrame | None, truth_tau: pd.DataFrame | None = None):
    """Held-out CATE distributions per feature set (and the true effects when known)."""
    if predictions is None or predictions.empty:
        return None
    fig = new_figure((6.5, 3.4))
    ax = fig.subplots()
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
    return fig


def rate_plot(evaluation: pd.DataFrame, path: Path) -> Path | None:
    return _save(rate_figure(evaluation), path)


def rate_figure(evaluation: pd.DataFrame | None):
    """The TOC curves with their AUTOC (None: no RATE rows)."""
    if evaluation is None or evaluation.empty:
        return None
    autoc = evaluation[evaluation["metric"] == "rate_autoc"]
    if autoc.empty:
        return None
    fig = new_figure((6.5, 3.6))
    ax = fig.subplots()
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
    return fig


def cluster_plot(clusters: dict, path: Path) -> Path | None:
    return _save(cluster_figure(clusters), path)


def cluster_figure(clusters: dict | None):
    """Each image effect cluster's effect with its CI and share (None: no cluster model)."""
    if not clusters or not clusters.get("k"):
        return None
    k = int(clusters["k"])
    mu = np.asarray(clusters["mu"])
    se = np.asarray(clusters["mu_std_error"])
    share = np.asarray(clusters["shares"])
    fig = new_figure((5.5, 3.0))
    ax = fig.subplots()
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
    return fig


# Exclusion reasons on the unit map (eocausal.imagery.chips and marts.unit_exclusions); others grey.
_REASON_STYLE = {"outside_coverage": ("#000000", "x"), "nodata_share_above_max": ("#ff7f0e", "x"),
                 "fetch_failed": ("#9467bd", "x"), "no_embedding": ("#8c564b", "+"),
                 "no_chip_record": ("#7f7f7f", "+")}
ANALYSED, EXCLUDED = "analysed", "excluded"


def unit_table(survey: pd.DataFrame, exclusions: pd.DataFrame | None, cate_predictions: pd.DataFrame | None = None,
               clusters: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per survey unit: where it is, its arm and outcome, whether it was analysed (or why it
    was excluded), and, where the heterogeneity stages ran, its cross-fitted propensity, CATE and
    effect cluster. ``survey``: the canonical survey (lake/survey.parquet); ``exclusions``:
    marts.unit_exclusions (unit_id, reason)."""
    units = survey.copy()
    units["unit_id"] = units["unit_id"].astype(str)
    reasons = {}
    if exclusions is not None and len(exclusions):
        reasons = dict(zip(exclusions["unit_id"].astype(str), exclusions["reason"].astype(str)))
    units["status"] = np.where(units["unit_id"].isin(list(reasons)), EXCLUDED, ANALYSED)
    units["reason"] = units["unit_id"].map(reasons).astype(object)
    units["reason"] = units["reason"].where(units["reason"].notna(), None)
    if cate_predictions is not None and len(cate_predictions):
        preds = cate_predictions.copy()
        preds["unit_id"] = preds["unit_id"].astype(str)
        sets = _ordered_sets(preds["feature_set"])
        fs = next((f for f in ("tabular+image", "image") if f in sets), sets[-1])
        chosen = preds[preds["feature_set"] == fs].drop_duplicates("unit_id").set_index("unit_id")
        units["propensity"] = units["unit_id"].map(chosen["propensity"])
        units["cate"] = units["unit_id"].map(chosen["cate"])
        units["cate_std_error"] = units["unit_id"].map(chosen["cate_std_error"])
        units["cate_feature_set"] = np.where(units["cate"].notna(), fs, None)
    if clusters is not None and len(clusters) and "cluster" in clusters.columns:
        c = clusters.drop_duplicates("unit_id").assign(unit_id=lambda t: t["unit_id"].astype(str)).set_index("unit_id")
        units["effect_cluster"] = units["unit_id"].map(c["cluster"]).astype("Int64")
    return units


def unit_map_figure(units: pd.DataFrame, scene=None, title: str = ""):
    """The units over the imagery (a :class:`eocausal.imagery.preview.ScenePreview`, or blank axes):
    analysed units by arm, excluded units by reason (None: no units)."""
    if units is None or units.empty:
        return None
    lon, lat = units["lon"].to_numpy(dtype=float), units["lat"].to_numpy(dtype=float)
    west, east, south, north = np.nanmin(lon), np.nanmax(lon), np.nanmin(lat), np.nanmax(lat)
    if scene is not None:
        west, east, south, north = (min(west, scene.extent[0]), max(east, scene.extent[1]),
                                    min(south, scene.extent[2]), max(north, scene.extent[3]))
    aspect = 1.0 / max(math.cos(math.radians((south + north) / 2)), 1e-6)
    ratio = (north - south) * aspect / max(east - west, 1e-9)
    width = 7.5
    fig = new_figure((width, float(np.clip(width * ratio, 3.5, 9.5)) + 0.6))
    ax = fig.subplots()
    if scene is not None:
        rgb = np.nan_to_num(scene.rgb, nan=1.0)  # nodata white
        ax.imshow(rgb, extent=scene.extent, origin="upper", interpolation="bilinear")
    analysed = units["status"] == ANALYSED
    treated = units["treatment"].fillna(0).astype(float) == 1
    for mask, colour, label in ((analysed & treated, "#d62728", "treated"),
                                (analysed & ~treated, "#1f77b4", "control")):
        if mask.any():
            ax.scatter(lon[mask], lat[mask], s=22, c=colour, edgecolors="white", linewidths=0.6,
                       label=f"{label} ({int(mask.sum()):,})", zorder=3)
    for reason in dict.fromkeys(units.loc[~analysed, "reason"].fillna("excluded")):
        mask = ~analysed & (units["reason"].fillna("excluded") == reason)
        colour, marker = _REASON_STYLE.get(reason, ("#7f7f7f", "x"))
        ax.scatter(lon[mask], lat[mask], s=30, c=colour, marker=marker, linewidths=1.4,
                   label=f"excluded: {reason.replace('_', ' ')} ({int(mask.sum()):,})", zorder=4)
    pad_x, pad_y = 0.02 * max(east - west, 1e-3), 0.02 * max(north - south, 1e-3)
    ax.set_xlim(west - pad_x, east + pad_x)
    ax.set_ylim(south - pad_y, north + pad_y)
    ax.set_aspect(aspect)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.set_title(title or "Units by arm and exclusion reason" + (" over the imagery" if scene is not None else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def example_units(units: pd.DataFrame, k: int = 4) -> dict[str, list[str]]:
    """The ``k`` analysed units most and least likely to be treated (cross-fitted propensity)."""
    if units is None or "propensity" not in units.columns:
        return {}
    ranked = units[(units["status"] == ANALYSED) & units["propensity"].notna()]
    ranked = ranked.sort_values(["propensity", "unit_id"], ascending=[False, True], kind="stable")
    k = min(k, len(ranked) // 2)
    if k < 1:
        return {}
    return {"most_likely_treated": ranked["unit_id"].head(k).tolist(),
            "least_likely_treated": ranked["unit_id"].tail(k).iloc[::-1].tolist()}


def example_chips_figure(chips: dict, units: pd.DataFrame):
    """Rows: the most and the least likely treated units; each chip in RGB with its propensity, arm
    and outcome. ``chips``: group -> (unit ids, data [N, C, H, W], valid [N, H, W]) (None: none)."""
    from eocausal.interpret import display_rgb

    groups = [(name, value) for name, value in chips.items() if value is not None and len(value[0])]
    if not groups:
        return None
    n_cols = max(len(ids) for _, (ids, _, _) in groups)
    fig = new_figure((2.1 * n_cols, 2.45 * len(groups) + 0.3))
    axes = fig.subplots(len(groups), n_cols, squeeze=False)
    lookup = units.set_index("unit_id") if units is not None and len(units) else None
    for row, (name, (ids, data, valid)) in enumerate(groups):
        for col in range(n_cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(ids):
                ax.axis("off")
                continue
            ax.imshow(display_rgb(data[col], valid[col]))
            label = str(ids[col])
            if lookup is not None and ids[col] in lookup.index:
                u = lookup.loc[ids[col]]
                label += f"\ne = {u['propensity']:.2f}, D = {int(u['treatment'])}"
                if "outcome" in u and pd.notna(u["outcome"]):
                    label += f", Y = {u['outcome']:.2f}"
            ax.set_xlabel(label, fontsize=7)
            if col == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=8)
    fig.suptitle("Example chips: the units most and least likely to be treated (e = cross-fitted propensity)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def pca_variance_figure(explained_variance_ratio, n_used: int | None = None):
    """Variance of the image embedding explained by each principal component and cumulatively, with
    the number of components the estimators used (None: no PCA stored)."""
    if explained_variance_ratio is None or len(explained_variance_ratio) == 0:
        return None
    ratio = np.asarray(explained_variance_ratio, dtype=float)
    cumulative = np.cumsum(ratio)
    ks = np.arange(1, len(ratio) + 1)
    fig = new_figure((6.5, 3.2))
    ax = fig.subplots()
    ax.bar(ks, ratio, color="#2ca02c", alpha=0.7, width=1.0, label="per component")
    ax.set_xlabel("principal component of the image embedding")
    ax.set_ylabel("share of variance")
    twin = ax.twinx()
    twin.plot(ks, cumulative, color="k", lw=1.4, label="cumulative")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative share")
    title = "Image features: variance explained by the PCA of the embedding"
    if n_used:
        n_used = int(min(n_used, len(ratio)))
        twin.axvline(n_used, color="#d62728", ls="--", lw=1)
        twin.annotate(f"{n_used} used: {cumulative[n_used - 1]:.0%}", (n_used, cumulative[n_used - 1]),
                      textcoords="offset points", xytext=(6, -14), fontsize=8, color="#d62728")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def image_components_used(estimates: pd.DataFrame) -> int | None:
    """How many image components the image feature sets used (n_features of tabular+image minus tabular,
    or of image)."""
    if estimates is None or estimates.empty or "n_features" not in estimates.columns:
        return None
    by_set = estimates.groupby("feature_set")["n_features"].max()
    if "image" in by_set.index and pd.notna(by_set["image"]):
        return int(by_set["image"])
    if "tabular+image" in by_set.index and "tabular" in by_set.index:
        return int(by_set["tabular+image"] - by_set["tabular"])
    return None


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
.ok { color: #2a7d2a; } .warn { color: #b35900; } .unknown { color: #777; }
.headline { border: 1px solid #d0d7de; border-radius: 8px; padding: 0.9rem 1.2rem; margin: 1rem 0 1.4rem;
            background: #fbfcfd; }
.headline .answer { font-size: 2.1rem; font-weight: 600; margin: 0.1rem 0; }
.headline .answer small { font-size: 1.05rem; font-weight: 400; color: #444; }
.headline .what { color: #444; margin: 0 0 0.5rem; }
.headline .lines p { margin: 0.2rem 0; }
.verdicts { list-style: none; padding: 0; margin: 0.6rem 0 0; display: flex; flex-wrap: wrap; gap: 0.4rem 0.8rem; }
.verdicts li { padding: 0.25rem 0.6rem; border-radius: 6px; background: #f2f4f6; font-size: 0.85rem;
               max-width: 100%; }
.verdicts li.ok { background: #e8f5e9; color: #1b5e20; } .verdicts li.warn { background: #fff3e0; color: #8a4b00; }
.verdicts li.unknown { background: #f2f4f6; color: #555; }
table.matrix td { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.matrix td.recommended { background: #e8f5e9; font-weight: 600; }
details summary { cursor: pointer; color: #0a58ca; margin: 0.4rem 0; }
"""


def build_report(inputs: ReportInputs, out_dir: Path) -> Report:
    """Write report.html (self-contained), its PNGs and the GeoParquet exports into ``out_dir``;
    returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    est = inputs.estimates
    figures: dict[str, Path] = {}

    def add(name, path):
        if path is not None:
            figures[name] = path

    add("forest", forest_plot(est, inputs.truth_ate, out_dir / "forest.png"))
    add("unit_map", _save(unit_map_figure(inputs.units, inputs.scene), out_dir / "unit_map.png"))
    if inputs.example_chips:
        add("example_chips", _save(example_chips_figure(inputs.example_chips, inputs.units),
                                   out_dir / "example_chips.png"))
    add("overlap", overlap_plot(est, out_dir / "overlap.png"))
    add("balance", love_plot(est, out_dir / "balance.png"))
    add("pca_variance", _save(pca_variance_figure(inputs.pca_explained_variance, image_components_used(est)),
                              out_dir / "pca_variance.png"))
    add("cate_distribution",
        cate_distribution_plot(inputs.cate_predictions, inputs.truth_tau, out_dir / "cate_distribution.png"))
    add("rate", rate_plot(inputs.cate_evaluation, out_dir / "rate.png"))
    add("clusters", cluster_plot(inputs.clusters, out_dir / "clusters.png"))
    if inputs.transport_png is not None and Path(inputs.transport_png).exists():
        figures["transport"] = Path(inputs.transport_png)
    for i, p in enumerate(inputs.saliency_pngs):
        if Path(p).exists():
            figures[f"saliency_{i}"] = Path(p)
    downloads = write_exports(inputs, out_dir)

    parts = [f"<h1>Study report: {html.escape(inputs.study)}</h1>",
             f"<p class='muted'>report version {html.escape(inputs.version)} · estimate version "
             f"{html.escape(str(est['estimate_version'].iloc[0]) if len(est) else '–')}</p>"]
    parts += _headline_section(inputs)
    parts += _estimates_section(inputs, figures)
    parts += _quality_section(inputs, figures)
    parts += _diagnostics_section(inputs, figures)
    parts += _heterogeneity_section(inputs, figures)
    parts += _transport_section(inputs, figures)
    parts += _saliency_section(inputs, figures)
    parts += _downloads_section(downloads, out_dir)
    if inputs.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inputs.notes) + "</ul>")
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>eocausal report: {html.escape(inputs.study)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts) + "</body></html>"
    )
    html_path = out_dir / "report.html"
    atomic.write_text(html_path, document)
    key = [name for name in ("forest", "rate", "transport") if name in figures]
    return Report(html_path, figures, key, downloads)


def write_exports(inputs: ReportInputs, out_dir: Path) -> dict[str, Path]:
    """GeoParquet beside the report: ``units.parquet`` (one point per survey unit, with its arm,
    status, exclusion reason, propensity and CATE) and ``estimates.parquet`` (the estimate rows, each
    with the study area: the convex hull of the analysed units); and the transport raster (a COG)
    where there is one."""
    from eocausal import geoparquet

    out: dict[str, Path] = {}
    units = inputs.units
    if units is not None and len(units):
        out["units"] = geoparquet.write_points(units, Path(out_dir) / "units.parquet")
        analysed = units[units["status"] == ANALYSED] if "status" in units.columns else units
        ring = geoparquet.study_area(analysed["lon"], analysed["lat"])
        if len(inputs.estimates):
            out["estimates"] = geoparquet.write_with_area(inputs.estimates, ring, Path(out_dir) / "estimates.parquet")
    for path in out.values():
        os.chmod(path, 0o644)
    if inputs.transport_raster is not None and Path(inputs.transport_raster).is_file():
        out["transport_raster"] = Path(inputs.transport_raster)
    return out


def _verdict_items(verdicts: list[Verdict]) -> str:
    marks = {"ok": "&#10003;", "warn": "&#9888;", "unknown": "?"}
    return "".join(
        f"<li class='{v.status}' title='{html.escape(v.text)}'><b>{marks.get(v.status, '')} "
        f"{html.escape(v.name.capitalize())}:</b> {html.escape(v.text)}</li>" for v in verdicts
    )


def _headline_section(inputs: ReportInputs) -> list[str]:
    h = headline(inputs.estimates)
    if h is None:
        return ["<section class='headline'><p class='warn'>No estimates in this version.</p></section>"]
    what = f"{'Average treatment effect' if h.estimand == 'ATE' else h.estimand} · {h.label} · n = {h.n:,}"
    lines = []
    if h.naive is not None and h.estimator != NAIVE:
        lines.append(f"<p>Naive difference in means: <b>{h.naive['estimate']:.3f}</b> "
                     f"[{h.naive['ci_low']:.3f}, {h.naive['ci_high']:.3f}]</p>")
    if h.without_image is not None:
        w = h.without_image
        lines.append(f"<p>Adjusting for the image moved the estimate by <b>{h.image_shift:+.3f}</b> "
                     f"(from {w['estimate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] with "
                     f"{html.escape(_feature_words(w['feature_set']))}).</p>")
    elif h.feature_set in ("tabular", "none"):
        lines.append("<p class='warn'>No image-adjusted estimate: the study's feature sets or estimators "
                     "have none.</p>")
    if inputs.truth_ate is not None:
        target = inputs.truth_dml if h.estimator == "dml" and inputs.truth_dml is not None else inputs.truth_ate
        lines.append(f"<p class='muted'>Simulated study: the known target is {target:.3f}; this estimate's bias "
                     f"{h.estimate - target:+.3f}.</p>")
    return [
        "<section class='headline' id='headline'>",
        f"<p class='what'>{html.escape(what)}</p>",
        f"<p class='answer'>{h.estimate:.3f} <small>95% CI [{h.ci_low:.3f}, {h.ci_high:.3f}]</small></p>",
        "<div class='lines'>" + "".join(lines) + "</div>",
        f"<ul class='verdicts'>{_verdict_items(h.verdicts)}</ul>",
        "</section>",
    ]


def _matrix_html(estimates: pd.DataFrame, h: Headline | None) -> str:
    matrix = estimates_matrix(estimates)
    head = "<th>estimator</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in matrix.columns)
    body = []
    recommended = (ESTIMATOR_LABELS.get(h.estimator, h.estimator), h.feature_set) if h is not None else None
    for label, row in matrix.iterrows():
        filled = [c for c in matrix.columns if row[c]]
        if label == ESTIMATOR_LABELS[NAIVE] and len(filled) == 1 and len(matrix.columns) > 1:
            cells = (f"<td>{html.escape(row[filled[0]])}</td><td colspan='{len(matrix.columns) - 1}' class='muted' "
                     "style='text-align:left'>the same under every feature set (no adjustment)</td>")
        else:
            mark = " class='recommended'"
            cells = "".join(
                f"<td{mark if recommended == (label, c) else ''}>{html.escape(row[c]) or '–'}</td>"
                for c in matrix.columns
            )
        body.append(f"<tr><td>{html.escape(str(label))}</td>{cells}</tr>")
    return f"<table class='matrix'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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
    if est.empty:
        return out + ["<p class='muted'>(no estimates)</p>"]
    h = headline(est)
    out.append("<p>ATE with 95% CI, by estimator (rows) and the features it adjusts for (columns); the recommended "
               "estimate is highlighted.</p>")
    out.append(_matrix_html(est, h))
    if inputs.truth_ate is not None:
        dml = ("" if inputs.truth_dml is None else
               f" dml (the partially linear model) targets the effect weighted by Var(D | X), here"
               f" <b>{inputs.truth_dml:.3f}</b>; its bias is against that.")
        out.append(f"<p>Known (simulated) ATE: <b>{inputs.truth_ate:.3f}</b> (dashed line).{dml}</p>")
    out += [line for line in _fragility_lines(est) if "class='warn'" in line]  # quiet ones: in the headline
    out.append(_img(figures.get("forest"), "forest plot"))
    cols = ["estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n"]
    if "outcome_source" in est.columns and est["outcome_source"].nunique() > 1:
        cols.insert(3, "outcome_source")
    for extra in ("robustness_value", "robustness_value_alpha"):
        if extra in est.columns and est[extra].notna().any():
            cols.append(extra)
    table = est[cols].copy()
    if inputs.truth_ate is not None:
        target = np.where((table["estimator"] == "dml") & (inputs.truth_dml is not None),
                          inputs.truth_dml if inputs.truth_dml is not None else np.nan, inputs.truth_ate)
        table["bias"] = table["estimate"] - target
    out.append(f"<details><summary>Every estimate ({len(table)} rows)</summary>{_table(table)}</details>")
    return out


def _quality_section(inputs: ReportInputs, figures=None) -> list[str]:
    figures = figures or {}
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
    if "unit_map" in figures:
        note = "" if inputs.scene is not None else (
            " <span class='muted'>(no local imagery to draw under them: Earth Engine or STAC imagery is fetched "
            "per chip)</span>")
        out.append(f"<p>Where the units are: analysed units by arm, excluded units by reason.{note}</p>")
        out.append(_img(figures["unit_map"], "unit map"))
    if "example_chips" in figures:
        out.append(_img(figures["example_chips"], "example chips"))
    return out


def _diagnostics_section(inputs: ReportInputs, figures) -> list[str]:
    out = ["<h2>Diagnostics</h2>",
           "<h3>Overlap</h3>" + _img(figures.get("overlap"), "propensity histograms"),
           "<h3>Balance</h3>" + _img(figures.get("balance"), "love plot"),
           "<h3>Image features</h3>"]
    used = image_components_used(inputs.estimates)
    ratio = inputs.pca_explained_variance
    if ratio is not None and len(ratio) and used:
        share = float(np.sum(np.asarray(ratio, dtype=float)[:used]))
        out.append(f"<p>The estimators use the leading {used} principal components of the image embedding, "
                   f"which explain {share:.0%} of its variance.</p>")
    out.append(_img(figures.get("pca_variance"), "PCA variance explained"))
    return out


def _downloads_section(downloads: dict[str, Path], out_dir: Path) -> list[str]:
    if not downloads:
        return []
    what = {"units": "units (GeoParquet: a point per survey unit with arm, status, exclusion reason, propensity, "
                     "CATE)",
            "estimates": "estimates (GeoParquet: every estimate row with the study area's polygon)",
            "transport_raster": "transport raster (Cloud-Optimised GeoTIFF: CATE, its SE, effect cluster)"}
    items = []
    for name, path in downloads.items():
        rel = os.path.relpath(path, out_dir)
        items.append(f"<li><a href='{html.escape(Path(rel).as_posix())}'>{html.escape(Path(path).name)}</a>: "
                     f"{html.escape(what.get(name, name))}</li>")
    return ["<h2>Downloads</h2><ul>" + "".join(items) + "</ul>"]


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
