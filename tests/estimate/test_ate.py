"""Estimators checked against simulated data with a known effect."""

import json

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from eocausal.estimate import ESTIMATORS, EffectResult, estimate_effect
from eocausal.estimate.nuisance import NuisanceSpec, propensity_model

TAU = 1.0


def simulate_confounded(n, p=5, seed=0, tau=TAU, strength=1.0):
    """Treatment and outcome both driven by x0..x2: the difference in means is biased upwards."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    logit = strength * (0.9 * X[:, 0] - 0.7 * X[:, 1] + 0.5 * X[:, 2])
    d = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    y = 2.0 * X[:, 0] - 1.0 * X[:, 1] + 0.5 * X[:, 2] + tau * d + rng.standard_normal(n)
    return y, d, X


def simulate_randomised(n, p=5, seed=0, tau=TAU):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    d = (rng.random(n) < 0.5).astype(int)
    y = X[:, 0] + 0.5 * X[:, 1] + tau * d + rng.standard_normal(n)
    return y, d, X


def test_difference_in_means_is_biased_and_adjusted_estimators_recover_truth():
    y, d, X = simulate_confounded(2000, p=8, seed=11)
    naive = estimate_effect(y, d, X, estimator="difference_in_means")
    assert naive.estimate - TAU > 8 * naive.std_error  # strongly biased upwards
    assert not naive.ci_low <= TAU <= naive.ci_high
    for estimator in ("ipw", "aipw", "dml"):
        result = estimate_effect(y, d, X, estimator=estimator)
        assert abs(result.estimate - TAU) < 3 * result.std_error, (estimator, result)
        assert result.ci_low < result.estimate < result.ci_high
        assert result.n == 2000 and result.estimator == estimator and result.estimand == "ATE"


def test_aipw_monte_carlo_coverage_and_standard_errors():
    # 60 studies of n = 500 from the confounded design; the CI should cover tau about 95 % of
    # the time, and the reported SE should match the spread of the estimates.
    estimates, std_errors, covered = [], [], []
    for rep in range(60):
        y, d, X = simulate_confounded(500, p=5, seed=1000 + rep)
        r = estimate_effect(y, d, X, estimator="aipw", seed=rep)
        estimates.append(r.estimate)
        std_errors.append(r.std_error)
        covered.append(r.ci_low <= TAU <= r.ci_high)
    estimates = np.array(estimates)
    coverage = np.mean(covered)
    se_ratio = np.mean(std_errors) / estimates.std(ddof=1)
    mc_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    print(f"AIPW MC: coverage {coverage:.3f}, SE/sd {se_ratio:.3f}, bias {estimates.mean() - TAU:+.4f}")
    assert 0.85 <= coverage <= 1.0
    assert 0.8 <= se_ratio <= 1.25
    assert abs(estimates.mean() - TAU) < 3 * mc_error


def test_the_smaller_arms_outcome_model_borrows_the_larger_arms():
    # A 15 % treated arm and a confounder spread over 60 features: fitted on its own ~70 training
    # units the treated arm's ridge shrinks to its mean; as the control model plus a model of its
    # residuals it learns only how it differs, and AIPW leans less on the propensity weights.
    rng = np.random.default_rng(1)
    n, p = 600, 60
    X = rng.standard_normal((n, p))
    confounder = X @ rng.standard_normal(p) / np.sqrt(p)
    d = (rng.random(n) < 1 / (1 + np.exp(2.0 - confounder))).astype(int)
    y = 2.0 * confounder + TAU * d + rng.standard_normal(n)
    fits = {arms: estimate_effect(y, d, X, estimator="aipw", outcome_arms=arms) for arms in ("borrow", "separate")}
    borrow, separate = fits["borrow"], fits["separate"]
    assert borrow.diagnostics["outcome_r2"]["treated"] > separate.diagnostics["outcome_r2"]["treated"] + 0.3
    assert borrow.std_error < separate.std_error and abs(borrow.estimate - TAU) < 2 * borrow.std_error
    assert borrow.diagnostics["outcome_arms"].startswith("borrow: the control arm's model")
    assert separate.diagnostics["outcome_arms"].startswith("separate")
    assert borrow.diagnostics["outcome_r2"]["control"] == separate.diagnostics["outcome_r2"]["control"]


def test_randomised_design_estimators_agree():
    y, d, X = simulate_randomised(1500, seed=5)
    results = {e: estimate_effect(y, d, X, estimator=e) for e in ESTIMATORS}
    reference = results["difference_in_means"]
    for estimator, r in results.items():
        assert abs(r.estimate - TAU) < 3 * r.std_error, estimator
        # Same data, all consistent for the same effect: differences far below one sampling SE.
        assert abs(r.estimate - reference.estimate) < reference.std_error, estimator
    # Adjusting for prognostic covariates should tighten the interval, not widen it.
    assert results["aipw"].std_error < reference.std_error
    assert results["dml"].std_error < reference.std_error


def test_without_features_every_estimator_is_the_difference_in_means():
    y, d, _ = simulate_confounded(300, seed=2)
    reference = estimate_effect(y, d, None, estimator="difference_in_means")
    assert reference.estimate == pytest.approx(y[d == 1].mean() - y[d == 0].mean(), abs=1e-12)
    neyman = np.sqrt(y[d == 1].var(ddof=1) / d.sum() + y[d == 0].var(ddof=1) / (1 - d).sum())
    assert reference.std_error == pytest.approx(neyman, rel=0.02)
    for estimator in ("ipw", "aipw", "dml"):
        r = estimate_effect(y, d, None, estimator=estimator)
        assert r.estimate == pytest.approx(reference.estimate, abs=1e-10), estimator
        assert r.std_error == pytest.approx(reference.std_error, rel=0.02), estimator
        assert r.diagnostics["cross_fitted"] is False


def test_att_differs_from_ate_and_is_recovered():
    # The effect grows with x0, and treated units have high x0: ATT well above ATE (= 1).
    rng = np.random.default_rng(21)
    n = 3000
    X = rng.standard_normal((n, 4))
    d = (rng.random(n) < 1 / (1 + np.exp(-1.2 * X[:, 0] + 0.5 * X[:, 1]))).astype(int)
    effect = 1.0 + 1.5 * X[:, 0]
    y = X[:, 0] + X[:, 1] + effect * d + rng.standard_normal(n)
    true_att = effect[d == 1].mean()
    assert true_att > 1.6  # the design really separates ATT from ATE
    for estimator in ("aipw", "ipw"):
        att = estimate_effect(y, d, X, estimator=estimator, estimand="ATT")
        assert att.estimand == "ATT"
        assert abs(att.estimate - true_att) < 3 * att.std_error, (estimator, att.estimate, true_att)
        assert abs(att.estimate - 1.0) > 3 * att.std_error, estimator  # not the ATE
    ate = estimate_effect(y, d, X, estimator="aipw", estimand="ATE")
    assert abs(ate.estimate - effect.mean()) < 3 * ate.std_error


def test_dml_att_is_refused_with_a_clear_message():
    y, d, X = simulate_confounded(100)
    with pytest.raises(ValueError, match="'dml' with estimand 'ATT'"):
        estimate_effect(y, d, X, estimator="dml", estimand="ATT")


def test_cluster_robust_se_exceeds_naive_with_clustered_noise():
    # 40 villages of 25 units; treatment and a large shock are shared within a village.
    rng = np.random.default_rng(4)
    village = np.repeat(np.arange(40), 25)
    X = rng.standard_normal((1000, 3))
    d = (rng.random(40) < 0.5).astype(int)[village]
    y = X[:, 0] + TAU * d + 2.0 * rng.standard_normal(40)[village] + rng.standard_normal(1000)
    for estimator in ("difference_in_means", "aipw"):
        naive = estimate_effect(y, d, X, estimator=estimator)
        clustered = estimate_effect(y, d, X, estimator=estimator, groups=village)
        assert clustered.std_error > 2.5 * naive.std_error, estimator
        assert clustered.diagnostics["n_clusters"] == 40
        # t critical value with G - 1 = 39 df, wider than the normal one.
        assert clustered.diagnostics["critical_value"] > 1.96
    assert clustered.diagnostics["fold_scheme"].startswith("group-wise")


def test_high_dimensional_features_give_finite_results():
    rng = np.random.default_rng(8)
    n, p = 400, 2000
    X = rng.standard_normal((n, p))
    d = (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(int)
    y = X[:, 0] + TAU * d + rng.standard_normal(n)
    for estimator in ESTIMATORS:
        r = estimate_effect(y, d, X, estimator=estimator)
        assert np.isfinite([r.estimate, r.std_error, r.ci_low, r.ci_high]).all(), estimator
        assert r.std_error > 0


def test_row_space_projection_leaves_the_propensity_model_unchanged():
    # With p > n the l2-penalised logistic model is fitted on the n-dimensional row space;
    # predictions must match the model fitted on all p columns.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 300))
    d = (rng.random(120) < 1 / (1 + np.exp(-2 * X[:, 0]))).astype(int)
    X_new = rng.standard_normal((50, 300))
    reference = NuisanceSpec(seed=0, solver="sklearn")  # the scikit-learn pipeline it speeds up
    with threadpool_limits(limits=1):  # as estimate_effect runs it; threads only contend here
        projected = propensity_model(reference, smaller_class_count=40).fit(X, d)
        full = propensity_model(reference, smaller_class_count=40)
        full.set_params(rowspace="passthrough").fit(X, d)
    assert projected.named_steps["rowspace"].basis_.shape[1] <= 120
    assert projected.named_steps["model"].C_ == full.named_steps["model"].C_
    np.testing.assert_allclose(projected.predict_proba(X_new), full.predict_proba(X_new), atol=1e-3)


def test_same_seed_gives_identical_results():
    y, d, X = simulate_confounded(300, seed=3)
    for learner in ("linear", "boosting"):
        a = estimate_effect(y, d, X, estimator="aipw", seed=4, learner=learner)
        b = estimate_effect(y, d, X, estimator="aipw", seed=4, learner=learner)
        assert a.estimate == b.estimate and a.std_error == b.std_error, learner
        assert a.to_dict() == b.to_dict()
    c = estimate_effect(y, d, X, estimator="aipw", seed=5)
    assert c.estimate != a.estimate  # a different seed changes the folds


def test_boosting_learner_recovers_a_nonlinear_confounder():
    rng = np.random.default_rng(9)
    n = 2000
    X = rng.uniform(-2, 2, size=(n, 3))
    confounder = (np.abs(X[:, 0]) > 1).astype(float)  # a step the linear models cannot see
    d = (rng.random(n) < np.where(confounder == 1, 0.75, 0.25)).astype(int)
    y = 3.0 * confounder + TAU * d + rng.standard_normal(n)
    boosted = estimate_effect(y, d, X, estimator="aipw", learner="boosting")
    linear = estimate_effect(y, d, X, estimator="aipw", learner="linear")
    assert abs(boosted.estimate - TAU) < 3 * boosted.std_error
    assert abs(linear.estimate - TAU) > 3 * linear.std_error


def test_dataframe_features_and_pca_option():
    y, d, X = simulate_confounded(400, p=30, seed=6)
    frame = pd.DataFrame(X[:, :3], columns=["income", "roads", "density"]).join(
        pd.DataFrame(X[:, 3:], columns=[f"emb{j}" for j in range(27)])
    )
    r = estimate_effect(
        y, d, frame, estimator="aipw", balance_columns=["roads", "income"],
        pca_components=4, pca_columns=[f"emb{j}" for j in range(27)],
    )
    assert [row["column"] for row in r.diagnostics["balance"]["columns"]] == ["roads", "income"]
    assert r.diagnostics["pca_components"] == 4
    assert len(r.diagnostics["balance_components"]["columns"]) == 4
    assert abs(r.estimate - TAU) < 3 * r.std_error


def test_result_serialises_to_plain_json():
    y, d, X = simulate_confounded(300, seed=1)
    r = estimate_effect(y, d, X, estimator="dml")
    assert isinstance(r, EffectResult)
    payload = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert set(payload) == {
        "estimand", "estimator", "estimate", "std_error", "ci_low", "ci_high", "n", "diagnostics",
    }
    assert payload["diagnostics"]["folds"] == 5


@pytest.mark.parametrize(
    "y, d, message",
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], [0, 1, 2, 0, 1], "binary 0/1"),
        ([1.0, np.nan, 3.0, 4.0, 5.0], [0, 1, 1, 0, 0], "must be finite"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [0, 0, 0, 0, 0], "at least 2 units; got 0 treated"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [0, 1, 0, 0, 0], "got 1 treated and 4 control"),
        ([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1, 1], "lengths must match"),
        ([1.0, 2.0, 3.0, 4.0], [0, 1, np.nan, 1], "binary 0/1"),
    ],
)
def test_input_validation_names_the_rule(y, d, message):
    with pytest.raises(ValueError, match=message):
        estimate_effect(np.array(y), np.array(d), estimator="difference_in_means")


def test_feature_and_option_validation():
    y, d, X = simulate_confounded(50)
    bad = X.copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"X must be finite: 1 row.*x2"):
        estimate_effect(y, d, bad)
    with pytest.raises(ValueError, match="X has 49 rows"):
        estimate_effect(y, d, X[:-1])
    with pytest.raises(ValueError, match="unknown option"):
        estimate_effect(y, d, X, learnr="boosting")
    with pytest.raises(ValueError, match="estimator must be one of"):
        estimate_effect(y, d, X, estimator="tmle")
    with pytest.raises(ValueError, match="no column named 'nope'"):
        estimate_effect(y, d, X, balance_columns=["nope"])


def _monte_carlo(simulate, truth_of, reps, **kwargs):
    """Bias, SE/sd ratio and CI coverage of one estimator over ``reps`` simulated studies."""
    estimates, std_errors, covered = [], [], []
    for rep in range(reps):
        data = simulate(rep)
        truth = truth_of(data)
        r = estimate_effect(*data[:3], seed=rep, **kwargs)
        estimates.append(r.estimate - truth)
        std_errors.append(r.std_error)
        covered.append(r.ci_low <= truth <= r.ci_high)
    errors = np.array(estimates)
    return {
        "bias": errors.mean(),
        "mc_error": errors.std(ddof=1) / np.sqrt(reps),
        "se_ratio": np.mean(std_errors) / errors.std(ddof=1),
        "coverage": np.mean(covered),
    }


@pytest.mark.slow
def test_monte_carlo_all_estimators():
    # 300 studies of n = 500 per estimator (several minutes): run with -m slow.
    def confounded(rep):
        return simulate_confounded(500, p=5, seed=5000 + rep)

    def clustered(rep):
        # 50 clusters of 10; treatment is confounded by x0 and shared within a cluster,
        # the outcome carries a cluster shock.
        rng = np.random.default_rng(9000 + rep)
        cluster = np.repeat(np.arange(50), 10)
        x_cluster = rng.standard_normal(50)
        X = np.column_stack([x_cluster[cluster], rng.standard_normal(500)])
        d = (rng.random(50) < 1 / (1 + np.exp(-x_cluster))).astype(int)[cluster]
        y = 2 * X[:, 0] + X[:, 1] + TAU * d + rng.standard_normal(50)[cluster] + rng.standard_normal(500)
        return y, d, X, cluster

    def heterogeneous(rep):
        rng = np.random.default_rng(7000 + rep)
        X = rng.standard_normal((500, 4))
        d = (rng.random(500) < 1 / (1 + np.exp(-1.2 * X[:, 0] + 0.5 * X[:, 1]))).astype(int)
        effect = 1.0 + 1.5 * X[:, 0]
        y = X[:, 0] + X[:, 1] + effect * d + rng.standard_normal(500)
        return y, d, X, effect

    cases = {
        "aipw": (confounded, lambda data: TAU, {"estimator": "aipw"}),
        "dml": (confounded, lambda data: TAU, {"estimator": "dml"}),
        "ipw": (confounded, lambda data: TAU, {"estimator": "ipw"}),
        "aipw ATT": (
            heterogeneous, lambda data: data[3][data[1] == 1].mean(), {"estimator": "aipw", "estimand": "ATT"},
        ),
    }
    for name, (simulate, truth_of, kwargs) in cases.items():
        stats = _monte_carlo(simulate, truth_of, 300, **kwargs)
        print(name, {k: round(float(v), 4) for k, v in stats.items()})
        assert abs(stats["bias"]) < 3 * stats["mc_error"] + 0.02, name
        if name == "ipw":
            # The Hajek IF treats the propensity as known: conservative for the ATE.
            assert stats["coverage"] >= 0.92 and stats["se_ratio"] >= 0.9, name
        else:
            assert 0.91 <= stats["coverage"] <= 0.99, name
            assert 0.85 <= stats["se_ratio"] <= 1.2, name

    clustered_stats = _monte_carlo(
        clustered, lambda data: TAU, 200, estimator="aipw",
    )
    print("aipw, clusters ignored", {k: round(float(v), 4) for k, v in clustered_stats.items()})
    robust = []
    for rep in range(200):
        y, d, X, cluster = clustered(rep)
        r = estimate_effect(y, d, X, estimator="aipw", groups=cluster, seed=rep)
        robust.append(r.ci_low <= TAU <= r.ci_high)
    print("aipw, cluster-robust coverage", np.mean(robust))
    assert np.mean(robust) >= 0.9
    assert clustered_stats["coverage"] < np.mean(robust)
