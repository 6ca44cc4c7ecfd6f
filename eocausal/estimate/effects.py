"""The effect-estimates stage: every estimator x feature set of a study, as one versioned table.

Feature sets (DESIGN §6): ``none``; ``tabular`` = the survey covariates X; ``image`` = the top
principal components of the image embedding φ(I) and, with ``analysis.context_components``, of
the context window around the chip (:mod:`eocausal.embed.context`); ``tabular+image`` = [X, φ(I)].
The PCAs are unsupervised (they never see treatment or outcome), so fitting them once on all
analysis units keeps cross-fitting valid.

With ``analysis.outcome_imputation`` each spec is estimated three times (``outcome_source``):
on the units with a measured outcome, and on all units with the imputed outcomes corrected
(prediction-powered, valid inference) and plugged in (naive, for comparison); see
:mod:`eocausal.estimate.imputation`. AIPW and DML ATE rows carry robustness values to an
unobserved confounder (:mod:`eocausal.estimate.sensitivity`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from eocausal import progress
from eocausal.embed.reduce import PCAReduction, image_reduction
from eocausal.estimate.ate import EffectResult, estimate_effect, estimate_effects, nuisance_spec
from eocausal.estimate.components import CANDIDATES, choose_components
from eocausal.estimate.diagnostics import overlap_ok
from eocausal.estimate.folds import spatial_blocks
from eocausal.estimate.fragility import chip_scale_check, context_check, specification_check
from eocausal.estimate.imputation import CORRECTED, MEASURED, PLUGIN, ImputedOutcomes, annotate, impute_outcomes
from eocausal.estimate.sensitivity import SENSITIVITY_ESTIMATORS, sensitivity_for_effects
from eocausal.estimate.sensitivity import summary as sensitivity_summary
from eocausal.lake import embedding_matrix
from eocausal.study import AnalysisSpec
from eocausal.versioning import estimate_version

# Bump when estimator code changes what it computes: it enters every estimate version.
# (effects-2: outcome imputation and the sensitivity columns; effects-3: on imputed outcomes
# the sensitivity's r_y is read against the measured outcomes.)
# 4: image components from the stored PCA; 5: undersmoothed nuisances, fragility checks; 6: the
# specification check also compares the products of the leading components; 7: that comparison keeps
# the headline's propensity and puts the products in its outcome models only; 8: the smaller
# arm's AIPW outcome model borrows the larger arm's (nuisance.OUTCOME_ARMS); 9: the image feature sets
# also see the context window's components (analysis.context_components), and the chip-scale check
# compares the headline with the chip alone
CODE_VERSION = "effects-9"

ESTIMATE_COLUMNS = [
    "study", "estimate_version", "estimand", "estimator", "feature_set", "estimate", "std_error",
    "ci_low", "ci_high", "n", "n_treated", "n_control", "n_features", "code_version", "survey_version",
    "embeddings_version", "analysis_spec", "diagnostics", "computed_at",
    # outcome imputation: which outcomes the row used, and how many of its units had one measured
    "outcome_source", "n_outcome_observed",
    # sensitivity to an unobserved confounder (AIPW/DML ATE rows; NULL elsewhere)
    "robustness_value", "robustness_value_alpha", "sensitivity",
    # fragility of the image adjustment (eocausal.estimate.fragility): the same on every row of a
    # version; NULL warnings = the check ran and stayed quiet (or could not run: see fragility)
    "specification_warning", "chip_scale_warning", "fragility",
]


@dataclass
class StudyEstimates:
    version: str
    table: pd.DataFrame  # ESTIMATE_COLUMNS, one row per estimand x estimator x feature set
    results: list[EffectResult]


def feature_sets(
    units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec, pca: PCAReduction | None = None,
    context: tuple[np.ndarray, list[str]] | None = None,
) -> dict:
    """Feature matrices (with names) for each feature set the study asks for.

    ``pca``: the embedding stage's stored PCA (used when it has ``analysis.image_components``
    components; see :func:`eocausal.embed.reduce.image_reduction`). ``context``: the context
    window's columns and names (:func:`context_columns`), which the image sets end with."""
    tabular = units[covariates].to_numpy(dtype=float) if covariates else np.zeros((len(units), 0))
    image_names: list[str] = []
    image = np.zeros((len(units), 0))
    if any("image" in fs for fs in analysis.feature_sets):
        image = image_components(units, covariates, analysis, pca)
        image_names = [f"image_pc{i + 1}" for i in range(image.shape[1])]
        if context is not None:
            image = np.hstack([image, context[0]])
            image_names += context[1]
    out = {}
    for fs in analysis.feature_sets:
        if fs == "none":
            out[fs] = (None, [])
        elif fs == "tabular":
            out[fs] = (tabular, list(covariates))
        elif fs == "image":
            out[fs] = (image, image_names)
        else:
            out[fs] = (np.hstack([tabular, image]), list(covariates) + image_names)
    return out


def context_columns(context: np.ndarray | None, analysis: AnalysisSpec) -> tuple[np.ndarray, list[str]] | None:
    """The columns the image feature sets take from the context windows' components (NaN rows where
    a unit's window is unusable): the leading ``analysis.context_components``, zero (their mean)
    where unusable, and then an indicator of that. None when the analysis takes no context, or
    fewer units than the folds need have one."""
    m = analysis.context_components
    if context is None or not m:
        return None
    ctx = np.asarray(context, dtype=float)[:, :m]
    ctx = ctx[:, np.isfinite(ctx).any(axis=0)]  # a PCA of fewer units than m leaves NaN columns
    usable = np.isfinite(ctx).all(axis=1)
    if not ctx.shape[1] or usable.sum() < max(10, 2 * analysis.folds):
        return None
    names = [f"context_pc{i + 1}" for i in range(ctx.shape[1])]
    ctx = np.where(usable[:, None], ctx, 0.0)
    if not usable.all():
        ctx = np.hstack([ctx, (~usable)[:, None].astype(float)])
        names.append("context_missing")
    return ctx, names


def stored_components(units: pd.DataFrame) -> np.ndarray | None:
    """The units' scores on the embedding stage's stored PCA (``image_components``, what
    marts.analysis_units holds), or None where the units carry the full ``embedding`` instead."""
    if "image_components" not in units.columns:
        return None
    return embedding_matrix(units["image_components"])


def image_components(units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec,
                     pca: PCAReduction | None = None, n_components: int | None = None) -> np.ndarray:
    """The units' image components: ``n_components``, else ``analysis.image_components`` (with
    ``"auto"``, the count :func:`eocausal.estimate.components.choose_components` picks among the
    stored ones).

    From the units' ``image_components`` (the stored PCA's scores, leading first) where they have
    them; else from their ``embedding`` through ``pca`` (or a PCA fitted here)."""
    k = n_components or analysis.image_components
    stored = stored_components(units)
    if stored is None:
        embedding = embedding_matrix(units["embedding"])
        if k != "auto":
            return image_reduction(embedding, int(k), analysis.seed, pca).transform(embedding)
        stored = image_reduction(embedding, max(CANDIDATES), analysis.seed, pca).transform(embedding)
    elif k != "auto" and int(k) > stored.shape[1]:
        raise ValueError(
            f"{int(k)} image components asked for, but the units carry {stored.shape[1]} "
            "(embedding.pca_components, capped by the number of embedded units): ask for fewer, or raise "
            "embedding.pca_components and embed again"
        )
    if k == "auto":
        tabular = units[covariates].to_numpy(dtype=float) if covariates else None
        outcome = units["outcome"].to_numpy(dtype=float)
        measured = np.isfinite(outcome)
        k = choose_components(outcome[measured], units["treatment"].to_numpy(dtype=int)[measured],
                              None if tabular is None else tabular[measured], stored[measured]).n_components
    return stored[:, : int(k)]


def imputation_features(
    units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec, pca: PCAReduction | None = None
) -> tuple[np.ndarray, list[str]]:
    """Z for the outcome-imputation model: the covariates and the image components, as the
    ``tabular+image`` feature set has them."""
    spec = analysis.model_copy(update={"feature_sets": ["tabular+image"]})
    return feature_sets(units, covariates, spec, pca)["tabular+image"]


def impute_study_outcomes(
    units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec, pca: PCAReduction | None = None
) -> ImputedOutcomes:
    """Cross-fitted image (+ tabular) predictions of the outcome and the corrected pseudo-outcomes,
    for every analysis unit (NaN outcome = not measured)."""
    Z, _ = imputation_features(units, covariates, analysis, pca)
    return impute_outcomes(
        units["outcome"].to_numpy(dtype=float), units["treatment"].to_numpy(dtype=int), Z,
        folds=analysis.folds, seed=analysis.seed, groups=_groups(units, analysis),
        labelling=analysis.outcome_labelling, clip=analysis.propensity_clip,
    )


def _groups(units: pd.DataFrame, analysis: AnalysisSpec):
    if not analysis.spatial_block_km:
        return None
    return spatial_blocks(units["lat"].to_numpy(), units["lon"].to_numpy(), analysis.spatial_block_km)


def analysis_version(
    analysis: AnalysisSpec, survey_version: str, embeddings_version: str
) -> str:
    return estimate_version(
        CODE_VERSION,
        {"survey": survey_version, "embeddings": embeddings_version},
        analysis.model_dump(mode="json"),
    )


def estimate_study(
    units: pd.DataFrame,
    covariates: list[str],
    analysis: AnalysisSpec,
    *,
    study_name: str,
    survey_version: str,
    embeddings_version: str,
    estimands: tuple[str, ...] = ("ATE",),
    imputed: ImputedOutcomes | None = None,
    pca: PCAReduction | None = None,
    context: np.ndarray | None = None,
) -> StudyEstimates:
    """Run every estimator x feature set on the analysis units (canonical columns + embedding).

    ``imputed``: the study's imputed outcomes, aligned with ``units`` (with outcome imputation
    on; computed here when not given). ``context``: image components of each unit's context
    window (:mod:`eocausal.embed.context`; NaN rows where unusable), which the image feature sets
    adjust for (``analysis.context_components``) and the chip-scale check compares.
    """
    version = analysis_version(analysis, survey_version, embeddings_version)
    y = units["outcome"].to_numpy(dtype=float)
    d_all = units["treatment"].to_numpy(dtype=int)
    groups_all = _groups(units, analysis)
    computed_at = datetime.now(timezone.utc).replace(microsecond=0)
    spec_json = json.dumps(analysis.model_dump(mode="json"), sort_keys=True)
    everyone = np.ones(len(units), dtype=bool)
    # outcome source -> (the units it covers, their outcomes)
    sources = {MEASURED: (everyone, y)}
    if analysis.outcome_imputation:
        if imputed is None:
            imputed = impute_study_outcomes(units, covariates, analysis, pca)
        sources = {
            MEASURED: (imputed.labelled, y),
            CORRECTED: (everyone, imputed.corrected),
            PLUGIN: (everyone, imputed.filled),
        }
    rows, results = [], []
    nuisance = analysis.nuisance_options()  # learners (None: the built-in ones) and outcome arms
    headline_fits: dict = {}  # feature set -> its AIPW ATE on the measured outcomes, for the fragility checks
    all_feature_sets = feature_sets(units, covariates, analysis, pca, context_columns(context, analysis))
    # one step per estimator x feature set x estimand x outcome source, and the fragility checks
    n_steps = len(sources) * len(all_feature_sets) * len(estimands) * len(analysis.estimators) + 1
    progress.report("estimation", 0, n_steps, "fits")
    for source, (keep, outcome) in sources.items():
        y_s, d = outcome[keep], d_all[keep]
        groups = None if groups_all is None else groups_all[keep]
        n_observed = int(np.isfinite(y[keep]).sum())
        for fs, (X_all, names) in all_feature_sets.items():
            X = None if X_all is None else X_all[keep]
            for estimand in estimands:
                fitted = {}
                for estimator in analysis.estimators:
                    res = estimate_effect(
                        y_s, d, X, estimator=estimator, estimand=estimand, folds=analysis.folds,
                        seed=analysis.seed, groups=groups, clip=analysis.propensity_clip,
                        feature_names=names or None, trim=analysis.propensity_trim,
                        repetitions=analysis.cross_fit_repetitions, **nuisance,
                    )
                    if imputed is not None:
                        annotate(res, source, imputed)
                    fitted[estimator] = res
                    if (source == MEASURED and estimand == "ATE" and estimator == "aipw"
                            and analysis.propensity_trim is None and analysis.cross_fit_repetitions == 1):
                        headline_fits[fs] = res
                    progress.report("estimation", len(results) + len(fitted), n_steps, "fits")
                # On the corrected pseudo-outcome, r_y is read against the measured outcomes.
                measured = (y[keep], 1.0 / imputed.labelling_propensity[keep]) if source == CORRECTED else None
                sensitivity = _sensitivity(y_s, d, X, groups, analysis, estimand, source, fitted, measured)
                for estimator, res in fitted.items():
                    results.append(res)
                    sens = sensitivity.get(estimator)
                    rows.append({
                        "study": study_name, "estimate_version": version, "estimand": estimand,
                        "estimator": estimator, "feature_set": fs, "estimate": res.estimate,
                        "std_error": res.std_error, "ci_low": res.ci_low, "ci_high": res.ci_high,
                        "n": res.n, "n_treated": int(d.sum()), "n_control": int((1 - d).sum()),
                        "n_features": 0 if X is None else int(X.shape[1]), "code_version": CODE_VERSION,
                        "survey_version": survey_version, "embeddings_version": embeddings_version,
                        "analysis_spec": spec_json,
                        "diagnostics": json.dumps(res.diagnostics, sort_keys=True, default=float),
                        "computed_at": computed_at,
                        "outcome_source": source, "n_outcome_observed": n_observed,
                        "robustness_value": None if sens is None else sens["robustness_value"],
                        "robustness_value_alpha": None if sens is None else sens["robustness_value_alpha"],
                        "sensitivity": None if sens is None else json.dumps(sens, sort_keys=True, default=float),
                    })
    fragility = fragility_checks(units, covariates, analysis, all_feature_sets, pca, context,
                                 imputed.labelled if imputed is not None else everyone, headline_fits)
    progress.report("estimation", n_steps, n_steps, "fits")
    for row in rows:
        row.update(fragility)
    table = pd.DataFrame(rows, columns=ESTIMATE_COLUMNS)
    for col in ("robustness_value", "robustness_value_alpha"):
        table[col] = table[col].astype("float64")
    # Text even when every row is NULL (no warning): Parquet would otherwise store a NULL-typed
    # column, and the warehouse table created from it could not take a warning later.
    for col in ("specification_warning", "chip_scale_warning", "sensitivity"):
        table[col] = table[col].astype("string")
    return StudyEstimates(version=version, table=table, results=results)


def fragility_checks(units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec, all_feature_sets: dict,
                     pca: PCAReduction | None, context: np.ndarray | None, keep: np.ndarray,
                     fitted: dict | None = None) -> dict:
    """The specification and chip-scale checks of the headline (tabular+image, else image, AIPW
    ATE on the units with a measured outcome), as the three fragility columns. ``fitted``: feature
    set -> that headline's AIPW result when the study already fitted it (single split, no trimming),
    so it is not fitted twice."""
    headline_set = next((fs for fs in ("tabular+image", "image") if fs in all_feature_sets), None)
    detail: dict = {"headline": None, "specification": None, "chip_scale": None}
    if headline_set is None:
        detail["note"] = "no image feature set requested: nothing to check"
        return {"specification_warning": None, "chip_scale_warning": None, "fragility": json.dumps(detail)}
    y = units["outcome"].to_numpy(dtype=float)[keep]
    d = units["treatment"].to_numpy(dtype=int)[keep]
    groups = _groups(units, analysis)
    groups = None if groups is None else groups[keep]
    X, _ = all_feature_sets[headline_set]
    X = X[keep]
    options = dict(folds=analysis.folds, seed=analysis.seed, groups=groups, clip=analysis.propensity_clip,
                   **analysis.nuisance_options())
    headline = (fitted or {}).get(headline_set)
    if headline is None or headline.influence is None:
        headline = estimate_effects(y, d, X, estimators=("aipw",), **options)["aipw"]
    tabular = (units[covariates].to_numpy(dtype=float)[keep] if covariates and headline_set == "tabular+image"
               else None)
    # The context window's columns, which the headline's features end with when it adjusts for them.
    adjusted = context_columns(context, analysis)
    ctx_cols = None if adjusted is None else adjusted[0][keep]
    n_ctx = 0 if ctx_cols is None else ctx_cols.shape[1]
    k = X.shape[1] - (0 if tabular is None else tabular.shape[1]) - n_ctx
    carried = stored_components(units)
    stored = carried.shape[1] if carried is not None else pca.n_components_ if pca is not None else 0
    wider = image_components(units, covariates, analysis, pca, n_components=max(min(2 * k, max(stored, k)), k))[keep]
    detail["headline"] = {"feature_set": headline_set, "estimator": "aipw", "estimand": "ATE",
                          "estimate": headline.estimate, "std_error": headline.std_error,
                          "context_columns": n_ctx}
    spec = specification_check(y, d, tabular, wider, k, headline=headline, context=ctx_cols, **options)
    detail["specification"] = spec.to_dict()
    chip_warning = None
    if ctx_cols is not None and not analysis.chip_scale_check:
        detail["chip_scale"] = {"skipped": "analysis.chip_scale_check off"}
    elif ctx_cols is not None:
        scale = context_check(y, d, X[:, : X.shape[1] - n_ctx], headline=headline, **options)
        detail["chip_scale"] = scale.to_dict() | {"n_units": int(len(y))}
        chip_warning = scale.warning
    elif context is None:
        detail["chip_scale"] = {"skipped": "no context components (analysis.chip_scale_check off, or not computed)"}
    else:
        ctx = np.asarray(context, dtype=float)[keep]
        usable = np.isfinite(ctx).all(axis=1)
        if usable.sum() < max(10, 2 * analysis.folds) or len(np.unique(d[usable])) < 2:
            detail["chip_scale"] = {"skipped": f"only {int(usable.sum())} units have a usable context window"}
        else:
            sub = dict(options, groups=None if groups is None else np.unique(groups[usable], return_inverse=True)[1])
            base = headline if usable.all() else estimate_effects(y[usable], d[usable], X[usable],
                                                                  estimators=("aipw",), **sub)["aipw"]
            scale = chip_scale_check(y[usable], d[usable], X[usable], ctx[usable], headline=base, **sub)
            detail["chip_scale"] = scale.to_dict() | {"n_units": int(usable.sum())}
            chip_warning = scale.warning
    return {"specification_warning": spec.warning, "chip_scale_warning": chip_warning,
            "fragility": json.dumps(detail, sort_keys=True, default=float)}


def _sensitivity(y, d, X, groups, analysis: AnalysisSpec, estimand: str, source: str, fitted: dict,
                 measured: tuple | None = None) -> dict:
    """Robustness values and bounds for the AIPW/DML ATE estimates of one spec (the plug-in's
    standard errors are wrong, so its rows get none)."""
    wanted = [e for e in fitted if e in SENSITIVITY_ESTIMATORS]
    if estimand != "ATE" or source == PLUGIN or not wanted:
        return {}
    repeated = analysis.cross_fit_repetitions > 1
    stats = sensitivity_for_effects(
        y, d, X, wanted, folds=analysis.folds, seed=analysis.seed, groups=groups,
        clip=analysis.propensity_clip, trim=analysis.propensity_trim,
        spec=nuisance_spec(analysis.seed, None, **analysis.nuisance_options()),
        # Under repeated cross-fitting the estimate is a median over splits; the bounds are the
        # first split's, which is said instead of flagged as a mismatch.
        reported_estimates=None if repeated else {e: fitted[e].estimate for e in wanted},
        measured_outcome=None if measured is None else measured[0],
        measured_weight=None if measured is None else measured[1],
    )
    if repeated:
        for s in stats.values():
            s.notes.append(f"bounds from the first of {analysis.cross_fit_repetitions} cross-fitting splits; "
                           "the reported estimate is the median over splits")
    return {e: sensitivity_summary(s) for e, s in stats.items()}


def fragility_summary(table: pd.DataFrame, column: str) -> tuple[str | None, str]:
    """(the warning of a fragility column, or None; a one-line account when quiet), from a table
    computed now or read back (tables from before the column existed: not checked)."""
    if column not in table or table.empty:
        return None, "not checked (estimates from before the fragility checks)"
    warnings = table[column].dropna()
    if len(warnings):
        return str(warnings.iloc[0]), ""
    detail = json.loads(table["fragility"].dropna().iloc[0]) if table["fragility"].notna().any() else {}
    part = detail.get("chip_scale" if column == "chip_scale_warning" else "specification") or {}
    if "skipped" in part:
        return None, f"not checked: {part['skipped']}"
    if not part:
        return None, detail.get("note", "not checked")
    return None, (f"quiet: largest |difference| / SE {part.get('max_abs_z', 0):.2f} "
                  f"(warns above {part.get('threshold')})")


def overlap_report(table: pd.DataFrame) -> dict[str, dict]:
    """Propensity overlap per feature set, from the stored diagnostics of the IPW/AIPW rows.

    Works on a freshly computed table and on one read back from the lake alike.
    """
    report: dict[str, dict] = {}
    rows = table[table["estimator"].isin(["aipw", "ipw"]) & (table["feature_set"] != "none")]
    for r in rows.sort_values("estimator").itertuples():
        if r.feature_set in report:
            continue
        ok, message = overlap_ok(json.loads(r.diagnostics))
        report[r.feature_set] = {"ok": bool(ok), "message": message}
    return report


def _row_target(truth: float | dict, estimand: str, estimator: str) -> float | None:
    if not isinstance(truth, dict):
        return float(truth)
    if estimator == "dml" and estimand == "ATE" and truth.get("dml") is not None:
        return float(truth["dml"])
    value = truth.get(estimand)
    return None if value is None else float(value)


def estimates_markdown(table: pd.DataFrame, truth: float | dict | None = None) -> str:
    """The estimates as a markdown table (Dagster metadata, CLI output).

    ``truth`` (simulated studies): one number for every row, or each row's own target: a mapping
    with ``ATE``, ``ATT`` and optionally ``dml`` (the partially linear model's variance-weighted
    effect, which is not the ATE when the effect varies with the propensity)."""
    head = "| estimand | estimator | feature set | estimate | SE | 95% CI |"
    sep = "|---|---|---|---:|---:|---|"
    # Optional columns: the outcome source (only when imputation made more than one), and the
    # robustness values (only when some row has them; tables from before they existed have none).
    sources = table["outcome_source"].fillna(MEASURED) if "outcome_source" in table else None
    show_source = sources is not None and (sources != MEASURED).any()
    show_rv = "robustness_value" in table and table["robustness_value"].notna().any()
    if show_source:
        head = head.replace("| estimate |", "| outcome | estimate |")
        sep = sep.replace("|---|---:|---:|---|", "|---|---|---:|---:|---|")
    if truth is not None:
        head += " bias | covers truth |"
        sep += "---:|---|"
    if show_rv:
        head += " RV | RV_alpha |"
        sep += "---:|---:|"
    lines = [head, sep]
    for i, r in enumerate(table.itertuples()):
        source = f" {sources.iloc[i]} |" if show_source else ""
        line = (f"| {r.estimand} | {r.estimator} | {r.feature_set} |{source} {r.estimate:.3f} | "
                f"{r.std_error:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] |")
        if truth is not None:
            target = _row_target(truth, r.estimand, r.estimator)
            line += (" – | – |" if target is None else
                     f" {r.estimate - target:+.3f} | {'yes' if r.ci_low <= target <= r.ci_high else 'no'} |")
        if show_rv:
            rv, rv_a = r.robustness_value, r.robustness_value_alpha
            line += " – | – |" if pd.isna(rv) else f" {rv:.3f} | {rv_a:.3f} |"
        lines.append(line)
    return "\n".join(lines)
