"""Average treatment effects with cross-fitted nuisance models (DESIGN §6).

One entry point, :func:`estimate_effect`, for four estimators:

- ``difference_in_means``: ignores X; influence-function (Neyman) standard error.
- ``ipw``: Hajek (normalised) inverse-propensity weighting with cross-fitted propensities.
- ``aipw``: doubly robust, psi = mu1 - mu0 + D(Y - mu1)/e - (1 - D)(Y - mu0)/(1 - e).
- ``dml``: partially linear model, theta = sum r_D r_Y / sum r_D^2 on cross-fitted residuals.

Every estimate is the mean of a score, and its standard error comes from the score's influence
function: sd / sqrt(n), or with ``groups`` the cluster-robust version (influence summed within
clusters), and then a t critical value with G - 1 degrees of freedom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from eocausal.estimate import diagnostics as diag
from eocausal.estimate.folds import make_folds
from eocausal.estimate.nuisance import LEARNERS, NuisanceSpec, cross_fit_outcome, cross_fit_propensity

ESTIMATORS = ("difference_in_means", "ipw", "aipw", "dml")
ESTIMANDS = ("ATE", "ATT")
OPTIONS = ("learner", "pca_components", "pca_columns")
# Leading principal components of the reduced (image) block that get a balance row too.
BALANCE_COMPONENTS = 5


@dataclass
class EffectResult:
    estimand: str  # "ATE" | "ATT"
    estimator: str  # "difference_in_means" | "ipw" | "aipw" | "dml"
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    n: int
    diagnostics: dict = field(default_factory=dict)  # JSON-serialisable

    def to_dict(self) -> dict:
        return diag.jsonable(asdict(self))


def estimate_effect(
    y,
    d,
    X=None,
    estimator: str = "aipw",
    estimand: str = "ATE",
    folds: int = 5,
    seed: int = 0,
    groups=None,
    clip: float = 0.01,
    alpha: float = 0.05,
    feature_names=None,
    balance_columns=None,
    **opts,
) -> EffectResult:
    """Estimate the ATE or ATT of binary ``d`` on ``y``, adjusting for features ``X``.

    - ``X``: None, a DataFrame or an (n, p) array (p may be in the thousands). With X None the
      nuisances are constants (treated share, arm means) and every estimator is the difference
      in means.
    - ``folds``/``seed``: K-fold cross-fitting, folds stratified by treatment.
    - ``groups``: cluster labels (e.g. villages, or :func:`spatial_blocks` ids): folds never
      split a cluster, and the standard error is cluster-robust.
    - ``clip``: propensities are clipped to [clip, 1 - clip]; the share clipped is reported.
    - ``balance_columns``: names (or indexes) of the columns to report balance rows for.
    - ``opts``: ``learner`` ("linear" | "boosting"), ``pca_components`` and ``pca_columns``
      (reduce those columns, e.g. an image embedding, to principal components inside each fold).
    """
    # One BLAS/OpenMP thread: the nuisance matrices are small enough that threads mostly contend
    # (parallelism belongs to partitions and specs), and a fixed thread count keeps floating-point
    # reductions, hence estimates, bit-identical on machines with different numbers of cores.
    with threadpool_limits(limits=1):
        return _estimate_effect(
            y, d, X, estimator, estimand, folds, seed, groups, clip, alpha, feature_names, balance_columns, opts
        )


def _estimate_effect(
    y, d, X, estimator, estimand, folds, seed, groups, clip, alpha, feature_names, balance_columns, opts
) -> EffectResult:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options are {list(OPTIONS)}")
    _check_choices(estimator, estimand, folds, clip, alpha)
    y, d = _validate_outcome_treatment(y, d)
    n = len(y)
    X, names = _validate_features(X, n, feature_names)
    groups = _validate_groups(groups, n)
    pca_columns = opts.get("pca_columns")
    spec = NuisanceSpec(
        learner=opts.get("learner", "linear"),
        seed=seed,
        pca_components=opts.get("pca_components"),
        pca_columns=None if pca_columns is None else tuple(_column_indexes(pca_columns, names, "pca_columns")),
    )
    report_columns = (
        None if balance_columns is None else _column_indexes(balance_columns, names, "balance_columns")
    )

    n_treated = int(d.sum())
    info = {
        "n_treated": n_treated,
        "n_control": n - n_treated,
        "clip": float(clip),
        "alpha": float(alpha),
        "n_features": 0 if X is None else int(X.shape[1]),
    }
    if X is None:
        nuisance = _constant_nuisance(y, d)
        info.update(
            cross_fitted=False,
            folds=None,
            nuisance="constant (no features): every estimator equals the difference in means",
        )
    else:
        nuisance, fit_info = _cross_fitted_nuisance(
            y, d, X, estimator, estimand, folds, seed, groups, clip, spec
        )
        info.update(fit_info)

    estimate, influence = _SCORES[estimator](y, d, nuisance, estimand)
    std_error, n_clusters = _standard_error(influence, groups)
    if n_clusters is None:
        critical = stats.norm.ppf(1 - alpha / 2)
    else:
        critical = stats.t.ppf(1 - alpha / 2, df=n_clusters - 1)
        info["n_clusters"] = n_clusters
    info["critical_value"] = float(critical)

    if X is not None:
        info.update(_weighting_diagnostics(X, d, nuisance, estimand, names, report_columns, spec))

    return EffectResult(
        estimand=estimand,
        estimator=estimator,
        estimate=float(estimate),
        std_error=float(std_error),
        ci_low=float(estimate - critical * std_error),
        ci_high=float(estimate + critical * std_error),
        n=n,
        diagnostics=diag.jsonable(info),
    )


# --- input validation -----------------------------------------------------------------------


def _check_choices(estimator, estimand, folds, clip, alpha) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimand not in ESTIMANDS:
        raise ValueError(f"estimand must be one of {ESTIMANDS}, got {estimand!r}")
    if estimator == "dml" and estimand == "ATT":
        raise ValueError(
            "estimator 'dml' with estimand 'ATT' is not implemented: the partially linear model "
            "targets a variance-weighted average effect; use estimator 'aipw' or 'ipw' for the ATT"
        )
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if not (0.0 < clip < 0.5):
        raise ValueError(f"clip must lie in (0, 0.5), got {clip!r}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def _one_dimensional(values, name: str) -> np.ndarray:
    if isinstance(values, (pd.Series, pd.Index)) and pd.api.types.is_numeric_dtype(values.dtype):
        # Nullable pandas dtypes hold pd.NA, which numpy cannot turn into a float.
        values = values.to_numpy(dtype=float, na_value=np.nan)
    values = np.asarray(values)
    if values.ndim == 2 and 1 in values.shape:
        values = values.ravel()
    if values.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    return values


def _validate_outcome_treatment(y, d) -> tuple[np.ndarray, np.ndarray]:
    y = _one_dimensional(y, "y (outcome)")
    d = _one_dimensional(d, "d (treatment)")
    if len(y) != len(d):
        raise ValueError(f"lengths must match: y (outcome) has {len(y)} values, d (treatment) has {len(d)}")
    try:
        y = y.astype(float)
    except (TypeError, ValueError):
        raise ValueError("y (outcome) must be numeric") from None
    bad = ~np.isfinite(y)
    if bad.any():
        raise ValueError(
            f"y (outcome) must be finite: {int(bad.sum())} missing or infinite value(s), "
            f"first at position(s) {np.flatnonzero(bad)[:5].tolist()}"
        )
    try:
        d_float = d.astype(float)
    except (TypeError, ValueError):
        raise ValueError(
            f"d (treatment) must be binary 0/1, got non-numeric values such as {d[:3].tolist()}"
        ) from None
    not_binary = ~np.isin(d_float, (0.0, 1.0))  # NaN is neither
    if not_binary.any():
        found = np.unique(d_float[not_binary])[:5].tolist()
        raise ValueError(
            f"d (treatment) must be binary 0/1; found {int(not_binary.sum())} other value(s), e.g. {found}"
        )
    d = d_float.astype(np.int64)
    n_treated, n_control = int(d.sum()), int(len(d) - d.sum())
    if n_treated < 2 or n_control < 2:
        raise ValueError(
            f"both treatment arms need at least 2 units; got {n_treated} treated and {n_control} control"
        )
    return y, d


def _validate_features(X, n: int, feature_names) -> tuple[np.ndarray | None, list[str]]:
    if X is None:
        return None, []
    if isinstance(X, pd.DataFrame):
        non_numeric = [
            str(c) for c in X.columns
            if not (pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c]))
        ]
        if non_numeric:
            raise ValueError(f"X must be numeric; non-numeric column(s): {non_numeric[:10]}")
        names = [str(c) for c in X.columns] if feature_names is None else [str(c) for c in feature_names]
        X = X.to_numpy(dtype=float, na_value=np.nan)
    else:
        try:
            X = np.asarray(X, dtype=float)
        except (TypeError, ValueError):
            raise ValueError("X must be numeric") from None
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2:
            raise ValueError(f"X must be two-dimensional (n, p), got shape {X.shape}")
        if feature_names is None:
            names = [f"x{j}" for j in range(X.shape[1])]
        else:
            names = [str(c) for c in feature_names]
    if X.shape[0] != n:
        raise ValueError(f"lengths must match: X has {X.shape[0]} rows, y (outcome) has {n} values")
    if len(names) != X.shape[1]:
        raise ValueError(f"feature_names has {len(names)} names for {X.shape[1]} columns of X")
    if X.shape[1] == 0:
        return None, []
    finite = np.isfinite(X)
    if not finite.all():
        bad_columns = np.flatnonzero(~finite.all(axis=0))
        raise ValueError(
            f"X must be finite: {int((~finite.all(axis=1)).sum())} row(s) hold missing or infinite values, "
            f"in column(s) {[names[j] for j in bad_columns[:10]]}"
        )
    return X, names


def _validate_groups(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    groups = _one_dimensional(groups, "groups")
    if len(groups) != n:
        raise ValueError(f"lengths must match: groups has {len(groups)} values, y (outcome) has {n}")
    if pd.isna(groups).any():
        raise ValueError("groups must not contain missing values")
    _, codes = np.unique(groups.astype(str) if groups.dtype == object else groups, return_inverse=True)
    if codes.max() + 1 < 2:
        raise ValueError("groups must hold at least 2 distinct clusters for a cluster-robust standard error")
    return codes.ravel()


def _column_indexes(columns, names: list[str], what: str) -> list[int]:
    if not names:
        raise ValueError(f"{what} given but X has no columns")
    lookup = {name: j for j, name in enumerate(names)}
    out = []
    for c in columns:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= c < len(names):
                raise ValueError(f"{what}: column index {c} out of range for {len(names)} columns")
            out.append(int(c))
        elif str(c) in lookup:
            out.append(lookup[str(c)])
        else:
            raise ValueError(f"{what}: no column named {c!r} in X")
    return out


# --- nuisance --------------------------------------------------------------------------------


def _constant_nuisance(y: np.ndarray, d: np.ndarray) -> dict:
    # With no features there is nothing to overfit, so full-sample constants are used and the
    # estimators reduce exactly to the difference in means.
    n = len(y)
    share = d.mean()
    return {
        "e": np.full(n, share),
        "mu1": np.full(n, y[d == 1].mean()),
        "mu0": np.full(n, y[d == 0].mean()),
        "l": np.full(n, y.mean()),
    }


def _cross_fitted_nuisance(y, d, X, estimator, estimand, folds, seed, groups, clip, spec) -> tuple[dict, dict]:
    fold_ids = make_folds(len(y), folds, seed, stratify=d, groups=groups)
    for k in range(folds):
        train = fold_ids != k
        if d[train].min() == d[train].max():
            raise ValueError(
                f"cross-fitting fold {k}: its training set holds only "
                f"{'treated' if d[train][0] == 1 else 'control'} units; use fewer folds or more "
                "clusters with both treated and control units"
            )
    info = {
        "cross_fitted": True,
        "folds": int(folds),
        "fold_sizes": np.bincount(fold_ids, minlength=folds).tolist(),
        "fold_scheme": (
            "group-wise, balanced by treatment" if groups is not None else "stratified by treatment"
        ),
        "learner": spec.learner,
    }
    if spec.pca_components is not None:
        info["pca_components"] = int(spec.pca_components)
    nuisance: dict = {}
    if estimator == "difference_in_means":
        return nuisance, info

    e_raw, log = cross_fit_propensity(X, d, fold_ids, spec)
    nuisance["e_raw"] = e_raw
    nuisance["e"] = np.clip(e_raw, clip, 1.0 - clip)
    info["propensity"] = diag.propensity_overlap(e_raw, d, clip)
    info["propensity_model"] = {
        "penalty_by_fold": log.penalties,
        "convergence_warnings": log.convergence_warnings,
    }

    if estimator == "aipw":
        r2 = {}
        mu0, log0 = cross_fit_outcome(X, y, fold_ids, spec, fit_on=d == 0)
        nuisance["mu0"] = mu0
        r2["control"] = diag.out_of_fold_r2(y[d == 0], mu0[d == 0])
        penalties = {"control": log0.penalties}
        if estimand == "ATE":  # the ATT score needs no treated-arm outcome model
            mu1, log1 = cross_fit_outcome(X, y, fold_ids, spec, fit_on=d == 1)
            nuisance["mu1"] = mu1
            r2["treated"] = diag.out_of_fold_r2(y[d == 1], mu1[d == 1])
            penalties["treated"] = log1.penalties
        info["outcome_r2"] = r2
        info["outcome_model"] = {"penalty_by_fold": penalties}
    elif estimator == "dml":
        l_hat, log_l = cross_fit_outcome(X, y, fold_ids, spec)
        nuisance["l"] = l_hat
        info["outcome_r2"] = {"all": diag.out_of_fold_r2(y, l_hat)}
        info["outcome_model"] = {"penalty_by_fold": {"all": log_l.penalties}}
    return nuisance, info


# --- scores: each returns (estimate, influence function values) --------------------------------


def _difference_in_means(y, d, nuisance, estimand):
    # Under the design that justifies it (randomisation) ATT = ATE: one estimator for both.
    share = d.mean()
    mean1, mean0 = y[d == 1].mean(), y[d == 0].mean()
    influence = d * (y - mean1) / share - (1 - d) * (y - mean0) / (1 - share)
    return mean1 - mean0, influence


def _ipw(y, d, nuisance, estimand):
    e = nuisance["e"]
    w = diag.hajek_weights(e, d, estimand)
    w1, w0 = w * d, w * (1 - d)
    mean1 = (w1 * y).sum() / w1.sum()
    mean0 = (w0 * y).sum() / w0.sum()
    # Influence of each Hajek ratio, treating the cross-fitted propensities as given (for the
    # ATE this is conservative: estimating e only lowers the variance).
    influence = w1 * (y - mean1) / w1.mean() - w0 * (y - mean0) / w0.mean()
    return mean1 - mean0, influence


def _aipw(y, d, nuisance, estimand):
    e, mu0 = nuisance["e"], nuisance["mu0"]
    if estimand == "ATE":
        mu1 = nuisance["mu1"]
        psi = mu1 - mu0 + d * (y - mu1) / e - (1 - d) * (y - mu0) / (1 - e)
        estimate = psi.mean()
        return estimate, psi - estimate
    # ATT: the Neyman-orthogonal score of Chernozhukov et al. (2018, §5.1),
    # psi = [D(Y - mu0) - e(1 - D)(Y - mu0)/(1 - e) - D theta] / P(D = 1).
    share = d.mean()
    residual = y - mu0
    numerator = d * residual - e * (1 - d) * residual / (1 - e)
    estimate = numerator.mean() / share
    return estimate, (numerator - d * estimate) / share


def _dml(y, d, nuisance, estimand):
    r_y = y - nuisance["l"]
    r_d = d - nuisance["e"]  # clipped like everywhere else; it only matters for near-0/1 scores
    theta = (r_d * r_y).sum() / (r_d * r_d).sum()
    # Sandwich from the partialling-out score psi = (r_Y - theta r_D) r_D, Jacobian -mean r_D^2.
    influence = r_d * (r_y - theta * r_d) / np.mean(r_d * r_d)
    return theta, influence


_SCORES = {
    "difference_in_means": _difference_in_means,
    "ipw": _ipw,
    "aipw": _aipw,
    "dml": _dml,
}


def _standard_error(influence: np.ndarray, groups: np.ndarray | None) -> tuple[float, int | None]:
    """sd(influence)/sqrt(n); with clusters, sqrt(G/(G-1) * sum_g (sum_{i in g} phi_i)^2) / n."""
    n = len(influence)
    centred = influence - influence.mean()  # exact zero-mean for every score up to rounding
    if groups is None:
        return float(np.sqrt(np.square(centred).sum() / (n * (n - 1)))), None
    n_clusters = int(groups.max()) + 1
    cluster_sums = np.bincount(groups, weights=centred, minlength=n_clusters)
    variance = n_clusters / (n_clusters - 1) * np.square(cluster_sums).sum() / n**2
    return float(np.sqrt(variance)), n_clusters


# --- weighting diagnostics ---------------------------------------------------------------------


def _weighting_diagnostics(X, d, nuisance, estimand, names, report_columns, spec: NuisanceSpec) -> dict:
    """Balance before (and, where a propensity was fitted, after) inverse-propensity weighting,
    and the effective sample size of those weights per arm."""
    out = {}
    weights = None
    if "e" in nuisance:
        weights = diag.hajek_weights(nuisance["e"], d, estimand)
        out["ess"] = diag.ess_by_arm(weights, d)
    out["balance"] = diag.balance(X, d, weights, names, report_columns)
    if spec.pca_columns is not None or spec.pca_components is not None:
        # The embedding's own columns mean little one by one: also show its leading components.
        block = X[:, list(spec.pca_columns)] if spec.pca_columns is not None else X
        k = min(BALANCE_COMPONENTS, spec.pca_components or BALANCE_COMPONENTS, *block.shape)
        standardised = StandardScaler().fit_transform(block)
        scores = PCA(n_components=k, svd_solver="randomized", random_state=spec.seed).fit_transform(standardised)
        out["balance_components"] = diag.balance(scores, d, weights, [f"pc{j + 1}" for j in range(k)])
    return out
