"""Average treatment effects with cross-fitted nuisance models (DESIGN §6).

Entry points: :func:`estimate_effect` (one estimator) and :func:`estimate_effects` (several
estimators on the same cross-fitted nuisance fits: identical results, each nuisance fitted
once), for

- ``difference_in_means``: ignores X; influence-function (Neyman) standard error.
- ``ipw``: Hajek (normalised) inverse-propensity weighting with cross-fitted propensities.
- ``aipw``: doubly robust, psi = mu1 - mu0 + D(Y - mu1)/e - (1 - D)(Y - mu0)/(1 - e); the ATT
  has its own Neyman-orthogonal score, which needs no treated-arm outcome model.
- ``dml``: partially linear model, theta = sum r_D r_Y / sum r_D^2 on cross-fitted residuals.

Every estimate is the mean of a score, and its standard error comes from the score's influence
function: sd / sqrt(n), or with ``groups`` the cluster-robust version (influence summed within
clusters), and then a t critical value with G - 1 degrees of freedom.

Options: propensity clipping (``clip``, always on) and trimming (``trim``: units whose
cross-fitted propensity lies outside [trim, 1 - trim] are dropped, which changes the estimand to
the effect on the units kept; the share is reported); repeated cross-fitting (``repetitions``:
the median over independent fold splits, with the SE rule of Chernozhukov et al. 2018, §3.4);
nuisance predictions supplied by the caller (``predictions``) instead of fitted ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from eocausal.estimate import diagnostics as diag
from eocausal.estimate.calibration import WEIGHTS_INFLUENCE, calibrated_weights_influence, weights_influence_total
from eocausal.estimate.folds import make_folds
from eocausal.estimate.nuisance import (
    UNDERSMOOTH,
    NuisanceSpec,
    cross_fit_calibrated_propensity,
    cross_fit_outcome,
    cross_fit_outcome_arms,
    cross_fit_propensity,
    gram_blocks,
    learner_names,
    overlap_refit_needed,
)

DEFAULT_CLIP = 0.01  # propensities are clipped to [clip, 1 - clip]
ESTIMATORS = ("difference_in_means", "ipw", "aipw", "dml")
ESTIMANDS = ("ATE", "ATT")
OPTIONS = ("learner", "learners", "pca_components", "pca_columns", "solver", "predictions", "undersmooth",
           "outcome_arms", "propensity_fit")
# Keys of the ``learners`` option: the caller's own estimator for each nuisance.
LEARNER_ROLES = ("propensity", "outcome")
# Keys of the ``predictions`` option, and the nuisance function each one stands for.
PREDICTION_KEYS = {"propensity": "e_raw", "outcome_control": "mu0", "outcome_treated": "mu1", "outcome": "l"}
# Leading principal components of the reduced (image) block that get a balance row too.
BALANCE_COMPONENTS = 5
REPEATED_CROSS_FITTING_RULE = (
    "estimate = median over splits; SE = sqrt(median(SE_s^2 + (estimate_s - estimate)^2)) "
    "(Chernozhukov et al. 2018, sec. 3.4)"
)


@dataclass
class EffectResult:
    estimand: str  # "ATE" | "ATT"
    estimator: str  # "difference_in_means" | "ipw" | "aipw" | "dml"
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    n: int  # units the estimate averages over (after trimming, if any)
    diagnostics: dict = field(default_factory=dict)  # JSON-serialisable
    # The score's influence values (centred) over the units averaged, and which of the input units
    # those are (None: all): what comparisons of two specifications on the same units need
    # (eocausal.estimate.fragility). Not serialised.
    influence: np.ndarray | None = field(default=None, repr=False, compare=False)
    kept: np.ndarray | None = field(default=None, repr=False, compare=False)
    # The cross-fitted propensity (unclipped) of every input unit, where the estimator fitted or
    # was given one (split 0's with repetitions): for comparisons that keep the headline's
    # propensity and change only its outcome models. Not serialised.
    propensity: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("influence", "kept", "propensity")}
        return diag.jsonable(out)


def with_influence(result: EffectResult, influence: np.ndarray, groups=None) -> EffectResult:
    """The result with other influence values (e.g. with a nuisance's estimation term added): its
    standard error and CI recomputed from them, at the result's critical value."""
    groups = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    std_error, _ = _standard_error(np.asarray(influence, dtype=float), groups)
    critical = result.diagnostics.get("critical_value", stats.norm.ppf(0.975))
    return replace(result, std_error=std_error, ci_low=result.estimate - critical * std_error,
                   ci_high=result.estimate + critical * std_error, influence=np.asarray(influence, dtype=float))


def estimate_effect(
    y,
    d,
    X=None,
    estimator: str = "aipw",
    estimand: str = "ATE",
    folds: int = 5,
    seed: int = 0,
    groups=None,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
    feature_names=None,
    balance_columns=None,
    trim: float | None = None,
    repetitions: int = 1,
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
    - ``trim``: drop units whose cross-fitted propensity lies outside [trim, 1 - trim] (Crump et
      al. 2009) before averaging the score. The estimand becomes the effect on the units kept,
      ``n`` counts them, and ``diagnostics["trimming"]`` reports the share trimmed, by arm.
      Not applied by ``difference_in_means``, which fits no propensity.
    - ``repetitions``: cross-fit on this many independent fold splits and report the median
      (split 0 is the single-split estimate; the diagnostics returned are split 0's, plus the
      per-split estimates under ``diagnostics["repeated_cross_fitting"]``).
    - ``balance_columns``: names (or indexes) of the columns to report balance rows for.
    - ``opts``: ``learner`` ("linear" | "boosting"); ``learners``: your own scikit-learn-compatible
      estimators, ``{"propensity": classifier, "outcome": regressor}`` (either may be left out;
      each is cloned for every fold and arm, behind the per-fold PCA when one is asked for; the
      diagnostics' ``learners`` say which ran); ``pca_components`` and ``pca_columns``
      (reduce those columns, e.g. an image embedding, to principal components inside each fold);
      ``solver`` ("fast" | "sklearn": how the linear learner is fitted; same statistics);
      ``predictions``: a dict of out-of-fold nuisance predictions to use instead of fitting any
      (``propensity``, ``outcome_control``, ``outcome_treated``, ``outcome``, as the estimator
      needs); X, if given, then only serves the balance diagnostics.
    """
    results = estimate_effects(
        y, d, X, estimators=(estimator,), estimand=estimand, folds=folds, seed=seed, groups=groups,
        clip=clip, alpha=alpha, feature_names=feature_names, balance_columns=balance_columns,
        trim=trim, repetitions=repetitions, **opts,
    )
    return results[estimator]


def estimate_effects(
    y,
    d,
    X=None,
    estimators=ESTIMATORS,
    estimand: str = "ATE",
    folds: int = 5,
    seed: int = 0,
    groups=None,
    clip: float = DEFAULT_CLIP,
    alpha: float = 0.05,
    feature_names=None,
    balance_columns=None,
    trim: float | None = None,
    repetitions: int = 1,
    **opts,
) -> dict[str, EffectResult]:
    """:func:`estimate_effect` for several estimators at once, as a dict keyed by estimator.

    The folds and nuisance models are exactly those each single call would fit, so every
    result equals its single call; the propensity, which ipw, aipw and dml share, is fitted once.
    """
    # One BLAS/OpenMP thread: the nuisance matrices are small enough that threads mostly contend
    # (parallelism belongs to partitions and specs), and a fixed thread count keeps floating-point
    # reductions, hence estimates, bit-identical on machines with different numbers of cores.
    with threadpool_limits(limits=1):
        return _estimate_effects(
            y, d, X, tuple(estimators), estimand, folds, seed, groups, clip, alpha, feature_names,
            balance_columns, trim, repetitions, opts,
        )


def _estimate_effects(
    y, d, X, estimators, estimand, folds, seed, groups, clip, alpha, feature_names, balance_columns,
    trim, repetitions, opts,
) -> dict[str, EffectResult]:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options are {list(OPTIONS)}")
    if not estimators or isinstance(estimators, str):
        raise ValueError(f"estimators must be a non-empty list of names from {ESTIMATORS}")
    if len(set(estimators)) != len(estimators):
        raise ValueError(f"estimators repeated: {list(estimators)}")
    for estimator in estimators:
        _check_choices(estimator, estimand, folds, clip, alpha)
    _check_trim_and_repetitions(trim, repetitions)
    y, d = _validate_outcome_treatment(y, d)
    n = len(y)
    X, names = _validate_features(X, n, feature_names)
    groups = _validate_groups(groups, n)
    spec = nuisance_spec(seed, names, **opts)
    report_columns = (
        None if balance_columns is None else _column_indexes(balance_columns, names, "balance_columns")
    )
    needs = set().union(*(_needs(e, estimand) for e in estimators))
    if not {"ipw", "aipw"} & set(estimators):  # only IPW and AIPW weight by the calibrated fit
        spec = replace(spec, propensity_fit="likelihood")

    n_treated = int(d.sum())
    base = {
        "n_treated": n_treated,
        "n_control": n - n_treated,
        "clip": float(clip),
        "alpha": float(alpha),
        "n_features": 0 if X is None else int(X.shape[1]),
    }
    supplied = opts.get("predictions")
    if supplied is not None:
        if repetitions != 1:
            raise ValueError(
                "repetitions > 1 re-splits the cross-fitting; with supplied predictions there is "
                "nothing to re-split: use repetitions=1"
            )
        splits = [_supplied_nuisance(supplied, y, d, needs, clip)]
    elif X is None:
        # Constant nuisances are the same on every split: one split is all there is.
        splits = [(_constant_nuisance(y, d), {"base": {
            "cross_fitted": False,
            "folds": None,
            "nuisance": "constant (no features): every estimator equals the difference in means",
        }})]
    else:
        splits = [
            _cross_fitted_nuisance(y, d, X, needs, folds, _split_seed(seed, s), groups, clip, spec)
            for s in range(repetitions)
        ]

    results = {}
    for estimator in estimators:
        per_split = [
            _estimate_on_split(
                estimator, estimand, y, d, X, groups, nuisance, pieces, base, trim, alpha, names,
                report_columns, spec,
            )
            for nuisance, pieces in splits
        ]
        results[estimator] = _combine_splits(estimator, estimand, per_split, seed)
    return results


def nuisance_spec(seed: int, names: list[str], **opts) -> NuisanceSpec:
    """The nuisance learners ``estimate_effects`` fits for these options (``names``: the feature
    columns' names, for ``pca_columns``): for callers that cross-fit a nuisance of their own on
    the same learners (eocausal.estimate.fragility)."""
    pca_columns = opts.get("pca_columns")
    return NuisanceSpec(
        **_own_learners(opts.get("learners")),
        learner=opts.get("learner", "linear"),
        seed=seed,
        pca_components=opts.get("pca_components"),
        pca_columns=None if pca_columns is None else tuple(_column_indexes(pca_columns, names, "pca_columns")),
        solver=opts.get("solver", "fast"),
        undersmooth=opts.get("undersmooth", UNDERSMOOTH),
        outcome_arms=opts.get("outcome_arms", "borrow"),
        propensity_fit=opts.get("propensity_fit", "likelihood"),
    )


def _needs(estimator: str, estimand: str) -> set[str]:
    """The nuisance functions an estimator's score uses."""
    if estimator == "ipw":
        return {"e"}
    if estimator == "aipw":
        return {"e", "mu0"} | ({"mu1"} if estimand == "ATE" else set())  # the ATT score needs no mu1
    if estimator == "dml":
        return {"e", "l"}
    return set()


def _split_seed(seed: int, repetition: int) -> int:
    # Split 0 uses the seed itself, so repetitions=1 is exactly the single-split estimate.
    if repetition == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), repetition]).generate_state(1)[0])


def _estimate_on_split(
    estimator, estimand, y, d, X, groups, nuisance, pieces, base, trim, alpha, names, report_columns, spec,
) -> dict:
    """One estimator on one split's nuisances: estimate, SE, critical value, n and diagnostics."""
    info = dict(base)
    info.update(pieces["base"])
    uses_propensity = "e" in _needs(estimator, estimand)
    if uses_propensity:
        for key in ("propensity", "propensity_model"):
            if key in pieces:
                info[key] = pieces[key]
    if estimator == "aipw":
        arms = ["control"] + (["treated"] if estimand == "ATE" else [])
        fits = [pieces.get(f"outcome_{arm}") for arm in arms]
        if estimand == "ATE" and "outcome_arms" in pieces:
            info["outcome_arms"] = pieces["outcome_arms"]
        if all(fit is not None for fit in fits):
            info["outcome_r2"] = {arm: fit["r2"] for arm, fit in zip(arms, fits)}
            if all("penalties" in fit for fit in fits):
                info["outcome_model"] = {"penalty_by_fold": {arm: fit["penalties"] for arm, fit in zip(arms, fits)}}
    elif estimator == "dml" and "outcome_all" in pieces:
        info["outcome_r2"] = {"all": pieces["outcome_all"]["r2"]}
        if "penalties" in pieces["outcome_all"]:
            info["outcome_model"] = {"penalty_by_fold": {"all": pieces["outcome_all"]["penalties"]}}

    if estimator == "aipw" and "calibrated" in pieces:
        # Before any trimming, like the nuisances (a trimmed estimate keeps its units' terms).
        calibrated = pieces["calibrated"]
        nuisance = nuisance | calibrated_weights_influence(calibrated["models"], X, y, d, nuisance,
                                                           calibrated["fold_ids"], base["clip"], estimand)
    # The propensity the score weights by (the calibrated one, for IPW/AIPW, where fitted).
    propensity = (nuisance.get("e_weights_raw", nuisance.get("e_raw")) if estimator in ("ipw", "aipw")
                  else nuisance.get("e_raw")) if uses_propensity else None
    keep = None
    if uses_propensity and "e_raw" in nuisance:
        keep, info["trimming"] = _trimming(nuisance.get("e_overlap_raw", nuisance["e_raw"]), d, trim)
    elif trim is not None:
        reason = (
            "difference_in_means fits no propensity" if estimator == "difference_in_means"
            else "no features: the propensity is the constant treated share"
        )
        info["trimming"] = {"threshold": float(trim), "applied": False, "reason": reason}
    if keep is not None and not keep.all():
        y, d = y[keep], d[keep]
        X = None if X is None else X[keep]
        nuisance = {k: v[keep] for k, v in nuisance.items()}
        if groups is not None:
            groups = np.unique(groups[keep], return_inverse=True)[1].ravel()
            if groups.max() + 1 < 2:
                raise ValueError(
                    f"after trimming at {trim} fewer than 2 clusters remain: no cluster-robust SE"
                )

    estimate, influence = _SCORES[estimator](y, d, nuisance, estimand)
    std_error, n_clusters = _standard_error(influence, groups)
    if any(key in nuisance for key in WEIGHTS_INFLUENCE.values()):
        term = weights_influence_total(nuisance)
        if estimand == "ATT":
            term = term / d.mean()
        info["weights_estimation"] = {
            "std_error_weights_known": _standard_error(influence - term, groups)[0],
            "note": "the standard error counts the calibrated weights' estimation (M-estimation terms); "
                    "std_error_weights_known is the usual one that takes them as known",
        }
    if n_clusters is None:
        critical = stats.norm.ppf(1 - alpha / 2)
    else:
        critical = stats.t.ppf(1 - alpha / 2, df=n_clusters - 1)
        info["n_clusters"] = n_clusters
    info["critical_value"] = float(critical)
    if X is not None:
        weights_from = nuisance if uses_propensity else {}
        info.update(_weighting_diagnostics(X, d, weights_from, estimand, names, report_columns, spec))
    return {
        "estimate": float(estimate), "std_error": float(std_error), "critical": float(critical),
        "n": int(len(y)), "info": info, "influence": influence,
        "kept": None if keep is None or keep.all() else keep, "propensity": propensity,
    }


def _combine_splits(estimator: str, estimand: str, per_split: list[dict], seed: int) -> EffectResult:
    first = per_split[0]
    info = first["info"]
    estimate, std_error = first["estimate"], first["std_error"]
    if len(per_split) > 1:
        estimates = np.array([s["estimate"] for s in per_split])
        std_errors = np.array([s["std_error"] for s in per_split])
        estimate = float(np.median(estimates))
        # The split-to-split spread enters the SE, so a split-sensitive estimate is not overstated.
        std_error = float(np.sqrt(np.median(std_errors**2 + (estimates - estimate) ** 2)))
        info = dict(info)
        info["repeated_cross_fitting"] = {
            "repetitions": len(per_split),
            "fold_seeds": [_split_seed(seed, s) for s in range(len(per_split))],
            "estimates": estimates.tolist(),
            "std_errors": std_errors.tolist(),
            "n_by_split": [s["n"] for s in per_split],
            "rule": REPEATED_CROSS_FITTING_RULE,
            "diagnostics_from": "split 0",
        }
    critical = first["critical"]
    return EffectResult(
        estimand=estimand,
        estimator=estimator,
        estimate=float(estimate),
        std_error=float(std_error),
        ci_low=float(estimate - critical * std_error),
        ci_high=float(estimate + critical * std_error),
        n=first["n"],
        diagnostics=diag.jsonable(info),
        influence=first["influence"],
        kept=first["kept"],
        propensity=first["propensity"],
    )


def _trimming(e_raw: np.ndarray, d: np.ndarray, trim: float | None) -> tuple[np.ndarray | None, dict]:
    """Which units to keep, and the report; trim None keeps all and reports a zero share."""
    if trim is None:
        return None, {"threshold": None, "n_trimmed": 0, "share_trimmed": 0.0}
    keep = (e_raw >= trim) & (e_raw <= 1.0 - trim)
    report = {
        "threshold": float(trim),
        "applied": True,
        "rule": f"units with cross-fitted propensity outside [{trim}, {1 - trim}] dropped",
        "n_input": int(len(d)),
        "n_trimmed": int((~keep).sum()),
        "share_trimmed": float((~keep).mean()),
        "n_trimmed_by_arm": {},
        "share_trimmed_by_arm": {},
    }
    for arm, mask in (("treated", d == 1), ("control", d == 0)):
        report["n_trimmed_by_arm"][arm] = int((~keep & mask).sum())
        report["share_trimmed_by_arm"][arm] = float((~keep[mask]).mean())
    kept_treated, kept_control = int((keep & (d == 1)).sum()), int((keep & (d == 0)).sum())
    if kept_treated < 2 or kept_control < 2:
        raise ValueError(
            f"trimming at {trim} leaves {kept_treated} treated and {kept_control} control units; "
            "both arms need at least 2: lower trim, or improve overlap"
        )
    return keep, report


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


def _check_trim_and_repetitions(trim, repetitions) -> None:
    if trim is not None:
        if isinstance(trim, bool) or not isinstance(trim, (int, float, np.floating)) or not (0.0 < trim < 0.5):
            raise ValueError(f"trim must be None or a number in (0, 0.5), got {trim!r}")
    if isinstance(repetitions, bool) or not isinstance(repetitions, (int, np.integer)) or repetitions < 1:
        raise ValueError(f"repetitions must be an integer >= 1, got {repetitions!r}")


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


def _own_learners(learners) -> dict:
    """The ``learners`` option as NuisanceSpec fields (checked there)."""
    if learners is None:
        return {}
    if not isinstance(learners, dict):
        raise ValueError(f"learners must be a dict with keys from {list(LEARNER_ROLES)}, e.g. "
                         "{'propensity': LogisticRegression(), 'outcome': RandomForestRegressor()}")
    unknown = sorted(set(learners) - set(LEARNER_ROLES))
    if unknown:
        raise ValueError(f"learners: unknown key(s) {unknown}; known keys are {list(LEARNER_ROLES)}")
    return {f"{role}_learner": learners.get(role) for role in LEARNER_ROLES}


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


def _cross_fitted_nuisance(y, d, X, needs, folds, fold_seed, groups, clip, spec) -> tuple[dict, dict]:
    """Out-of-fold predictions of the nuisances in ``needs``, and their fit diagnostics."""
    fold_ids = make_folds(len(y), folds, fold_seed, stratify=d, groups=groups)
    for k in range(folds):
        train = fold_ids != k
        if d[train].min() == d[train].max():
            raise ValueError(
                f"cross-fitting fold {k}: its training set holds only "
                f"{'treated' if d[train][0] == 1 else 'control'} units; use fewer folds or more "
                "clusters with both treated and control units"
            )
    base = {
        "cross_fitted": True,
        "folds": int(folds),
        "fold_sizes": np.bincount(fold_ids, minlength=folds).tolist(),
        "fold_scheme": (
            "group-wise, balanced by treatment" if groups is not None else "stratified by treatment"
        ),
        "learner": spec.learner,
        "learners": learner_names(spec),
    }
    if spec.learner == "linear":
        base["solver"] = spec.solver
    if spec.pca_components is not None:
        base["pca_components"] = int(spec.pca_components)
    nuisance: dict = {}
    pieces: dict = {"base": base}
    grams = gram_blocks(X, d, fold_ids, spec) if needs else None
    if "e" in needs:
        e_raw, log = cross_fit_propensity(X, d, fold_ids, spec, grams)
        nuisance["e_raw"] = e_raw
        nuisance["e"] = np.clip(e_raw, clip, 1.0 - clip)
        pieces["propensity"] = diag.propensity_overlap(e_raw, d, clip)
        n_train = len(d) - int(np.bincount(fold_ids).max())
        if overlap_refit_needed(spec, n_train, X.shape[1]):
            # Few rows per feature: overlap judged on the CV-penalty fit (nuisance.py says why).
            e_cv, _ = cross_fit_propensity(X, d, fold_ids, replace(spec, undersmooth=1.0), grams)
            nuisance["e_overlap_raw"] = e_cv
            nuisance["e_overlap"] = np.clip(e_cv, clip, 1.0 - clip)
            estimation = pieces["propensity"]
            pieces["propensity"] = diag.propensity_overlap(e_cv, d, clip)
            pieces["propensity"]["overlap_from"] = "cv_penalty_refit"
            pieces["propensity"]["estimation_share_clipped"] = estimation["share_clipped"]
            pieces["propensity"]["estimation_auc"] = estimation["auc"]
        pieces["propensity_model"] = {
            "penalty_by_fold": log.penalties,
            "convergence_warnings": log.convergence_warnings,
        }
        if spec.propensity_fit == "calibrated":
            # The IPW/AIPW weights from per-arm calibrated models; DML, trimming and the overlap
            # diagnostics keep the likelihood fit above.
            e_cal, cal_log, calibrated_models = cross_fit_calibrated_propensity(X, d, fold_ids, spec)
            nuisance["e_weights_raw"] = e_cal
            nuisance["e_weights"] = np.clip(e_cal, clip, 1.0 - clip)
            # For the AIPW's weights' estimation terms (calibration.calibrated_weights_influence).
            pieces["calibrated"] = {"models": calibrated_models, "fold_ids": fold_ids}
            pieces["propensity_model"]["weights"] = {
                "fit": "calibrated: per-arm logistic models by the calibration loss (Tan 2020); the weights "
                       "balance each arm's features to the sample's",
                "penalty_by_fold_and_arm": cal_log.penalties,
                "share_clipped": float(np.mean((e_cal < clip) | (e_cal > 1.0 - clip))),
            }
    outcome_fits = (
        ("mu0", "control", d == 0, (0,)), ("mu1", "treated", d == 1, (1,)), ("l", "all", None, (0, 1)),
    )
    both_arms = {}
    if {"mu0", "mu1"} <= needs:
        by_arm, logs, larger = cross_fit_outcome_arms(X, y, d, fold_ids, spec, grams)
        both_arms = {"mu0": (by_arm[0], logs[0]), "mu1": (by_arm[1], logs[1])}
        names = ("control", "treated")
        pieces["outcome_arms"] = ("separate: each arm's model on its own units" if larger is None else
                                f"borrow: the {names[larger]} arm's model on its own units; the {names[1 - larger]} "
                                "arm's = that model + a model of its residuals from it")
    for name, arm, fit_on, arms in outcome_fits:
        if name not in needs:
            continue
        if name in both_arms:
            predicted, log = both_arms[name]
        else:
            predicted, log = cross_fit_outcome(X, y, fold_ids, spec, fit_on=fit_on, grams=grams, arms=arms)
        nuisance[name] = predicted
        observed = slice(None) if fit_on is None else fit_on
        pieces[f"outcome_{arm}"] = {
            "r2": diag.out_of_fold_r2(y[observed], predicted[observed]),
            "penalties": log.penalties,
        }
    return nuisance, pieces


def _supplied_nuisance(supplied, y, d, needs, clip) -> tuple[dict, dict]:
    """Nuisances from the caller's out-of-fold predictions (``predictions`` option)."""
    if not isinstance(supplied, dict):
        raise ValueError(f"predictions must be a dict with keys from {list(PREDICTION_KEYS)}")
    unknown = sorted(set(supplied) - set(PREDICTION_KEYS))
    if unknown:
        raise ValueError(f"predictions: unknown key(s) {unknown}; known keys are {list(PREDICTION_KEYS)}")
    wanted = {"e": "propensity", "mu0": "outcome_control", "mu1": "outcome_treated", "l": "outcome"}
    missing = sorted(wanted[name] for name in needs if wanted[name] not in supplied)
    if missing:
        raise ValueError(f"predictions: the estimator(s) asked for also need {missing}")
    n = len(y)
    nuisance: dict = {}
    for key, values in supplied.items():
        values = _one_dimensional(values, f"predictions[{key!r}]").astype(float)
        if len(values) != n:
            raise ValueError(f"predictions[{key!r}] has {len(values)} values for {n} units")
        if not np.isfinite(values).all():
            raise ValueError(f"predictions[{key!r}] must be finite")
        nuisance[PREDICTION_KEYS[key]] = values
    pieces: dict = {"base": {
        "cross_fitted": False,
        "folds": None,
        "nuisance": "supplied by the caller (taken to be out-of-fold predictions)",
    }}
    if "e_raw" in nuisance:
        e_raw = nuisance["e_raw"]
        if (e_raw < 0).any() or (e_raw > 1).any():
            raise ValueError("predictions['propensity'] must lie in [0, 1]")
        nuisance["e"] = np.clip(e_raw, clip, 1.0 - clip)
        pieces["propensity"] = diag.propensity_overlap(e_raw, d, clip)
    for name, arm, observed in (("mu0", "control", d == 0), ("mu1", "treated", d == 1), ("l", "all", slice(None))):
        if name in nuisance:
            pieces[f"outcome_{arm}"] = {"r2": diag.out_of_fold_r2(y[observed], nuisance[name][observed])}
    return nuisance, pieces


# --- scores: each returns (estimate, influence function values) --------------------------------


def _difference_in_means(y, d, nuisance, estimand):
    # Under the design that justifies it (randomisation) ATT = ATE: one estimator for both.
    share = d.mean()
    mean1, mean0 = y[d == 1].mean(), y[d == 0].mean()
    influence = d * (y - mean1) / share - (1 - d) * (y - mean0) / (1 - share)
    return mean1 - mean0, influence


def _weighting_propensity(nuisance: dict) -> np.ndarray:
    """The propensity in the IPW/AIPW weights: the calibrated one where fitted, else the likelihood's."""
    return nuisance.get("e_weights", nuisance["e"])


def _ipw(y, d, nuisance, estimand):
    e = _weighting_propensity(nuisance)
    w = diag.hajek_weights(e, d, estimand)
    w1, w0 = w * d, w * (1 - d)
    mean1 = (w1 * y).sum() / w1.sum()
    mean0 = (w0 * y).sum() / w0.sum()
    # Influence of each Hajek ratio, treating the cross-fitted propensities as given (for the
    # ATE this is conservative: estimating e only lowers the variance).
    influence = w1 * (y - mean1) / w1.mean() - w0 * (y - mean0) / w0.mean()
    return mean1 - mean0, influence


def _aipw(y, d, nuisance, estimand):
    e, mu0 = _weighting_propensity(nuisance), nuisance["mu0"]
    if estimand == "ATE":
        mu1 = nuisance["mu1"]
        psi = mu1 - mu0 + d * (y - mu1) / e - (1 - d) * (y - mu0) / (1 - e)
        estimate = psi.mean()
        return estimate, psi - estimate + weights_influence_total(nuisance)
    # ATT: the Neyman-orthogonal score of Chernozhukov et al. (2018, §5.1),
    # psi = [D(Y - mu0) - e(1 - D)(Y - mu0)/(1 - e) - D theta] / P(D = 1).
    share = d.mean()
    residual = y - mu0
    numerator = d * residual - e * (1 - d) * residual / (1 - e)
    estimate = numerator.mean() / share
    return estimate, (numerator - d * estimate + weights_influence_total(nuisance)) / share



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
        weights = diag.hajek_weights(_weighting_propensity(nuisance), d, estimand)
        out["ess"] = diag.ess_by_arm(weights, d)
        if "e_overlap" in nuisance:  # overlap judged on the CV-penalty propensity (see above)
            out["ess_estimation"] = out["ess"]
            out["ess"] = diag.ess_by_arm(diag.hajek_weights(nuisance["e_overlap"], d, estimand), d)
    out["balance"] = diag.balance(X, d, weights, names, report_columns)
    if spec.pca_columns is not None or spec.pca_components is not None:
        # The embedding's own columns mean little one by one: also show its leading components.
        block = X[:, list(spec.pca_columns)] if spec.pca_columns is not None else X
        k = min(BALANCE_COMPONENTS, spec.pca_components or BALANCE_COMPONENTS, *block.shape)
        standardised = StandardScaler().fit_transform(block)
        scores = PCA(n_components=k, svd_solver="randomized", random_state=spec.seed).fit_transform(standardised)
        out["balance_components"] = diag.balance(scores, d, weights, [f"pc{j + 1}" for j in range(k)])
    return out
