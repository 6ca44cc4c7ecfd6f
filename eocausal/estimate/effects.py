"""The effect-estimates stage: every estimator x feature set of a study, as one versioned table.

Feature sets (DESIGN §6): ``none``; ``tabular`` = the survey covariates X; ``image`` = the top
principal components of the image embedding φ(I); ``tabular+image`` = [X, φ(I)]. The PCA is
unsupervised (it never sees treatment or outcome), so fitting it once on all analysis units
keeps cross-fitting valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from eocausal.embed.reduce import fit_pca
from eocausal.estimate.ate import EffectResult, estimate_effect
from eocausal.estimate.diagnostics import overlap_ok
from eocausal.estimate.folds import spatial_blocks
from eocausal.lake import embedding_matrix
from eocausal.study import AnalysisSpec
from eocausal.versioning import estimate_version

# Bump when estimator code changes what it computes: it enters every estimate version.
CODE_VERSION = "effects-1"

ESTIMATE_COLUMNS = [
    "study", "estimate_version", "estimand", "estimator", "feature_set", "estimate", "std_error",
    "ci_low", "ci_high", "n", "n_treated", "n_control", "n_features", "code_version", "survey_version",
    "embeddings_version", "analysis_spec", "diagnostics", "computed_at",
]


@dataclass
class StudyEstimates:
    version: str
    table: pd.DataFrame  # ESTIMATE_COLUMNS, one row per estimand x estimator x feature set
    results: list[EffectResult]


def feature_sets(units: pd.DataFrame, covariates: list[str], analysis: AnalysisSpec) -> dict:
    """Feature matrices (with names) for each feature set the study asks for."""
    tabular = units[covariates].to_numpy(dtype=float) if covariates else np.zeros((len(units), 0))
    image_names: list[str] = []
    image = np.zeros((len(units), 0))
    if any("image" in fs for fs in analysis.feature_sets):
        embedding = embedding_matrix(units["embedding"])
        pca = fit_pca(embedding, analysis.image_components, seed=analysis.seed)
        image = pca.transform(embedding)
        image_names = [f"image_pc{i + 1}" for i in range(image.shape[1])]
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
) -> StudyEstimates:
    """Run every estimator x feature set on the analysis units (canonical columns + embedding)."""
    version = analysis_version(analysis, survey_version, embeddings_version)
    y = units["outcome"].to_numpy(dtype=float)
    d = units["treatment"].to_numpy(dtype=int)
    groups = None
    if analysis.spatial_block_km:
        groups = spatial_blocks(units["lat"].to_numpy(), units["lon"].to_numpy(), analysis.spatial_block_km)
    computed_at = datetime.now(timezone.utc).replace(microsecond=0)
    spec_json = json.dumps(analysis.model_dump(mode="json"), sort_keys=True)
    rows, results = [], []
    for fs, (X, names) in feature_sets(units, covariates, analysis).items():
        for estimand in estimands:
            for estimator in analysis.estimators:
                res = estimate_effect(
                    y, d, X, estimator=estimator, estimand=estimand, folds=analysis.folds,
                    seed=analysis.seed, groups=groups, clip=analysis.propensity_clip,
                    feature_names=names or None,
                )
                results.append(res)
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
                })
    table = pd.DataFrame(rows, columns=ESTIMATE_COLUMNS)
    return StudyEstimates(version=version, table=table, results=results)


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


def estimates_markdown(table: pd.DataFrame, truth: float | None = None) -> str:
    """The estimates as a markdown table (Dagster metadata, CLI output)."""
    head = "| estimand | estimator | feature set | estimate | SE | 95% CI |"
    sep = "|---|---|---|---:|---:|---|"
    if truth is not None:
        head += " bias | covers truth |"
        sep += "---:|---|"
    lines = [head, sep]
    for r in table.itertuples():
        line = (f"| {r.estimand} | {r.estimator} | {r.feature_set} | {r.estimate:.3f} | "
                f"{r.std_error:.3f} | [{r.ci_low:.3f}, {r.ci_high:.3f}] |")
        if truth is not None:
            line += f" {r.estimate - truth:+.3f} | {'yes' if r.ci_low <= truth <= r.ci_high else 'no'} |"
        lines.append(line)
    return "\n".join(lines)
