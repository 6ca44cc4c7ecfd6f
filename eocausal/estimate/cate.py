"""Conditional average treatment effects: the DR-learner (Kennedy 2023) on image and tabular features.

Stage 1 (nuisances, cross-fitted): propensity e(X) and arm outcome models mu_0(X), mu_1(X) on the
*adjustment* features (all confounders: tabular + image), with the same learners and folds as the
ATE stage (:mod:`eocausal.estimate.nuisance`, :func:`eocausal.estimate.folds.make_folds`). They give
each unit the doubly robust (AIPW) pseudo-outcome

    Gamma_i = mu_1(X_i) - mu_0(X_i) + D_i (Y_i - mu_1(X_i)) / e(X_i) - (1 - D_i) (Y_i - mu_0(X_i)) / (1 - e(X_i)),

whose conditional mean is the CATE whatever the features of stage 2 are, as long as stage 1
adjusted for every confounder.

Stage 2 (final stage): regress Gamma on the *effect* features V (a feature set: tabular, image
principal components, or both). The default is ridge with its penalty chosen by exact leave-one-out
CV. Tabular columns are standardised; the image components share one scale (the leading
component's sd), so they keep their variance ordering and the penalty falls hardest on the minor
components — the pseudo-outcomes are noisy, and standardising 64 components would give the
noise-carrying minor ones as much room as the leading ones that carry most of the image's content.
``learner="boosting"`` uses seeded histogram gradient boosting. Two fits:

- cross-fitted: the model for fold k is fitted on the other folds' pseudo-outcomes and predicts
  fold k. These held-out predictions rank units for RATE and are what PEHE is measured on.
- full sample: the model a user applies to new places (transport) and to the saliency maps.

Uncertainty (linear final stage): the HC0 sandwich of the ridge coefficients, so
se(x) = sqrt(x' V x + s^2 / n). It is the sampling error of the fitted projection of the CATE on V;
the ridge shrinkage bias is not in it. Boosting gives no standard error (NaN).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from eocausal.embed.reduce import PCAReduction, image_reduction
from eocausal.estimate import diagnostics as diag
from eocausal.estimate.ate import nuisance_spec
from eocausal.estimate.calibration import calibrated_weights_influence
from eocausal.estimate.folds import make_folds
from eocausal.estimate.nuisance import (
    cross_fit_calibrated_propensity,
    cross_fit_outcome_arms,
    cross_fit_propensity,
    learner_names,
)
from eocausal.estimate.rate import pehe, rank_average_treatment_effect
from eocausal.lake import embedding_matrix

# Bump when the CATE code changes what it computes: it enters every CATE version.
CODE_VERSION = "cate-3"  # 2: image components from the stored PCA; 3: nuisances adjust for the context
CATE_FEATURE_SETS = ("tabular", "image", "tabular+image")
FINAL_LEARNERS = ("linear", "boosting")
# Pseudo-outcomes are noisy: the final-stage ridge needs penalties well above the outcome models'.
FINAL_ALPHAS = np.logspace(-3, 7, 41)

PREDICTION_COLUMNS = [
    "study", "cate_version", "unit_id", "lat", "lon", "feature_set", "fold", "treatment", "outcome",
    "propensity", "pseudo_outcome", "cate", "cate_std_error", "cate_ci_low", "cate_ci_high", "computed_at",
]
EVALUATION_COLUMNS = [
    "study", "cate_version", "feature_set", "metric", "estimate", "std_error", "ci_low", "ci_high", "n",
    "details", "computed_at",
]


# --- features --------------------------------------------------------------------------------


@dataclass
class CateFeatures:
    """Feature matrices for the CATE stage, built like the ATE stage's (eocausal.estimate.effects)."""

    tabular: np.ndarray  # [n, p_tab] survey covariates
    tabular_names: list[str]
    image: np.ndarray  # [n, k] principal components of the embedding
    image_names: list[str]
    pca: PCAReduction | None  # maps an embedding to ``image``; reused for transport and saliency

    def image_columns(self, feature_set: str) -> np.ndarray:
        """Boolean mask of the image-component columns of a feature set's matrix."""
        n_tab, n_img = self.tabular.shape[1], self.image.shape[1]
        if feature_set == "tabular":
            return np.zeros(n_tab, dtype=bool)
        if feature_set == "image":
            return np.ones(n_img, dtype=bool)
        return np.r_[np.zeros(n_tab, dtype=bool), np.ones(n_img, dtype=bool)]

    def matrix(self, feature_set: str) -> tuple[np.ndarray, list[str]]:
        if feature_set == "tabular":
            return self.tabular, list(self.tabular_names)
        if feature_set == "image":
            return self.image, list(self.image_names)
        if feature_set == "tabular+image":
            return np.hstack([self.tabular, self.image]), self.tabular_names + self.image_names
        raise ValueError(f"unknown feature set {feature_set!r}; use one of {CATE_FEATURE_SETS}")

    def available(self) -> list[str]:
        out = []
        if self.tabular.shape[1]:
            out.append("tabular")
        if self.image.shape[1]:
            out.append("image")
        if self.tabular.shape[1] and self.image.shape[1]:
            out.append("tabular+image")
        return out


def build_features(units: pd.DataFrame, covariates: list[str], image_components: int, seed: int,
                   stored_pca: PCAReduction | None = None) -> CateFeatures:
    """Tabular covariates and image principal components of the analysis units.

    The reduction is chosen as :func:`eocausal.estimate.effects.feature_sets` chooses it (the
    embedding stage's stored PCA, else one fitted with the same seed), so the image features
    match the ATE stage's.
    """
    tabular = units[covariates].to_numpy(dtype=float) if covariates else np.zeros((len(units), 0))
    pca = None
    image = np.zeros((len(units), 0))
    if "image_components" in units.columns and len(units):
        # The marts' scores on the stored PCA (eocausal.estimate.effects.image_components).
        scores = embedding_matrix(units["image_components"])
        if image_components > scores.shape[1]:
            raise ValueError(f"{image_components} image components asked for, but the units carry "
                             f"{scores.shape[1]} (embedding.pca_components)")
        image = scores[:, :image_components]
        pca = stored_pca.leading(image_components) if stored_pca is not None else None
    elif "embedding" in units.columns and len(units):
        embedding = embedding_matrix(units["embedding"])
        pca = image_reduction(embedding, image_components, seed, stored_pca)
        image = pca.transform(embedding)
    return CateFeatures(
        tabular=tabular,
        tabular_names=list(covariates),
        image=image,
        image_names=[f"image_pc{i + 1}" for i in range(image.shape[1])],
        pca=pca,
    )


# --- stage 1: pseudo-outcomes ------------------------------------------------------------------


@dataclass
class PseudoOutcomes:
    score: np.ndarray  # Gamma_i, the AIPW pseudo-outcome
    propensity: np.ndarray  # clipped, cross-fitted e(X_i)
    mu0: np.ndarray
    mu1: np.ndarray
    fold_ids: np.ndarray
    diagnostics: dict = field(default_factory=dict)


def dr_pseudo_outcomes(
    y, d, X, *, folds: int = 5, seed: int = 0, groups=None, clip: float = 0.01, learner: str = "linear",
    outcome_arms: str = "borrow", nuisance_options: dict | None = None,
) -> PseudoOutcomes:
    """Cross-fitted AIPW pseudo-outcomes; folds and nuisance models as in the ATE stage
    (``outcome_arms``: :data:`eocausal.estimate.nuisance.OUTCOME_ARMS`; ``nuisance_options``: the
    ATE stage's ``learners``, ``outcome_arms`` and ``propensity_fit``, as AnalysisSpec.nuisance_options
    gives them, over ``learner`` and ``outcome_arms``). With ``propensity_fit="calibrated"`` the
    pseudo-outcomes weight by the calibrated propensity, as the AIPW estimate does; the overlap
    diagnostics describe the likelihood one."""
    y = np.asarray(y, dtype=float)
    d = np.asarray(d).astype(int)
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[0] != len(y) or len(d) != len(y):
        raise ValueError(f"shapes do not match: y {y.shape}, d {d.shape}, X {X.shape}")
    if X.shape[1] == 0:
        raise ValueError("the DR-learner needs adjustment features (tabular and/or image); got none")
    if not (np.isfinite(y).all() and np.isfinite(X).all()):
        raise ValueError("outcome and features must be finite")
    if set(np.unique(d)) != {0, 1}:
        raise ValueError("treatment must be binary with both arms present")
    spec = nuisance_spec(seed, [], **{"learner": learner, "outcome_arms": outcome_arms, **(nuisance_options or {})})
    fold_ids = make_folds(len(y), folds, seed, stratify=d, groups=groups)
    with threadpool_limits(limits=1):
        e_raw, _ = cross_fit_propensity(X, d, fold_ids, spec)
        e_weights, calibrated_models = e_raw, None
        if spec.propensity_fit == "calibrated":
            e_weights, _, calibrated_models = cross_fit_calibrated_propensity(X, d, fold_ids, spec)
        arms, _, _ = cross_fit_outcome_arms(X, y, d, fold_ids, spec)
        mu0, mu1 = arms[0], arms[1]
    e = np.clip(e_weights, clip, 1.0 - clip)
    score = mu1 - mu0 + d * (y - mu1) / e - (1 - d) * (y - mu0) / (1 - e)
    influence = score - score.mean()
    if calibrated_models is not None:  # the AIPW ATE's SE counts the weights' estimation, as the ATE stage's
        influence = influence + sum(calibrated_weights_influence(
            calibrated_models, X, y, d, {"mu0": mu0, "mu1": mu1}, fold_ids, clip).values())
    info = {
        "folds": int(folds),
        "clip": float(clip),
        "learner": spec.learner,
        "learners": learner_names(spec),
        "outcome_arms": spec.outcome_arms,
        "propensity_fit": spec.propensity_fit,
        "n_adjustment_features": int(X.shape[1]),
        "propensity": diag.propensity_overlap(e_raw, d, clip),
        "outcome_r2": {
            "control": diag.out_of_fold_r2(y[d == 0], mu0[d == 0]),
            "treated": diag.out_of_fold_r2(y[d == 1], mu1[d == 1]),
        },
        "aipw_ate": float(score.mean()),
        "aipw_ate_std_error": float(influence.std(ddof=1) / np.sqrt(len(score))),
    }
    return PseudoOutcomes(score, e, mu0, mu1, fold_ids, diag.jsonable(info))


# --- stage 2: the final-stage regression -------------------------------------------------------


def _ridge_loo(Z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[float, np.ndarray]:
    """Ridge of centred y on centred Z, penalty chosen by exact leave-one-out error (intercept
    included in the hat matrix). One SVD serves every penalty. Returns (alpha, coef)."""
    n = len(y)
    U, sv, Vt = np.linalg.svd(Z, full_matrices=False)
    Uy = U.T @ y
    shrink = sv[None, :] ** 2 / (sv[None, :] ** 2 + alphas[:, None])  # [A, r]
    fitted = U @ (shrink * Uy[None, :]).T  # [n, A]
    leverage = (U**2) @ shrink.T + 1.0 / n
    loo = (y[:, None] - fitted) / np.maximum(1.0 - leverage, 1e-12)
    best = int(np.argmin(np.mean(loo**2, axis=0)))
    alpha = float(alphas[best])
    coef = Vt.T @ (sv / (sv**2 + alpha) * Uy)
    return alpha, coef


class FinalStage:
    """Regression of pseudo-outcomes on effect features, with prediction standard errors (linear).

    Plain arrays inside (``to_dict``/``from_dict``), so a fitted model can be stored as JSON and
    applied elsewhere (transport, saliency) without pickles.
    """

    def __init__(self, learner: str = "linear", seed: int = 0):
        if learner not in FINAL_LEARNERS:
            raise ValueError(f"learner must be one of {FINAL_LEARNERS}, got {learner!r}")
        self.learner = learner
        self.seed = seed

    def fit(self, V: np.ndarray, gamma: np.ndarray, shared_scale=None) -> "FinalStage":
        """``shared_scale``: mask of columns divided by one common scale (their largest sd)
        instead of each by its own (the image components); the others are standardised."""
        V = np.asarray(V, dtype=float)
        gamma = np.asarray(gamma, dtype=float)
        n, p = V.shape
        if self.learner == "boosting":
            self.model_ = HistGradientBoostingRegressor(
                max_iter=200, learning_rate=0.05, max_leaf_nodes=7, min_samples_leaf=40,
                l2_regularization=1.0, early_stopping=n >= 100, validation_fraction=0.2,
                n_iter_no_change=10, random_state=self.seed,
            ).fit(V, gamma)
            return self
        self.mean_ = V.mean(axis=0)
        std = V.std(axis=0)
        scale = np.where(std > 0, std, 1.0)
        shared = np.zeros(p, dtype=bool) if shared_scale is None else np.asarray(shared_scale, dtype=bool)
        if shared.shape != (p,):
            raise ValueError(f"shared_scale must be a mask of {p} columns, got shape {shared.shape}")
        if shared.any():
            scale[shared] = max(float(std[shared].max()), 1e-12)
        self.scale_ = scale
        Z = (V - self.mean_) / self.scale_
        self.intercept_ = float(gamma.mean())
        self.alpha_, self.coef_ = _ridge_loo(Z, gamma - self.intercept_, FINAL_ALPHAS)
        residual = gamma - (Z @ self.coef_ + self.intercept_)
        # HC0 sandwich of the ridge coefficients (Z is centred, so the intercept decouples).
        A_inv = np.linalg.inv(Z.T @ Z + self.alpha_ * np.eye(p))
        meat = (Z * residual[:, None] ** 2).T @ Z
        self.coef_cov_ = A_inv @ meat @ A_inv
        self.intercept_var_ = float(np.mean(residual**2) / n)
        return self

    def predict(self, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CATE predictions and their standard errors (NaN for boosting)."""
        V = np.asarray(V, dtype=float)
        if self.learner == "boosting":
            return self.model_.predict(V), np.full(len(V), np.nan)
        Z = (V - self.mean_) / self.scale_
        tau = Z @ self.coef_ + self.intercept_
        var = np.einsum("ij,jk,ik->i", Z, self.coef_cov_, Z) + self.intercept_var_
        return tau, np.sqrt(np.maximum(var, 0.0))

    def linear_map(self) -> tuple[np.ndarray, float]:
        """(w, b) with tau(V) = V @ w + b: the linear final stage on the original feature scale."""
        if self.learner != "linear":
            raise ValueError("only the linear final stage is a linear map")
        w = self.coef_ / self.scale_
        return w, float(self.intercept_ - self.mean_ @ w)

    def to_dict(self) -> dict:
        if self.learner != "linear":
            raise ValueError("only the linear final stage can be stored as plain arrays")
        return {
            "learner": self.learner, "seed": self.seed, "alpha": self.alpha_, "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(), "coef": self.coef_.tolist(), "intercept": self.intercept_,
            "coef_cov": self.coef_cov_.tolist(), "intercept_var": self.intercept_var_,
        }

    @classmethod
    def from_dict(cls, state: dict) -> "FinalStage":
        model = cls(state["learner"], state["seed"])
        model.alpha_ = float(state["alpha"])
        model.mean_ = np.asarray(state["mean"], dtype=float)
        model.scale_ = np.asarray(state["scale"], dtype=float)
        model.coef_ = np.asarray(state["coef"], dtype=float)
        model.intercept_ = float(state["intercept"])
        model.coef_cov_ = np.asarray(state["coef_cov"], dtype=float)
        model.intercept_var_ = float(state["intercept_var"])
        return model


def cross_fit_final(
    V: np.ndarray, gamma: np.ndarray, fold_ids: np.ndarray, learner: str = "linear", seed: int = 0,
    shared_scale=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out CATE predictions: fold k predicted by a final stage fitted on the other folds."""
    tau = np.empty(len(gamma))
    se = np.empty(len(gamma))
    for k in np.unique(fold_ids):
        test = fold_ids == k
        model = FinalStage(learner, seed).fit(V[~test], gamma[~test], shared_scale)
        tau[test], se[test] = model.predict(V[test])
    return tau, se


# --- the whole CATE stage --------------------------------------------------------------------


@dataclass
class CateFit:
    feature_set: str
    tau_oof: np.ndarray  # held-out predictions
    se_oof: np.ndarray
    model: FinalStage  # fitted on all units
    rate: dict  # target -> RateResult
    pehe: float | None = None
    pehe_constant: float | None = None  # PEHE of predicting the ATE for everyone (baseline)


@dataclass
class CateResult:
    version: str
    features: CateFeatures
    pseudo: PseudoOutcomes
    adjustment_set: str
    fits: dict  # feature set -> CateFit
    predictions: pd.DataFrame  # PREDICTION_COLUMNS
    evaluation: pd.DataFrame  # EVALUATION_COLUMNS

    def model_state(self) -> dict:
        """JSON-able state for transport and saliency: the image PCA and the linear final stages."""
        return {
            "format": "eocausal.cate/1",
            "version": self.version,
            "adjustment_set": self.adjustment_set,
            "pca": None if self.features.pca is None else self.features.pca.to_dict(),
            "final_stages": {
                fs: fit.model.to_dict() for fs, fit in self.fits.items() if fit.model.learner == "linear"
            },
            "feature_names": {fs: self.features.matrix(fs)[1] for fs in self.fits},
        }


def estimate_cate(
    units: pd.DataFrame,
    covariates: list[str],
    *,
    feature_sets=CATE_FEATURE_SETS,
    folds: int = 5,
    seed: int = 0,
    clip: float = 0.01,
    image_components: int = 64,
    stored_pca: PCAReduction | None = None,
    learner: str = "linear",
    nuisance_learner: str = "linear",
    outcome_arms: str = "borrow",
    nuisance_options: dict | None = None,
    context: np.ndarray | None = None,
    groups=None,
    n_bootstrap: int = 200,
    truth_tau=None,
    study_name: str = "",
    version: str = "",
    computed_at=None,
) -> CateResult:
    """DR-learner CATEs for each requested feature set, with RATE (and PEHE given ``truth_tau``).

    ``units``: analysis units (unit_id, lat, lon, treatment, outcome, covariates, embedding).
    Feature sets that the data cannot supply (e.g. tabular without covariates) are skipped.
    ``nuisance_options``: the ATE stage's nuisance options (AnalysisSpec.nuisance_options), so that
    the pseudo-outcomes come from the nuisance models the ATE used. ``context``: the columns the
    ATE's image feature sets end with (:func:`eocausal.estimate.effects.context_columns`, aligned
    with ``units``), which the nuisance models adjust for too (not the effect's features).
    """
    with threadpool_limits(limits=1):  # small matrices: threads only contend (see estimate_effect)
        features = build_features(units, covariates, image_components, seed, stored_pca)
    available = features.available()
    wanted = [fs for fs in feature_sets if fs in available]
    if not wanted:
        raise ValueError(f"none of the CATE feature sets {list(feature_sets)} is available (have {available})")
    # Adjust for every confounder the study has, whatever the effect features are.
    adjustment_set = "tabular+image" if "tabular+image" in available else available[0]
    X_adjust, _ = features.matrix(adjustment_set)
    if context is not None and "image" in adjustment_set:
        X_adjust = np.hstack([X_adjust, context])
    y = units["outcome"].to_numpy(dtype=float)
    d = units["treatment"].to_numpy(dtype=int)
    pseudo = dr_pseudo_outcomes(
        y, d, X_adjust, folds=folds, seed=seed, groups=groups, clip=clip, learner=nuisance_learner,
        outcome_arms=outcome_arms, nuisance_options=nuisance_options,
    )
    truth = None if truth_tau is None else np.asarray(truth_tau, dtype=float)
    if truth is not None and truth.shape != y.shape:
        raise ValueError(f"truth_tau has {truth.size} values for {y.size} units")

    fits: dict[str, CateFit] = {}
    with threadpool_limits(limits=1):
        for fs in wanted:
            V, _ = features.matrix(fs)
            shared = features.image_columns(fs)
            tau_oof, se_oof = cross_fit_final(V, pseudo.score, pseudo.fold_ids, learner, seed, shared)
            model = FinalStage(learner, seed).fit(V, pseudo.score, shared)
            rate = {
                target: rank_average_treatment_effect(
                    pseudo.score, tau_oof, target=target, n_bootstrap=n_bootstrap, seed=seed, clusters=groups
                )
                for target in ("AUTOC", "QINI")
            }
            fit = CateFit(fs, tau_oof, se_oof, model, rate)
            if truth is not None:
                fit.pehe = pehe(tau_oof, truth)
                fit.pehe_constant = pehe(np.full_like(truth, pseudo.score.mean()), truth)
            fits[fs] = fit

    computed_at = computed_at or pd.Timestamp.now(tz="UTC").floor("s")
    predictions = _prediction_table(units, pseudo, fits, study_name, version, computed_at)
    evaluation = _evaluation_table(pseudo, fits, study_name, version, computed_at, len(y))
    return CateResult(version, features, pseudo, adjustment_set, fits, predictions, evaluation)


def _prediction_table(units, pseudo, fits, study_name, version, computed_at) -> pd.DataFrame:
    z = stats.norm.ppf(0.975)
    frames = []
    for fs, fit in fits.items():
        frames.append(pd.DataFrame({
            "study": study_name,
            "cate_version": version,
            "unit_id": units["unit_id"].astype(str).to_numpy(),
            "lat": units["lat"].to_numpy(dtype=float),
            "lon": units["lon"].to_numpy(dtype=float),
            "feature_set": fs,
            "fold": pseudo.fold_ids.astype(int),
            "treatment": units["treatment"].to_numpy(dtype=int),
            "outcome": units["outcome"].to_numpy(dtype=float),
            "propensity": pseudo.propensity,
            "pseudo_outcome": pseudo.score,
            "cate": fit.tau_oof,
            "cate_std_error": fit.se_oof,
            "cate_ci_low": fit.tau_oof - z * fit.se_oof,
            "cate_ci_high": fit.tau_oof + z * fit.se_oof,
            "computed_at": computed_at,
        }))
    return pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]


def _evaluation_table(pseudo, fits, study_name, version, computed_at, n) -> pd.DataFrame:
    rows = []

    def row(fs, metric, estimate, se=None, lo=None, hi=None, details=None):
        rows.append({
            "study": study_name, "cate_version": version, "feature_set": fs, "metric": metric,
            "estimate": float(estimate), "std_error": np.nan if se is None else float(se),
            "ci_low": np.nan if lo is None else float(lo), "ci_high": np.nan if hi is None else float(hi),
            "n": int(n), "details": json.dumps(diag.jsonable(details or {}), sort_keys=True),
            "computed_at": computed_at,
        })

    for fs, fit in fits.items():
        for target, r in fit.rate.items():
            row(fs, f"rate_{target.lower()}", r.estimate, r.std_error, r.ci_low, r.ci_high, {
                "q": r.q, "toc": r.toc, "toc_std_error": r.toc_std_error, "n_bootstrap": r.n_bootstrap,
                "p_value": r.p_value, "normalisation": "grf",
            })
        if fit.pehe is not None:
            row(fs, "pehe", fit.pehe, details={"predictions": "held-out folds",
                                               "pehe_constant_ate": fit.pehe_constant})
        row(fs, "cate_sd", float(np.std(fit.tau_oof)),
            details={"final_alpha": getattr(fit.model, "alpha_", None), "learner": fit.model.learner})
    return pd.DataFrame(rows, columns=EVALUATION_COLUMNS)
