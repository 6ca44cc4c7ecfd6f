"""Effects when the outcome is measured for only some units: predict it from the image, then
correct for the prediction error so that inference stays valid.

Setting: outcome Y is observed for the labelled units (R = 1) and missing for the rest; the image
embedding phi(I) and tabular covariates X (together Z) and the treatment D are known for all. Y
is missing at random given (D, Z): the labelled units are a random subset of each treatment arm
(``labelling="by_arm"``, the default) or their chance of being labelled depends on (D, Z) only
(``labelling="features"``).

1. An outcome model f_d(Z) = E[Y | D = d, Z] per arm is fitted on the labelled units with K-fold
   cross-fitting (:func:`eocausal.estimate.nuisance.cross_fit_outcome`), so that no labelled
   unit's prediction comes from a model that saw its outcome.
2. Every unit gets the debiased pseudo-outcome (prediction-powered inference, Angelopoulos et al.
   2023, with the power tuning of PPI++, Angelopoulos, Duchi & Zrnic 2023; the same as the
   doubly robust "AIPW with a missing outcome" / double-sampling transform)

       Y~ = lambda_D f_D(Z) + m_D + R / pi(D, Z) * (Y - lambda_D f_D(Z) - m_D),

   pi the labelling probability, m_D the weighted mean residual of the labelled units of the arm
   (centring makes the per-unit values carry the right variance when pi is estimated). Under MAR,
   E[Y~ | D, Z] = E[Y | D, Z] whatever f and lambda are, so any effect estimator run on Y~ for
   all units targets the full-sample effect, and its influence-function standard error (computed
   from the Y~ values) accounts for the imputation error. lambda_d, the calibration slope of Y on
   f within arm d among the labelled units (clipped to [0, 1]), minimises the variance of Y~:
   lambda = 1 is plain PPI, lambda = 0 ignores the predictions (the labelled-only estimate).
   The transform is Neyman-orthogonal in f and lambda, so estimating them costs nothing to
   first order.
3. The naive plug-in fills the missing outcomes with f_D(Z) and treats them as measured. Its
   estimate can be biased (a shrunken model) and its standard error is too small (predictions
   vary less than outcomes and carry no sampling error), so its CIs under-cover. It is reported
   beside the corrected one for comparison only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from eocausal.estimate import diagnostics as diag
from eocausal.estimate.ate import EffectResult, estimate_effect
from eocausal.estimate.folds import make_folds
from eocausal.estimate.nuisance import NuisanceSpec, cross_fit_outcome, cross_fit_propensity

LABELLING_MODELS = ("by_arm", "features")
# Outcome sources of an effect estimate when outcome imputation is on.
MEASURED, CORRECTED, PLUGIN = "measured", "imputed_corrected", "imputed_plugin"
OUTCOME_SOURCES = (MEASURED, CORRECTED, PLUGIN)
# Per arm, below this many labelled units there is no residual variance to speak of.
MIN_LABELLED_PER_ARM = 3

# Columns of the per-unit imputation table (lake/imputed_outcomes/<study>-<version>.parquet).
IMPUTED_COLUMNS = [
    "unit_id", "treatment", "outcome", "labelled", "predicted_outcome", "predicted_control",
    "predicted_treated", "labelling_propensity", "corrected_outcome", "filled_outcome",
]


@dataclass
class ImputedOutcomes:
    """Per-unit imputations and the two outcome vectors the estimators run on."""

    labelled: np.ndarray  # bool: outcome measured
    treatment: np.ndarray  # int 0/1
    outcome: np.ndarray  # measured outcome, NaN where missing
    predicted_control: np.ndarray  # cross-fitted f_0(Z), every unit
    predicted_treated: np.ndarray  # cross-fitted f_1(Z), every unit
    labelling_propensity: np.ndarray  # pi(D, Z)
    corrected: np.ndarray  # the debiased pseudo-outcome Y~ (valid inference)
    filled: np.ndarray  # measured where labelled, else the prediction (naive plug-in)
    diagnostics: dict = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray:
        """f_D(Z): the prediction for the arm each unit is in."""
        return np.where(self.treatment == 1, self.predicted_treated, self.predicted_control)

    def to_frame(self, unit_ids) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "unit_id": [str(u) for u in unit_ids],
                "treatment": self.treatment.astype(int),
                "outcome": self.outcome,
                "labelled": self.labelled,
                "predicted_outcome": self.predicted,
                "predicted_control": self.predicted_control,
                "predicted_treated": self.predicted_treated,
                "labelling_propensity": self.labelling_propensity,
                "corrected_outcome": self.corrected,
                "filled_outcome": self.filled,
            },
            columns=IMPUTED_COLUMNS,
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, unit_ids=None, diagnostics: dict | None = None) -> "ImputedOutcomes":
        """Read back a :meth:`to_frame` table, in the order of ``unit_ids`` when given."""
        if unit_ids is not None:
            wanted = pd.Index([str(u) for u in unit_ids])
            indexed = frame.assign(unit_id=frame["unit_id"].astype(str)).set_index("unit_id")
            missing = wanted.difference(indexed.index)
            if len(missing):
                raise ValueError(
                    f"imputed outcomes lack {len(missing)} analysis unit(s), e.g. {list(missing[:5])}"
                )
            frame = indexed.loc[wanted].reset_index()
        col = lambda c: frame[c].to_numpy(dtype=float)  # noqa: E731
        return cls(
            labelled=frame["labelled"].to_numpy(dtype=bool),
            treatment=frame["treatment"].to_numpy(dtype=int),
            outcome=col("outcome"),
            predicted_control=col("predicted_control"),
            predicted_treated=col("predicted_treated"),
            labelling_propensity=col("labelling_propensity"),
            corrected=col("corrected_outcome"),
            filled=col("filled_outcome"),
            diagnostics=diagnostics or {},
        )


def impute_outcomes(
    y,
    d,
    Z=None,
    *,
    folds: int = 5,
    seed: int = 0,
    groups=None,
    learner: str = "linear",
    labelling: str = "by_arm",
    power_tuning: bool = True,
    clip: float = 0.01,
) -> ImputedOutcomes:
    """Cross-fitted outcome predictions from Z (image + tabular features) and the debiased
    pseudo-outcomes for every unit. ``y``: NaN where the outcome is missing.

    - ``labelling``: ``by_arm`` (missing completely at random within each arm: pi = labelled
      share of the arm) or ``features`` (pi(D, Z) from a cross-fitted logistic model).
    - ``power_tuning``: PPI++ lambda per arm; False gives plain PPI (lambda = 1).
    - ``groups``: cluster labels; folds never split a cluster.
    """
    if labelling not in LABELLING_MODELS:
        raise ValueError(f"labelling must be one of {LABELLING_MODELS}, got {labelling!r}")
    y = np.asarray(y, dtype=float).ravel()
    d = np.asarray(d, dtype=float).ravel()
    n = len(y)
    if len(d) != n:
        raise ValueError(f"lengths must match: y has {n} values, d has {len(d)}")
    if not np.isin(d, (0.0, 1.0)).all():
        raise ValueError("d (treatment) must be binary 0/1 for every unit")
    d = d.astype(int)
    infinite = np.isinf(y)
    if infinite.any():
        raise ValueError(
            f"y (outcome) must be finite or missing: {int(infinite.sum())} infinite value(s), "
            f"first at position(s) {np.flatnonzero(infinite)[:5].tolist()}"
        )
    labelled = ~np.isnan(y)
    for arm, name in ((1, "treated"), (0, "control")):
        count = int((labelled & (d == arm)).sum())
        if count < MIN_LABELLED_PER_ARM:
            raise ValueError(
                f"outcome imputation needs at least {MIN_LABELLED_PER_ARM} units with a measured outcome "
                f"in each arm; the {name} arm has {count} of {int((d == arm).sum())}"
            )
    if Z is not None:
        Z = np.asarray(Z, dtype=float)
        if Z.ndim != 2 or Z.shape[0] != n:
            raise ValueError(f"Z must be an (n, p) matrix with n = {n} rows, got shape {Z.shape}")
        if not np.isfinite(Z).all():
            raise ValueError("Z (imputation features) must be finite")
        if Z.shape[1] == 0:
            Z = None

    with threadpool_limits(limits=1):  # reproducible and without thread contention, as estimate_effect
        codes = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
        # Folds balance treatment and labelling together, so every training split has labelled
        # units of both arms.
        fold_ids = make_folds(n, folds, seed, stratify=2 * d + labelled, groups=codes)
        spec = NuisanceSpec(learner=learner, seed=seed)
        predictions, fit = {}, {}
        for arm, name in ((0, "control"), (1, "treated")):
            fit_on = labelled & (d == arm)
            if Z is None:
                predictions[arm] = _out_of_fold_mean(y, fold_ids, fit_on)
            else:
                predictions[arm], _ = cross_fit_outcome(Z, y, fold_ids, spec, fit_on=fit_on)
            fit[name] = diag.out_of_fold_r2(y[fit_on], predictions[arm][fit_on])
        f = np.where(d == 1, predictions[1], predictions[0])

        if labelling == "by_arm":
            pi = np.empty(n)
            for arm in (0, 1):
                pi[d == arm] = labelled[d == arm].mean()
        else:
            features = d[:, None].astype(float) if Z is None else np.column_stack([d, Z])
            pi_raw, _ = cross_fit_propensity(features, labelled.astype(int), fold_ids, spec)
            pi = np.clip(pi_raw, clip, 1.0)

    corrected = np.empty(n)
    power, centre = {}, {}
    for arm, name in ((0, "control"), (1, "treated")):
        in_arm = d == arm
        lab = in_arm & labelled
        w = 1.0 / pi[lab]
        lam = _calibration_slope(y[lab], f[lab], w) if power_tuning else 1.0
        m = float(np.average(y[lab] - lam * f[lab], weights=w))
        residual = np.where(lab, np.nan_to_num(y) - lam * f - m, 0.0)
        corrected[in_arm] = (lam * f + m + labelled / pi * residual)[in_arm]
        power[name], centre[name] = lam, m

    filled = np.where(labelled, np.nan_to_num(y), f)
    by_arm = {
        name: {
            "n": int((d == arm).sum()),
            "n_labelled": int((labelled & (d == arm)).sum()),
            "share_missing": float(1.0 - labelled[d == arm].mean()),
        }
        for arm, name in ((1, "treated"), (0, "control"))
    }
    info = {
        "method": "prediction-powered (PPI++) debiased pseudo-outcome; cross-fitted arm-wise outcome model",
        "n": n,
        "n_labelled": int(labelled.sum()),
        "n_missing": int((~labelled).sum()),
        "share_missing": float((~labelled).mean()),
        "by_arm": by_arm,
        "labelling": labelling,
        "labelling_propensity": {"min": float(pi.min()), "max": float(pi.max()), "mean": float(pi.mean())},
        "power_tuning": bool(power_tuning),
        "power": power,
        "mean_residual": centre,
        "imputation_r2": fit,
        "n_imputation_features": 0 if Z is None else int(Z.shape[1]),
        "folds": int(folds),
        "learner": learner,
    }
    return ImputedOutcomes(
        labelled=labelled,
        treatment=d,
        outcome=np.where(labelled, y, np.nan),
        predicted_control=predictions[0],
        predicted_treated=predictions[1],
        labelling_propensity=pi,
        corrected=corrected,
        filled=filled,
        diagnostics=diag.jsonable(info),
    )


def _out_of_fold_mean(y: np.ndarray, fold_ids: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    out = np.empty(len(y))
    overall = y[fit_on].mean()
    for k in np.unique(fold_ids):
        train = (fold_ids != k) & fit_on
        out[fold_ids == k] = y[train].mean() if train.any() else overall
    return out


def _calibration_slope(y: np.ndarray, f: np.ndarray, w: np.ndarray) -> float:
    """Weighted slope of y on f, clipped to [0, 1]: the variance-minimising lambda (PPI++)."""
    fc = f - np.average(f, weights=w)
    var_f = float(np.average(fc * fc, weights=w))
    if not var_f > 0:
        return 0.0
    slope = float(np.average(fc * (y - np.average(y, weights=w)), weights=w)) / var_f
    return float(np.clip(slope, 0.0, 1.0))


def estimate_with_imputation(
    imputed: ImputedOutcomes, X=None, estimator: str = "aipw", **kwargs
) -> dict[str, EffectResult]:
    """The effect on all units with the corrected pseudo-outcome and with the naive plug-in, and
    on the labelled units alone (``measured``); keyword arguments go to ``estimate_effect``
    (groups, when given, must cover all units).
    """
    d = imputed.treatment
    groups = kwargs.pop("groups", None)
    labelled = imputed.labelled
    X_lab = None if X is None else np.asarray(X)[labelled]
    g_lab = None if groups is None else np.asarray(groups)[labelled]
    results = {
        MEASURED: estimate_effect(imputed.outcome[labelled], d[labelled], X_lab, estimator, groups=g_lab, **kwargs),
        CORRECTED: estimate_effect(imputed.corrected, d, X, estimator, groups=groups, **kwargs),
        PLUGIN: estimate_effect(imputed.filled, d, X, estimator, groups=groups, **kwargs),
    }
    for source, res in results.items():
        annotate(res, source, imputed)
    return results


def annotate(result: EffectResult, source: str, imputed: ImputedOutcomes) -> EffectResult:
    """Record in the result's diagnostics which outcomes it used and how they were imputed."""
    notes = {
        MEASURED: "labelled units only (complete cases): valid if outcomes are missing completely at random",
        CORRECTED: "all units; debiased prediction-powered pseudo-outcome: valid inference under MAR",
        PLUGIN: "all units; missing outcomes replaced by predictions as if measured: "
                "standard error too small, for comparison only",
    }
    result.diagnostics["outcome_imputation"] = {
        "outcome_source": source,
        "note": notes[source],
        "n_labelled": int(imputed.labelled.sum()),
        "n_missing": int((~imputed.labelled).sum()),
        "power": imputed.diagnostics.get("power"),
        "imputation_r2": imputed.diagnostics.get("imputation_r2"),
    }
    return result
