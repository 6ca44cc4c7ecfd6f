"""The fast penalised linear models reproduce the scikit-learn pipelines they stand in for."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from eocausal.estimate.linear import (
    PenalisedLogisticCV,
    PenalisedRidgeCV,
    WhitenedDesign,
    _newton_direct,
    standardise,
)
from eocausal.estimate.nuisance import OUTCOME_ALPHAS, _logistic_cv_options, mean_log_likelihood


def embedding_like(n, p, seed):
    """Correlated, shifted columns (a few strong directions and a weak tail), a confounder z."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4)) @ rng.standard_normal((4, p)) + 0.3 * rng.standard_normal((n, p)) + 3.0
    z = X[:, 0] - X[:, 1]
    z = (z - z.mean()) / z.std()
    d = (rng.random(n) < 1 / (1 + np.exp(-1.2 * z))).astype(int)
    y = 2 * z + d + rng.standard_normal(n)
    return X, d, y


def reference_logistic(seed):
    # lbfgs run to a tight tolerance, so that the comparison measures our solver, not lbfgs's stop.
    return make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=10, cv=StratifiedKFold(3, shuffle=True, random_state=seed), scoring=mean_log_likelihood,
        solver="lbfgs", max_iter=10_000, tol=1e-10, **_logistic_cv_options(),
    ))


@pytest.mark.parametrize("n, p", [(400, 15), (150, 300)])  # p < n, and p > n (row space)
def test_logistic_cv_matches_scikit_learn(n, p):
    X, d, _ = embedding_like(n, p, seed=p)
    X_new = embedding_like(50, p, seed=p + 1)[0]
    with threadpool_limits(limits=1):
        reference = reference_logistic(seed=3).fit(X, d)
        fast = PenalisedLogisticCV(Cs=10, inner_folds=3, seed=3).fit(X, d)
    model = reference[-1]
    assert fast.C_ == pytest.approx(float(np.ravel(model.C_)[0]))
    scores = np.asarray(model.scores_[1] if isinstance(model.scores_, dict) else model.scores_).reshape(3, -1)
    np.testing.assert_allclose(fast.scores_, scores, atol=1e-4)  # near-separable large-C fits: lbfgs stops early
    np.testing.assert_allclose(fast.predict_proba(X_new), reference.predict_proba(X_new), atol=1e-5)
    np.testing.assert_array_equal(fast.predict(X_new), reference.predict(X_new))


@pytest.mark.parametrize("n, p", [(300, 12), (80, 200)])
def test_ridge_loo_matches_scikit_learn(n, p):
    X, _, y = embedding_like(n, p, seed=7)
    X_new = embedding_like(40, p, seed=8)[0]
    reference = make_pipeline(StandardScaler(), RidgeCV(alphas=OUTCOME_ALPHAS)).fit(X, y)
    fast = PenalisedRidgeCV(alphas=OUTCOME_ALPHAS).fit(X, y)
    assert fast.alpha_ == reference[-1].alpha_
    np.testing.assert_allclose(fast.predict(X_new), reference.predict(X_new), rtol=1e-8, atol=1e-8)


def test_whitened_design_products_and_penalty_coordinates():
    rng = np.random.default_rng(0)
    for n, p in [(60, 10), (20, 50)]:
        X = rng.standard_normal((n, p)) * rng.uniform(0.1, 5, p)
        mean, scale = standardise(X)
        Xs = (X - mean) / scale
        design = WhitenedDesign(Xs)
        Q = design.rows(slice(None))
        np.testing.assert_allclose(Q.T @ Q, np.eye(design.rank), atol=1e-8)  # orthonormal columns
        U = rng.standard_normal((design.rank, 3))
        np.testing.assert_allclose(design.dot(U), Q @ U, atol=1e-8)
        np.testing.assert_allclose(design.tdot(Q @ U), U, atol=1e-8)
        np.testing.assert_allclose(design.dot(U, fast=True), Q @ U, rtol=1e-4, atol=1e-4)
        # Coefficients w = T u reproduce the linear predictor, and |w|^2 = sum u^2 / s^2.
        w = design.T @ U[:, 0]
        np.testing.assert_allclose(Xs @ w, Q @ U[:, 0], atol=1e-8)
        assert w @ w == pytest.approx(np.sum(U[:, 0] ** 2 / design.eigenvalues), rel=1e-8)


def test_standardise_matches_standard_scaler_including_constant_columns():
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(5, 2, 100), np.full(100, 3.0), rng.normal(0, 1e-3, 100)])
    scaler = StandardScaler().fit(X)
    mean, scale = standardise(X)
    np.testing.assert_allclose(mean, scaler.mean_)
    np.testing.assert_allclose(scale, scaler.scale_)
    assert scale[1] == 1.0


def test_logistic_cv_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        PenalisedLogisticCV().fit(np.ones((10, 2)), np.zeros(10))


@pytest.mark.parametrize("n, p", [(300, 60), (120, 200)])  # few rows per feature, weakly penalised: CG struggles
def test_exact_newton_steps_reach_the_conjugate_gradients_optimum(n, p, monkeypatch):
    import eocausal.estimate.linear as linear

    X, d, _ = embedding_like(n, p, seed=11)
    with threadpool_limits(limits=1):
        monkeypatch.setattr(linear, "DIRECT_AFTER_CG_PASSES", 10**9)  # conjugate gradients throughout
        cg = PenalisedLogisticCV(Cs=10, seed=1, undersmooth=4.0).fit(X, d)
        monkeypatch.setattr(linear, "DIRECT_AFTER_CG_PASSES", 1)  # exact solves from the second step
        solves = []
        monkeypatch.setattr(linear, "_newton_direct", lambda *a: solves.append(1) or _newton_direct(*a))
        direct = PenalisedLogisticCV(Cs=10, seed=1, undersmooth=4.0).fit(X, d)
    assert solves
    assert direct.C_ == cg.C_
    np.testing.assert_allclose(direct.scores_, cg.scores_, atol=1e-5)  # the largest C: near-separable, flat
    np.testing.assert_allclose(direct.coef_, cg.coef_, rtol=1e-6, atol=1e-7)
