"""Nuisance models (propensity and outcome regressions) and their cross-fitting.

The features may be image embeddings with thousands of columns, so the default learners are
penalised linear models whose penalty is tuned by inner cross-validation:

- propensity: StandardScaler + l2 logistic regression (LogisticRegressionCV, log-loss scoring,
  because IPW needs calibrated probabilities, not accuracy);
- outcome: StandardScaler + ridge regression (RidgeCV, efficient leave-one-out).

``learner="boosting"`` swaps in seeded histogram gradient boosting. Optionally a block of columns
(the image embedding) is reduced to its leading principal components inside each fold.
Every random choice is seeded: the same inputs give bit-identical predictions.

The linear models are fitted by :mod:`eocausal.estimate.linear` (``solver="fast"``, the default):
the same statistics — same penalty grids, inner splits, scoring and selection rule — computed
from one SVD per training set with batched Newton-CG, many times faster on wide embeddings.
``solver="sklearn"`` fits the scikit-learn pipelines themselves (the reference, and the check).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin, clone, is_classifier
from sklearn.decomposition import PCA
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from eocausal.estimate.calibration import CALIBRATION_UNDERSMOOTH, CalibratedLogisticCV
from eocausal.estimate.linear import GramBlocks, PenalisedLogisticCV, PenalisedRidgeCV

LEARNERS = ("linear", "boosting")
SOLVERS = ("fast", "sklearn")
# How the two arms' outcome models of the ATE's AIPW score are fitted. "borrow": the larger arm's
# on its own units, the smaller arm's as the larger arm's model plus a model of the smaller arm's
# residuals from it (the X-learner's idea, Kunzel et al. 2019): the smaller arm then learns only
# how it differs, and is shrunk towards the other arm's surface instead of towards its own mean.
# "separate": each arm on its own units. On the confounder zoo (benchmarks/results/zoo/
# outcome_arms.md, 100 replications) borrowing lowers the RMSE on 12 of the 15 designs and leaves
# it equal on the other 3. Fitted alone, the zoo's 97-unit treated arm was shrunk to its mean
# (out-of-fold R² -0.07, now 0.14) and the intervals covered 77 % (now 98 %); with a 390-unit
# control arm they covered 91 % with SEs 30 % too small (now 99 %, SE/sd 1.01).
OUTCOME_ARMS = ("borrow", "separate")
# How the propensity that weights the IPW and AIPW scores is fitted. "likelihood": the penalised
# logistic regression by log-likelihood (one model, also behind DML and the overlap diagnostics).
# "calibrated": one logistic model per arm by the calibration loss, whose weights balance the arm's
# features to the whole sample's (eocausal.estimate.calibration says why); the likelihood model is
# still fitted for DML, trimming and the overlap diagnostics.
PROPENSITY_FITS = ("likelihood", "calibrated")
PROPENSITY_CS = 10  # LogisticRegressionCV picks C from logspace(-4, 4, 10)
INNER_FOLDS = 3
# The spec'd grid logspace(-3, 4) extended upwards: with thousands of standardised embedding
# columns a useful ridge penalty is of the order of the number of columns or more, and a grid
# that stops short forces an overfitted outcome model.
OUTCOME_ALPHAS = np.logspace(-3, 6, 19)
# Below this many units of the smaller class (or outcome observations) inner CV is meaningless.
MIN_FOR_INNER_CV = INNER_FOLDS
# Shallow, slow-learning trees; the number of rounds is tuned on a seeded 20 % validation split
# when there are enough units for one.
_BOOSTING = dict(
    max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
    l2_regularization=1.0, validation_fraction=0.2, n_iter_no_change=10,
)
MIN_FOR_EARLY_STOPPING = 50
# The penalised linear nuisances are refitted at a quarter of the penalty their inner CV picks
# (C x 4, alpha / 4). Cross-validation picks the best *predictor*; a doubly robust score needs
# nuisances with little *bias*, and the CV choice over-shrinks the confounder's coefficient with
# the rest (on the confounder zoo it left 0.5 SE of bias in tabular+image AIPW; undersmoothing by
# 4 brought it under 0.3 SE at a modest cost in variance: benchmarks/results/zoo/).
UNDERSMOOTH = 4.0
# The propensity is undersmoothed at every study size. With few training rows per feature (a
# 160-unit study with 64 image components) the weaker penalty sends some propensities to the
# clipping bounds although the design has overlap, so there the overlap *diagnostics* come from a
# second fit at the CV penalty (the best predictor of the propensity, which is what overlap is
# about), while the estimates keep the undersmoothed one. An earlier rule that dropped the
# undersmoothing below this many rows per feature cost the two smallest zoo designs 2 SE of bias
# (demo_proximity_900 +1.5 -> +2.9 SE, procedural_vegetation_900_n500 +0.5 -> +2.6 SE, 30
# replications each): benchmarks/results/zoo/README.md.
OVERLAP_REFIT_BELOW_ROWS_PER_FEATURE = 10


@dataclass(frozen=True)
class NuisanceSpec:
    """How nuisance models are built: learner, seed and optional per-fold PCA of some columns."""

    learner: str = "linear"
    seed: int = 0
    pca_components: int | None = None
    pca_columns: tuple[int, ...] | None = None  # column indexes to reduce; None = all columns
    solver: str = "fast"  # linear learner only: "fast" (eocausal.estimate.linear) | "sklearn"
    undersmooth: float = UNDERSMOOTH  # linear learner only: final fit at penalty / undersmooth
    outcome_arms: str = "borrow"  # OUTCOME_ARMS
    propensity_fit: str = "likelihood"  # PROPENSITY_FITS
    # The caller's own scikit-learn estimators (cloned for every fit), in place of ``learner`` for
    # that nuisance: a classifier with predict_proba for the propensity, a regressor for the outcomes.
    propensity_learner: object = field(default=None, compare=False)
    outcome_learner: object = field(default=None, compare=False)

    def __post_init__(self):
        check_own_learners(self.propensity_learner, self.outcome_learner)
        if not (self.undersmooth >= 1.0):
            raise ValueError(f"undersmooth must be >= 1 (1 = the CV choice), got {self.undersmooth!r}")
        if self.learner not in LEARNERS:
            raise ValueError(f"learner must be one of {LEARNERS}, got {self.learner!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.outcome_arms not in OUTCOME_ARMS:
            raise ValueError(f"outcome_arms must be one of {OUTCOME_ARMS}, got {self.outcome_arms!r}")
        if self.propensity_fit not in PROPENSITY_FITS:
            raise ValueError(f"propensity_fit must be one of {PROPENSITY_FITS}, got {self.propensity_fit!r}")
        if self.propensity_fit == "calibrated" and (self.learner != "linear" or self.propensity_learner is not None):
            raise ValueError("propensity_fit 'calibrated' fits its own penalised linear models by the calibration "
                             "loss: it cannot be combined with learner 'boosting' or an own propensity learner")
        if self.pca_components is not None and int(self.pca_components) < 1:
            raise ValueError(f"pca_components must be a positive integer, got {self.pca_components!r}")


def check_own_learners(propensity=None, outcome=None) -> None:
    """Reject what cannot serve as the caller's own propensity or outcome learner, by name."""
    roles = (("propensity", propensity, ("fit", "predict_proba")), ("outcome", outcome, ("fit", "predict")))
    for role, est, needs in roles:
        if est is None:
            continue
        if isinstance(est, type):
            raise ValueError(f"learners[{role!r}] must be an estimator instance, got the class {est.__name__}; "
                             f"write {est.__name__}()")
        missing = [m for m in needs if not callable(getattr(est, m, None))]
        if missing or not hasattr(est, "get_params"):
            raise ValueError(f"learners[{role!r}] must be a scikit-learn-compatible estimator with get_params and "
                             f"{' and '.join(needs)}; {type(est).__name__} lacks {missing or ['get_params']}")
        if role == "propensity" and not is_classifier(est):
            raise ValueError(f"learners['propensity'] must be a classifier (predict_proba of D=1); "
                             f"{type(est).__name__} is not")


# Learners a study file can name (analysis.learners), per nuisance role, with their defaults; the
# study's params are passed on as keyword arguments. "linear" is the built-in default.
NAMED_LEARNERS = {
    "boosting": ("sklearn.ensemble.HistGradientBoostingClassifier", "sklearn.ensemble.HistGradientBoostingRegressor",
                 {**_BOOSTING, "early_stopping": True}),
    "random_forest": ("sklearn.ensemble.RandomForestClassifier", "sklearn.ensemble.RandomForestRegressor",
                      {"n_estimators": 500, "min_samples_leaf": 5, "n_jobs": 1}),
    "extra_trees": ("sklearn.ensemble.ExtraTreesClassifier", "sklearn.ensemble.ExtraTreesRegressor",
                    {"n_estimators": 500, "min_samples_leaf": 5, "n_jobs": 1}),
    "lasso": ("sklearn.linear_model.LogisticRegressionCV", "sklearn.linear_model.LassoCV",
              {}),
    "knn": ("sklearn.neighbors.KNeighborsClassifier", "sklearn.neighbors.KNeighborsRegressor",
            {"n_neighbors": 25}),
}
_NAMED_ROLE_DEFAULTS = {("lasso", "propensity"): {"l1_ratios": (1.0,), "solver": "saga", "Cs": 10, "max_iter": 2000,
                                                  "scoring": "neg_log_loss", "use_legacy_attributes": False},
                        ("lasso", "outcome"): {"n_alphas": 30, "max_iter": 5000}}


def named_learner(name: str, role: str, params: dict | None = None, seed: int = 0):
    """The study file's learner ``name`` for ``role`` ("propensity" | "outcome") with ``params``
    over its defaults (random_state = the analysis seed where the estimator has one); None for
    "linear", the built-in default. Unknown names or parameters: ValueError naming them."""
    import importlib

    if name == "linear":
        if params:
            raise ValueError(f"learner 'linear' (the built-in default) takes no params, got {sorted(params)}")
        return None
    if name not in NAMED_LEARNERS:
        raise ValueError(f"unknown learner {name!r}; choose from {['linear', *NAMED_LEARNERS]}")
    classifier, regressor, defaults = NAMED_LEARNERS[name]
    module, _, cls_name = (classifier if role == "propensity" else regressor).rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    accepted = cls().get_params()
    kwargs = {**defaults, **_NAMED_ROLE_DEFAULTS.get((name, role), {})}
    if "random_state" in accepted:
        kwargs["random_state"] = seed
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ValueError(f"learner {name!r} ({cls_name}) has no parameter(s) {unknown}; its parameters are "
                         f"{sorted(accepted)}")
    kwargs.update(params or {})
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def learner_names(spec: "NuisanceSpec") -> dict[str, str]:
    """Which learner fits each nuisance, for the diagnostics."""
    default = {"linear": "penalised linear (l2, inner-CV penalty" + (f", undersmoothed x{spec.undersmooth:g})"
                                                                      if spec.undersmooth != 1.0 else ")"),
               "boosting": "histogram gradient boosting"}[spec.learner]
    return {
        "propensity": _describe(spec.propensity_learner) if spec.propensity_learner is not None else default,
        "outcome": _describe(spec.outcome_learner) if spec.outcome_learner is not None else default,
    }


def _describe(est) -> str:
    text = repr(est)
    return " ".join(text.split())[:300]


@dataclass
class CrossFitLog:
    """What the nuisance fits chose, per fold, for the diagnostics."""

    penalties: list[float] = field(default_factory=list)  # C (propensity) or alpha (outcome)
    convergence_warnings: int = 0


class RowSpaceProjection(TransformerMixin, BaseEstimator):
    """Projects onto the row space of the training matrix when it has more columns than rows.

    An l2 penalty is invariant to rotations and the penalised optimum lies in the span of the
    training rows, so an l2-penalised linear model fitted on X V (V: right singular vectors of
    the training X) is the same model as one fitted on X, while the solver works with at most n
    columns instead of p. Inner CV subsets span a subspace of the same rows, so tuning is
    unchanged too.
    Only valid in front of l2-penalised linear models.
    """

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        n, p = X.shape
        if p <= n:
            self.basis_ = None
            return self
        # Right singular vectors from the n x n Gram matrix: O(n^2 p), far cheaper than an SVD of
        # X when p >> n. Directions with negligible variance are dropped (relative 1e-10 in
        # eigenvalue, 1e-5 in singular value), which changes no fitted value materially.
        eigenvalues, eigenvectors = np.linalg.eigh(X @ X.T)
        keep = eigenvalues > eigenvalues[-1] * 1e-10
        keep[-1] = True  # an all-zero matrix still needs one (zero) column downstream
        scale = np.sqrt(np.maximum(eigenvalues[keep], np.finfo(float).tiny))
        self.basis_ = (X.T @ eigenvectors[:, keep]) / scale
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        return X if self.basis_ is None else X @ self.basis_


class ComponentReduction(TransformerMixin, BaseEstimator):
    """Replaces ``columns`` by the first ``n_components`` principal components of their
    standardised values (embedding features come on different scales), fitted on the training
    data only so the reduction stays inside each fold; other columns pass through."""

    def __init__(self, n_components: int = 64, columns: tuple[int, ...] | None = None, seed: int = 0):
        self.n_components = n_components
        self.columns = columns
        self.seed = seed

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        p = X.shape[1]
        self.reduced_ = np.arange(p) if self.columns is None else np.asarray(self.columns, dtype=int)
        self.kept_ = np.setdiff1d(np.arange(p), self.reduced_)
        k = int(min(self.n_components, X.shape[0] - 1, len(self.reduced_)))
        self.scaler_ = StandardScaler().fit(X[:, self.reduced_])  # constant columns stay 0
        block = self.scaler_.transform(X[:, self.reduced_])
        self.pca_ = PCA(n_components=max(k, 1), random_state=self.seed).fit(block)
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=float)
        block = self.scaler_.transform(X[:, self.reduced_])
        return np.hstack([X[:, self.kept_], self.pca_.transform(block)])


class _Undersmoothed(BaseEstimator):
    """A scikit-learn ``LogisticRegressionCV``/``RidgeCV`` whose penalty, once chosen by its CV, is
    divided by ``factor`` for the final fit (the reference for the fast solvers' ``undersmooth``)."""

    def __init__(self, cv_model, factor: float = UNDERSMOOTH):
        self.cv_model = cv_model
        self.factor = factor

    def fit(self, X, y):
        from sklearn.base import clone
        from sklearn.linear_model import Ridge

        chooser = clone(self.cv_model).fit(X, y)
        if hasattr(chooser, "C_"):
            self.C_ = float(np.ravel(chooser.C_)[0]) * self.factor
            self.model_ = LogisticRegression(C=self.C_, solver="lbfgs", max_iter=300).fit(X, y)
            self.classes_ = self.model_.classes_
        else:
            self.alpha_ = float(chooser.alpha_) / self.factor
            self.model_ = Ridge(alpha=self.alpha_).fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model_.predict_proba(X)

    def predict(self, X):
        return self.model_.predict(X)


class UndersmoothedClassifier(ClassifierMixin, _Undersmoothed):
    pass


class UndersmoothedRegressor(RegressorMixin, _Undersmoothed):
    pass


def mean_log_likelihood(estimator, X, y) -> float:
    """Scorer for the inner CV: mean Bernoulli log-likelihood (= neg_log_loss). Written out
    because scikit-learn's scorer re-validates its inputs on every call, which costs more than
    the fits themselves at the sample sizes here."""
    p = np.clip(estimator.predict_proba(X)[:, 1], 1e-15, 1.0 - 1e-15)
    y = np.asarray(y, dtype=float)
    return float(np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _logistic_cv_options() -> dict:
    # Spell out today's defaults so scikit-learn 1.8+ does not warn about changing ones,
    # while staying valid on older versions that lack these parameters.
    params = inspect.signature(LogisticRegressionCV.__init__).parameters
    options = {}
    if "l1_ratios" in params:
        options["l1_ratios"] = (0.0,)  # pure l2
    if "use_legacy_attributes" in params:
        options["use_legacy_attributes"] = False
    return options


def _front(spec: NuisanceSpec, linear: bool) -> list:
    steps = []
    if spec.pca_components is not None:
        steps.append(("reduce", ComponentReduction(spec.pca_components, spec.pca_columns, spec.seed)))
    if linear:
        steps += [("scale", StandardScaler()), ("rowspace", RowSpaceProjection())]
    return steps


def propensity_model(spec: NuisanceSpec, smaller_class_count: int):
    """An unfitted classifier for P(D=1 | X)."""
    if spec.propensity_learner is not None:
        return Pipeline(_front(spec, linear=False) + [("model", clone(spec.propensity_learner))])
    if spec.learner == "boosting":
        model = HistGradientBoostingClassifier(
            **_BOOSTING, early_stopping=smaller_class_count >= MIN_FOR_EARLY_STOPPING, random_state=spec.seed
        )
        return Pipeline(_front(spec, linear=False) + [("model", model)])
    if smaller_class_count >= MIN_FOR_INNER_CV and spec.solver == "fast":
        # Scaling (and the row space, when p > n) are handled inside the model.
        model = PenalisedLogisticCV(Cs=PROPENSITY_CS, inner_folds=INNER_FOLDS, seed=spec.seed,
                                    undersmooth=spec.undersmooth)
        return Pipeline(_front(spec, linear=False) + [("model", model)])
    if smaller_class_count >= MIN_FOR_INNER_CV:
        model = LogisticRegressionCV(
            Cs=PROPENSITY_CS,
            cv=StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=spec.seed),
            scoring=mean_log_likelihood,
            solver="lbfgs",
            max_iter=300,
            **_logistic_cv_options(),
        )
        if spec.undersmooth != 1.0:
            model = UndersmoothedClassifier(model, spec.undersmooth)
    else:
        # Too few units of one arm to tune the penalty: a fixed, moderate one.
        model = LogisticRegression(C=1.0, max_iter=300)
    return Pipeline(_front(spec, linear=True) + [("model", model)])


def outcome_model(spec: NuisanceSpec, n_train: int):
    """An unfitted regressor for E[Y | X] (on one arm or on all units)."""
    if n_train < MIN_FOR_INNER_CV:
        return DummyRegressor(strategy="mean")
    if spec.outcome_learner is not None:
        return Pipeline(_front(spec, linear=False) + [("model", clone(spec.outcome_learner))])
    if spec.learner == "boosting":
        model = HistGradientBoostingRegressor(
            **_BOOSTING, early_stopping=n_train >= MIN_FOR_EARLY_STOPPING, random_state=spec.seed
        )
        return Pipeline(_front(spec, linear=False) + [("model", model)])
    if spec.solver == "fast":
        model = PenalisedRidgeCV(alphas=OUTCOME_ALPHAS, undersmooth=spec.undersmooth)
        return Pipeline(_front(spec, linear=False) + [("model", model)])
    model = RidgeCV(alphas=OUTCOME_ALPHAS)
    if spec.undersmooth != 1.0:
        model = UndersmoothedRegressor(model, spec.undersmooth)
    return Pipeline(_front(spec, linear=True) + [("model", model)])


def _chosen_penalty(fitted) -> float | None:
    model = fitted.named_steps["model"] if isinstance(fitted, Pipeline) else fitted
    if hasattr(model, "C_"):
        return float(np.ravel(model.C_)[0])
    if hasattr(model, "alpha_"):
        return float(model.alpha_)
    return None


def _fit_logged(model, X, target, log: CrossFitLog, centred_gram=None):
    fit_params = {}
    if centred_gram is not None and isinstance(model, Pipeline) and len(model.steps) == 1 and isinstance(
        model.named_steps["model"], (PenalisedLogisticCV, PenalisedRidgeCV)
    ):
        fit_params["model__centred_gram"] = centred_gram  # only on the raw columns (no PCA step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, target, **fit_params)
    log.convergence_warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    penalty = _chosen_penalty(model)
    if penalty is not None:
        log.penalties.append(penalty)
    return model


def gram_blocks(X: np.ndarray, d: np.ndarray, fold_ids: np.ndarray, spec: NuisanceSpec) -> GramBlocks | None:
    """Shared Gram blocks for the fast linear fits on the raw columns (p <= n), else None."""
    usable = (spec.learner == "linear" and spec.solver == "fast" and spec.pca_components is None
              and spec.propensity_learner is None and spec.outcome_learner is None)
    if not usable or X.shape[1] > X.shape[0] // 2:
        return None
    return GramBlocks(X, fold_ids, d)


def overlap_refit_needed(spec: NuisanceSpec, n_train: int, n_columns: int) -> bool:
    """Whether the overlap diagnostics need the CV-penalty propensity besides the undersmoothed
    one: undersmoothing is on and the training rows are fewer than
    ``OVERLAP_REFIT_BELOW_ROWS_PER_FEATURE`` per feature (features after any per-fold PCA)."""
    if spec.undersmooth == 1.0 or spec.learner != "linear" or spec.propensity_learner is not None:
        return False
    n_features = n_columns
    if spec.pca_components is not None:
        reduced = n_columns if spec.pca_columns is None else len(spec.pca_columns)
        n_features = n_columns - reduced + min(int(spec.pca_components), reduced)
    return n_train < OVERLAP_REFIT_BELOW_ROWS_PER_FEATURE * max(n_features, 1)


def cross_fit_propensity(
    X: np.ndarray, d: np.ndarray, fold_ids: np.ndarray, spec: NuisanceSpec, grams: GramBlocks | None = None
) -> tuple[np.ndarray, CrossFitLog]:
    """Out-of-fold P(D=1 | X): each fold predicted by a model fitted on the other folds.
    ``grams`` (from :func:`gram_blocks` with the same folds) saves the fast fits' Gram products."""
    e_hat = np.empty(len(d), dtype=float)
    log = CrossFitLog()
    for k in np.unique(fold_ids):
        test = fold_ids == k
        train = ~test
        smaller = int(min(d[train].sum(), (1 - d[train]).sum()))
        gram = None if grams is None else grams.centred(int(k))
        model = _fit_logged(propensity_model(spec, smaller), X[train], d[train], log, gram)
        e_hat[test] = model.predict_proba(X[test])[:, 1]
    return e_hat, log


def cross_fit_calibrated_propensity(
    X: np.ndarray, d: np.ndarray, fold_ids: np.ndarray, spec: NuisanceSpec
) -> tuple[np.ndarray, CrossFitLog, dict[int, dict[int, Pipeline]]]:
    """Out-of-fold propensities for the IPW/AIPW weights by the calibration loss: for a treated
    unit the treated arm's P(D=1 | X), for a control 1 - the control arm's P(D=0 | X), each arm's
    model fitted on the other folds so that its weights balance that arm's features to the
    training units' (eocausal.estimate.calibration). Not a propensity for DML's residual D - e(X),
    which must not see D. Also returns the fitted models by arm and held-out fold (for
    calibration.weight_estimation_influence)."""
    e_hat = np.empty(len(d), dtype=float)
    log = CrossFitLog()
    d = np.asarray(d)
    models: dict[int, dict[int, Pipeline]] = {1: {}, 0: {}}
    for k in np.unique(fold_ids):
        test = fold_ids == k
        train = ~test
        in_arm = {}
        for arm in (1, 0):
            model = Pipeline(_front(spec, linear=False) + [("model", CalibratedLogisticCV(
                seed=spec.seed, undersmooth=CALIBRATION_UNDERSMOOTH))])
            model.fit(X[train], (d[train] == arm).astype(int))
            log.penalties.append(float(model.named_steps["model"].lambda_))
            in_arm[arm] = model.predict_proba(X[test])[:, 1]
            models[arm][int(k)] = model
        e_hat[test] = np.where(d[test] == 1, in_arm[1], 1.0 - in_arm[0])
    return e_hat, log, models


def cross_fit_outcome(
    X: np.ndarray,
    y: np.ndarray,
    fold_ids: np.ndarray,
    spec: NuisanceSpec,
    fit_on: np.ndarray | None = None,
    grams: GramBlocks | None = None,
    arms: tuple[int, ...] = (0, 1),
) -> tuple[np.ndarray, CrossFitLog]:
    """Out-of-fold E[Y | X] for every unit, each model fitted on the other folds' units that are
    in ``fit_on`` (e.g. one treatment arm, for the arm-specific AIPW outcome models).
    ``grams``/``arms``: shared Gram blocks, and the arms ``fit_on`` selects (it must be exactly
    those arms' units)."""
    fit_on = np.ones(len(y), dtype=bool) if fit_on is None else np.asarray(fit_on, dtype=bool)
    y_hat = np.empty(len(y), dtype=float)
    log = CrossFitLog()
    for k in np.unique(fold_ids):
        test = fold_ids == k
        train = ~test & fit_on
        gram = None if grams is None else grams.centred(int(k), arms)
        model = _fit_logged(outcome_model(spec, int(train.sum())), X[train], y[train], log, gram)
        y_hat[test] = model.predict(X[test])
    return y_hat, log


def cross_fit_outcome_arms(
    X: np.ndarray, y: np.ndarray, d: np.ndarray, fold_ids: np.ndarray, spec: NuisanceSpec,
    grams: GramBlocks | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, CrossFitLog], int | None]:
    """Out-of-fold E[Y | X, D=0] and E[Y | X, D=1] for every unit, as ``spec.outcome_arms`` says
    (OUTCOME_ARMS says why). "borrow": the larger arm's model fitted on its units of the other
    folds; the smaller arm's is that model plus one fitted to the smaller arm's residuals from it (on
    its units of the other folds, which the larger arm's model never saw). "separate": each arm's
    model on its own units. Returns the predictions and fit logs by arm, and the arm borrowed from
    (the larger, ties: treated; None when separate)."""
    d = np.asarray(d)
    if spec.outcome_arms == "separate":
        fits = {arm: cross_fit_outcome(X, y, fold_ids, spec, fit_on=d == arm, grams=grams, arms=(arm,))
                for arm in (0, 1)}
        return {arm: fit[0] for arm, fit in fits.items()}, {arm: fit[1] for arm, fit in fits.items()}, None
    larger = int(d.mean() >= 0.5)
    smaller = 1 - larger
    predicted = {0: np.empty(len(y), dtype=float), 1: np.empty(len(y), dtype=float)}
    logs = {0: CrossFitLog(), 1: CrossFitLog()}
    for k in np.unique(fold_ids):
        test = fold_ids == k
        on_larger, on_smaller = ~test & (d == larger), ~test & (d == smaller)
        gram_larger, gram_smaller = (None, None) if grams is None else (
            grams.centred(int(k), (larger,)), grams.centred(int(k), (smaller,)))
        base = _fit_logged(outcome_model(spec, int(on_larger.sum())), X[on_larger], y[on_larger], logs[larger],
                           gram_larger)
        residual = y[on_smaller] - base.predict(X[on_smaller])
        shift = _fit_logged(outcome_model(spec, int(on_smaller.sum())), X[on_smaller], residual, logs[smaller],
                            gram_smaller)
        predicted[larger][test] = base.predict(X[test])
        predicted[smaller][test] = predicted[larger][test] + shift.predict(X[test])
    return predicted, logs, larger
