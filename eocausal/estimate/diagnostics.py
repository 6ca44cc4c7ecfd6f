"""Diagnostics for effect estimates: propensity overlap, weight ESS, covariate balance, fit.

Everything returned here is JSON-serialisable (plain floats, ints, lists, strings; undefined
numbers become None), because it travels into Dagster metadata and the warehouse.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

# Fixed bins, so histograms from different specs and runs can be drawn on one axis.
HISTOGRAM_EDGES = np.round(np.linspace(0.0, 1.0, 21), 10)
QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)
# Per-column balance rows are reported for at most this many columns unless asked for more;
# the max |SMD| summaries always cover every column.
MAX_BALANCE_ROWS = 20


def jsonable(value):
    """Plain Python types; NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def propensity_overlap(e_raw: np.ndarray, d: np.ndarray, clip: float) -> dict:
    """Distribution of the (unclipped, cross-fitted) propensity by arm, the share that clipping
    to [clip, 1 - clip] changes, histogram counts on fixed bins, and the out-of-fold AUC."""
    outside = (e_raw < clip) | (e_raw > 1.0 - clip)
    by_arm, histogram, clipped_by_arm = {}, {"bin_edges": HISTOGRAM_EDGES.tolist()}, {}
    for arm, mask in (("treated", d == 1), ("control", d == 0)):
        values = e_raw[mask]
        summary = {"n": int(mask.sum()), "min": values.min(), "max": values.max(), "mean": values.mean()}
        for q, v in zip(QUANTILES, np.quantile(values, QUANTILES)):
            summary[f"q{round(q * 100):02d}"] = v
        by_arm[arm] = summary
        # Clip into [0, 1] first so a value of exactly 1.0 lands in the last bin.
        histogram[arm] = np.histogram(np.clip(values, 0.0, 1.0), bins=HISTOGRAM_EDGES)[0].tolist()
        clipped_by_arm[arm] = outside[mask].mean()
    return jsonable(
        {
            "auc": roc_auc_score(d, e_raw),
            "log_loss": _log_loss(e_raw, d),
            "share_clipped": outside.mean(),
            "share_clipped_by_arm": clipped_by_arm,
            "by_arm": by_arm,
            "histogram": histogram,
        }
    )


def _log_loss(e_raw: np.ndarray, d: np.ndarray) -> float:
    """Out-of-fold mean Bernoulli log-loss of the propensity (probabilities kept within 1e-6 of 0/1)."""
    e = np.clip(e_raw, 1e-6, 1.0 - 1e-6)
    return float(-np.mean(d * np.log(e) + (1 - d) * np.log1p(-e)))


def hajek_weights(e: np.ndarray, d: np.ndarray, estimand: str) -> np.ndarray:
    """Inverse-propensity weights (before normalisation within arm) for the estimand:
    ATE reweights both arms to the whole sample, ATT reweights controls to the treated."""
    if estimand == "ATT":
        return np.where(d == 1, 1.0, e / (1.0 - e))
    return np.where(d == 1, 1.0 / e, 1.0 / (1.0 - e))


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: n for equal weights, less otherwise."""
    weights = np.asarray(weights, dtype=float)
    return float(weights.sum() ** 2 / np.square(weights).sum())


def ess_by_arm(weights: np.ndarray, d: np.ndarray) -> dict:
    out = {}
    for arm, mask in (("treated", d == 1), ("control", d == 0)):
        ess = effective_sample_size(weights[mask])
        out[arm] = ess
        out[f"{arm}_share"] = ess / int(mask.sum())
    return jsonable(out)


def standardized_mean_differences(X: np.ndarray, d: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per column: (mean_treated - mean_control) / sqrt((var_treated + var_control) / 2).

    Means are weighted when ``weights`` is given; the denominator always uses the unweighted
    arm variances, so before and after are on the same scale. A column with no variation
    inside either arm uses the overall sd; a column constant everywhere has SMD 0.
    """
    X = np.asarray(X, dtype=float)
    treated, control = d == 1, d == 0
    w = np.ones(len(d)) if weights is None else np.asarray(weights, dtype=float)
    mean_t = w[treated] @ X[treated] / w[treated].sum()
    mean_c = w[control] @ X[control] / w[control].sum()
    scale = np.sqrt((X[treated].var(axis=0, ddof=1) + X[control].var(axis=0, ddof=1)) / 2.0)
    overall = X.std(axis=0, ddof=1)
    scale = np.where(scale > 0, scale, overall)
    diff = mean_t - mean_c
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = np.where(scale > 0, diff / scale, 0.0)
    return smd


def balance(
    X: np.ndarray,
    d: np.ndarray,
    weights: np.ndarray | None,
    names: list[str],
    columns: list[int] | None = None,
) -> dict:
    """Covariate balance before (and, with weights, after) weighting.

    Per-column rows for ``columns`` (default: the first MAX_BALANCE_ROWS); the max |SMD| over
    all columns, and the number of columns above 0.1 (a common balance threshold).
    """
    before = standardized_mean_differences(X, d)
    after = None if weights is None else standardized_mean_differences(X, d, weights)
    if columns is None:
        columns = list(range(min(X.shape[1], MAX_BALANCE_ROWS)))
    rows = []
    for j in columns:
        row = {"column": names[j], "smd_before": before[j]}
        if after is not None:
            row["smd_after"] = after[j]
        rows.append(row)
    out = {
        "n_columns": int(X.shape[1]),
        "columns": rows,
        "max_abs_smd_before": np.abs(before).max(),
        "n_abs_smd_before_over_0_1": int((np.abs(before) > 0.1).sum()),
    }
    if after is not None:
        out["max_abs_smd_after"] = np.abs(after).max()
        out["n_abs_smd_after_over_0_1"] = int((np.abs(after) > 0.1).sum())
    return jsonable(out)


def out_of_fold_r2(y: np.ndarray, y_hat: np.ndarray) -> float | None:
    """1 - SSE / SST against the sample mean; None when y does not vary."""
    sst = float(np.square(y - y.mean()).sum())
    if sst == 0.0:
        return None
    return 1.0 - float(np.square(y - y_hat).sum()) / sst


def overlap_ok(diagnostics: dict, min_ess_share: float = 0.1, max_clipped_share: float = 0.1) -> tuple[bool, str]:
    """Whether the estimate rests on adequate overlap, with a message saying why (not).

    Fails when more than ``max_clipped_share`` of the propensities fall outside
    [clip, 1 - clip], or when either arm's weights have an effective sample size below
    ``min_ess_share`` of that arm's units.
    """
    propensity = diagnostics.get("propensity")
    if not propensity:
        reason = diagnostics.get("nuisance") or "no propensity model was fitted"
        return True, f"overlap not assessed: {reason}"
    clip = diagnostics.get("clip")
    problems, facts = [], []
    share_clipped = propensity.get("share_clipped") or 0.0
    clip_range = f"[{clip}, {1 - clip}]" if clip is not None else "the clipping range"
    facts.append(f"{share_clipped:.1%} of propensities outside {clip_range}")
    if share_clipped > max_clipped_share:
        by_arm = propensity.get("share_clipped_by_arm", {})
        detail = ", ".join(f"{arm} {share:.1%}" for arm, share in by_arm.items() if share is not None)
        problems.append(
            f"{share_clipped:.1%} of propensities fall outside {clip_range} "
            f"(limit {max_clipped_share:.0%}; by arm: {detail})"
        )
    ess = diagnostics.get("ess") or {}
    for arm in ("treated", "control"):
        share = ess.get(f"{arm}_share")
        if share is None:
            continue
        facts.append(f"ESS {arm} {share:.0%} of units")
        if share < min_ess_share:
            n_arm = propensity.get("by_arm", {}).get(arm, {}).get("n")
            of_units = f" of its {n_arm} units" if n_arm is not None else " of its units"
            problems.append(
                f"effective sample size of the {arm} arm is {ess.get(arm, float('nan')):.1f}, "
                f"{share:.1%}{of_units} (limit {min_ess_share:.0%})"
            )
    if problems:
        return False, "poor overlap: " + "; ".join(problems)
    return True, "overlap ok: " + ", ".join(facts)


def balance_ok(diagnostics: dict, max_abs_smd: float = 0.1) -> tuple[bool, str]:
    """Whether weighting balanced every covariate to |SMD| <= max_abs_smd, with a message."""
    bal = diagnostics.get("balance")
    if not bal or bal.get("max_abs_smd_after") is None:
        return True, "balance after weighting not assessed (no weights for this estimator)"
    worst = bal["max_abs_smd_after"]
    if worst > max_abs_smd:
        offenders = [
            row["column"] for row in bal.get("columns", [])
            if row.get("smd_after") is not None and abs(row["smd_after"]) > max_abs_smd
        ]
        listed = f"; among reported columns: {', '.join(offenders[:10])}" if offenders else ""
        return False, f"imbalance after weighting: max |SMD| {worst:.3f} exceeds {max_abs_smd}{listed}"
    return True, f"balance ok: max |SMD| after weighting {worst:.3f} (before {bal['max_abs_smd_before']:.3f})"
