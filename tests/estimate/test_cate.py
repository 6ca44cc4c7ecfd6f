"""The DR-learner: pseudo-outcomes, the final stage (ridge with exact LOO, sandwich SEs), cross-fitting,
and the CATE stage's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eocausal.estimate.cate import (
    FinalStage,
    _ridge_loo,
    build_features,
    cross_fit_final,
    dr_pseudo_outcomes,
    estimate_cate,
)


def _confounded(n=1200, seed=0):
    """X confounds D and Y; tau(x) = 1 + x0; outcomes with unit noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    e = 1 / (1 + np.exp(-(0.8 * X[:, 0] - 0.5 * X[:, 1])))
    d = (rng.random(n) < e).astype(int)
    tau = 1.0 + X[:, 0]
    y = 2 * X[:, 0] + X[:, 1] - X[:, 2] + tau * d + rng.normal(size=n)
    return X, d, y, tau


def test_pseudo_outcomes_are_unbiased_for_the_effect():
    X, d, y, tau = _confounded()
    po = dr_pseudo_outcomes(y, d, X, folds=5, seed=0)
    # The mean pseudo-outcome is the AIPW ATE; the naive difference in means is far off.
    naive = y[d == 1].mean() - y[d == 0].mean()
    assert abs(po.score.mean() - tau.mean()) < 0.15 < abs(naive - tau.mean())
    # E[Gamma | X] = tau(X): regressing Gamma on x0 recovers slope 1 and intercept 1.
    slope, intercept = np.polyfit(X[:, 0], po.score, 1)
    assert slope == pytest.approx(1.0, abs=0.2)
    assert intercept == pytest.approx(1.0, abs=0.15)
    assert set(np.unique(po.fold_ids)) == set(range(5))
    assert po.diagnostics["propensity"]["auc"] > 0.7



@pytest.mark.parametrize("options", [
    {"propensity_fit": "calibrated"},
    {"outcome_arms": "separate", "learners": {"outcome": {"name": "boosting"}}},
])
def test_pseudo_outcomes_use_the_ate_stages_nuisance_options(options):
    # Their mean is the AIPW estimate that the same options, seed and folds give.
    from eocausal.estimate.ate import estimate_effects
    from eocausal.study import AnalysisSpec

    X, d, y, _ = _confounded(n=600, seed=3)
    nuisance = AnalysisSpec(**options).nuisance_options()
    po = dr_pseudo_outcomes(y, d, X, folds=4, seed=2, nuisance_options=nuisance)
    ate = estimate_effects(y, d, X, estimators=("aipw",), folds=4, seed=2, **nuisance)["aipw"]
    assert po.score.mean() == pytest.approx(ate.estimate, abs=1e-9)
    assert po.diagnostics["aipw_ate_std_error"] == pytest.approx(ate.std_error, rel=1e-6)
    assert po.diagnostics["propensity_fit"] == nuisance["propensity_fit"]
    assert po.diagnostics["outcome_arms"] == nuisance["outcome_arms"]


def test_dr_learner_recovers_the_cate_better_than_a_constant():
    X, d, y, tau = _confounded(n=1500, seed=1)
    po = dr_pseudo_outcomes(y, d, X, folds=5, seed=0)
    tau_hat, se = cross_fit_final(X, po.score, po.fold_ids)
    pehe = np.sqrt(np.mean((tau_hat - tau) ** 2))
    assert pehe < 0.35 < np.std(tau)  # the constant (ATE) predictor has PEHE = sd(tau) = 1
    assert np.corrcoef(tau_hat, tau)[0, 1] > 0.9
    assert (se > 0).all()


def test_ridge_loo_matches_brute_force_leave_one_out():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(40, 6))
    Z -= Z.mean(axis=0)
    y = Z @ rng.normal(size=6) + rng.normal(size=40)
    alphas = np.array([0.1, 1.0, 10.0, 100.0])
    chosen, coef = _ridge_loo(Z, y - y.mean(), alphas)

    def loo_error(alpha):
        errors = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            Zk, yk = Z[keep], y[keep]
            zm, ym = Zk.mean(axis=0), yk.mean()
            b = np.linalg.solve((Zk - zm).T @ (Zk - zm) + alpha * np.eye(6), (Zk - zm).T @ (yk - ym))
            errors.append((y[i] - ym - (Z[i] - zm) @ b) ** 2)
        return np.mean(errors)

    best = alphas[int(np.argmin([loo_error(a) for a in alphas]))]
    assert chosen == best
    np.testing.assert_allclose(coef, np.linalg.solve(Z.T @ Z + chosen * np.eye(6), Z.T @ (y - y.mean())), rtol=1e-8)


def test_final_stage_round_trips_and_exposes_a_linear_map():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(300, 4)) * [1.0, 5.0, 0.2, 3.0]
    g = V @ [0.5, -0.1, 2.0, 0.0] + rng.normal(size=300)
    model = FinalStage().fit(V, g, shared_scale=[False, True, False, True])
    again = FinalStage.from_dict(model.to_dict())
    tau, se = model.predict(V[:10])
    tau2, se2 = again.predict(V[:10])
    np.testing.assert_array_equal(tau, tau2)
    np.testing.assert_array_equal(se, se2)
    w, b = model.linear_map()
    np.testing.assert_allclose(V[:10] @ w + b, tau, rtol=1e-10)
    # shared-scale columns are divided by one scale (the larger sd), the others by their own
    assert model.scale_[1] == model.scale_[3] == pytest.approx(V[:, 1].std())
    assert model.scale_[0] == pytest.approx(V[:, 0].std())


def test_sandwich_standard_error_has_nominal_coverage_for_the_projection():
    """Over repeated samples, the CI of the fitted linear CATE at a point covers the ridge target
    roughly as often as claimed (ridge bias is small here: strong signal, large n)."""
    rng = np.random.default_rng(4)
    x0 = np.array([[1.0, -0.5]])
    covered = 0
    reps = 60
    for _ in range(reps):
        V = rng.normal(size=(800, 2))
        g = 1.0 + V @ [0.7, -0.3] + rng.normal(scale=2.0, size=800)
        tau, se = FinalStage().fit(V, g).predict(x0)
        truth = 1.0 + x0 @ np.array([0.7, -0.3])
        covered += abs(tau[0] - truth[0]) <= 1.96 * se[0]
    assert covered / reps > 0.8


def test_cross_fitted_predictions_do_not_see_their_own_fold():
    rng = np.random.default_rng(5)
    V = rng.normal(size=(200, 3))
    g = V[:, 0] + rng.normal(size=200)
    folds = np.arange(200) % 4
    tau, _ = cross_fit_final(V, g, folds)
    g2 = g.copy()
    g2[folds == 0] += 100.0  # change fold 0's pseudo-outcomes only
    tau2, _ = cross_fit_final(V, g2, folds)
    np.testing.assert_allclose(tau[folds == 0], tau2[folds == 0])
    assert not np.allclose(tau[folds != 0], tau2[folds != 0])


def _units(n=600, seed=6, p_image=32):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)  # a confounder the image sees
    loadings = rng.normal(size=p_image)
    emb = np.outer(z, loadings) + 0.3 * rng.normal(size=(n, p_image))
    proxy = 0.3 * z + rng.normal(size=n)
    e = 1 / (1 + np.exp(-1.2 * z))
    d = (rng.random(n) < e).astype(int)
    tau = 1.0 + 0.8 * z
    y = 1.5 * z + 0.4 * proxy + tau * d + rng.normal(size=n)
    units = pd.DataFrame({
        "unit_id": [f"U{i:04d}" for i in range(n)], "lat": rng.uniform(-1, 1, n), "lon": rng.uniform(-1, 1, n),
        "treatment": d, "outcome": y, "cov_proxy": proxy, "embedding": list(emb.astype(np.float32)),
    })
    return units, tau


def test_cate_stage_tables_and_the_image_beats_the_tabular_features():
    units, tau = _units()
    res = estimate_cate(units, ["cov_proxy"], folds=4, image_components=8, n_bootstrap=50, truth_tau=tau,
                        study_name="s", version="v1")
    assert res.adjustment_set == "tabular+image"
    assert set(res.fits) == {"tabular", "image", "tabular+image"}
    pred = res.predictions
    assert len(pred) == 3 * len(units)
    assert pred.groupby("feature_set")["unit_id"].nunique().eq(len(units)).all()
    # one pseudo-outcome per unit, shared by every feature set
    assert pred.groupby("unit_id")["pseudo_outcome"].nunique().eq(1).all()
    ev = res.evaluation.set_index(["feature_set", "metric"])["estimate"]
    assert ev[("tabular+image", "pehe")] < ev[("tabular", "pehe")]
    autoc = res.evaluation.query("feature_set == 'image' and metric == 'rate_autoc'").iloc[0]
    assert autoc["ci_low"] > 0
    state = res.model_state()
    assert state["pca"]["n_components"] == 8
    assert set(state["final_stages"]) == {"tabular", "image", "tabular+image"}


def test_cate_stage_skips_feature_sets_the_data_cannot_supply():
    units, _ = _units(n=300)
    res = estimate_cate(units, [], folds=3, image_components=4, n_bootstrap=10)
    assert set(res.fits) == {"image"}
    assert res.adjustment_set == "image"
    with pytest.raises(ValueError, match="none of the CATE feature sets"):
        estimate_cate(units, [], feature_sets=("tabular",), folds=3, image_components=4, n_bootstrap=10)


def test_build_features_matches_the_ate_stage_pca():
    from eocausal.embed.reduce import fit_pca
    from eocausal.lake import embedding_matrix

    units, _ = _units(n=200)
    f = build_features(units, ["cov_proxy"], 6, seed=0)
    expected = fit_pca(embedding_matrix(units["embedding"]), 6, seed=0).transform(embedding_matrix(units["embedding"]))
    np.testing.assert_allclose(f.image, expected)
    assert f.image_columns("tabular+image").tolist() == [False] + [True] * 6
