"""Inference checked against hand-computed small cases, and the API options around it:
ATT and cluster-robust standard errors, trimming, repeated cross-fitting, supplied predictions,
several estimators on shared nuisance fits."""

import json

import numpy as np
import pytest
from scipy import stats

from eocausal.estimate import estimate_effect, estimate_effects
from tests.estimate.test_ate import TAU, simulate_confounded

# Six units in three clusters of two; one treated and one control unit per cluster.
Y = np.array([1.0, 3.0, 2.0, 6.0, 4.0, 8.0])
D = np.array([0, 1, 0, 1, 0, 1])
CLUSTERS = np.array(["a", "a", "b", "b", "c", "c"])


def test_difference_in_means_cluster_robust_se_by_hand():
    # Treated mean (3 + 6 + 8)/3 = 17/3, control mean (1 + 2 + 4)/3 = 7/3: estimate 10/3.
    # Influence, share 1/2: 2(y - 17/3) for treated, -2(y - 7/3) for controls, by unit:
    #   8/3, -16/3, 2/3, 2/3, -10/3, 14/3.
    # Cluster sums: a = -8/3, b = 4/3, c = 4/3; their squares sum to 96/9 = 32/3.
    # Variance G/(G-1) * sum / n^2 = 3/2 * 32/3 / 36 = 4/9, so SE = 2/3; t with G - 1 = 2 df.
    r = estimate_effect(Y, D, None, estimator="difference_in_means", groups=CLUSTERS)
    assert r.estimate == pytest.approx(10 / 3, abs=1e-12)
    assert r.std_error == pytest.approx(2 / 3, abs=1e-12)
    t = stats.t.ppf(0.975, df=2)  # 4.3027
    assert r.ci_low == pytest.approx(10 / 3 - t * 2 / 3, abs=1e-12)
    assert r.ci_high == pytest.approx(10 / 3 + t * 2 / 3, abs=1e-12)
    assert r.diagnostics["n_clusters"] == 3

    # Without clusters: sum of squared influence 624/9, variance 624/9 / (n (n - 1)) = 624/270.
    plain = estimate_effect(Y, D, None, estimator="difference_in_means")
    assert plain.std_error == pytest.approx(np.sqrt(624 / 270), abs=1e-12)
    assert plain.ci_low == pytest.approx(10 / 3 - stats.norm.ppf(0.975) * np.sqrt(624 / 270), abs=1e-12)


def test_singleton_clusters_give_the_unclustered_standard_error():
    # G = n clusters of one: n/(n-1) * sum(phi^2) / n^2 = sum(phi^2) / (n (n - 1)); only the
    # critical value changes (t with n - 1 df).
    y, d, _ = simulate_confounded(200, seed=3)
    rng = np.random.default_rng(0)
    predictions = {"propensity": rng.uniform(0.2, 0.8, 200), "outcome_control": rng.normal(size=200),
                   "outcome_treated": rng.normal(size=200)}
    for estimator in ("difference_in_means", "aipw"):
        plain = estimate_effect(y, d, None, estimator=estimator, predictions=predictions)
        singletons = estimate_effect(y, d, None, estimator=estimator, predictions=predictions, groups=np.arange(200))
        assert singletons.estimate == plain.estimate
        assert singletons.std_error == pytest.approx(plain.std_error, rel=1e-12), estimator
        assert singletons.diagnostics["critical_value"] == pytest.approx(stats.t.ppf(0.975, df=199))


# Supplied nuisances for the ATT case: controls have propensity odds 1/4, 1 and 3.
E = np.array([0.2, 0.5, 0.5, 0.5, 0.75, 0.5])
MU0 = np.array([1.5, 2.0, 2.5, 3.0, 3.5, 4.0])


def test_aipw_att_and_its_cluster_robust_se_by_hand():
    # Residuals y - mu0: -0.5, 1, -0.5, 3, 0.5, 4.
    # Score numerator D r - e/(1-e) (1-D) r: 0.125, 1, 0.5, 3, -1.5, 4; sum 7.125.
    # ATT = mean numerator / P(D=1) = (7.125/6) / 0.5 = 2.375.
    # Influence (numerator - D * ATT) / 0.5: 0.25, -2.75, 1, 1.25, -3, 3.25; squares sum to 29.75.
    r = estimate_effect(
        Y, D, None, estimator="aipw", estimand="ATT",
        predictions={"propensity": E, "outcome_control": MU0},
    )
    assert r.estimand == "ATT"
    assert r.estimate == pytest.approx(2.375, abs=1e-12)
    assert r.std_error == pytest.approx(np.sqrt(29.75 / 30), abs=1e-12)
    assert r.diagnostics["cross_fitted"] is False
    assert "supplied" in r.diagnostics["nuisance"]

    # Cluster sums a = -2.5, b = 2.25, c = 0.25; squares 11.375; 3/2 * 11.375 / 36.
    clustered = estimate_effect(
        Y, D, None, estimator="aipw", estimand="ATT", groups=CLUSTERS,
        predictions={"propensity": E, "outcome_control": MU0},
    )
    assert clustered.estimate == pytest.approx(2.375, abs=1e-12)
    assert clustered.std_error == pytest.approx(np.sqrt(1.5 * 11.375 / 36), abs=1e-12)
    assert clustered.ci_high - clustered.estimate == pytest.approx(
        stats.t.ppf(0.975, df=2) * np.sqrt(1.5 * 11.375 / 36), abs=1e-12
    )


def test_ipw_att_by_hand():
    # Hajek ATT: treated mean 17/3 against controls weighted by odds 1/4, 1, 3:
    # (0.25 * 1 + 1 * 2 + 3 * 4) / 4.25 = 14.25 / 4.25.
    r = estimate_effect(Y, D, None, estimator="ipw", estimand="ATT", predictions={"propensity": E})
    assert r.estimate == pytest.approx(17 / 3 - 14.25 / 4.25, abs=1e-12)


def test_aipw_ate_with_supplied_predictions_matches_the_formula():
    mu1 = np.array([3.5, 3.0, 5.0, 5.5, 7.0, 7.5])
    psi = mu1 - MU0 + D * (Y - mu1) / E - (1 - D) * (Y - MU0) / (1 - E)
    r = estimate_effect(
        Y, D, None, estimator="aipw",
        predictions={"propensity": E, "outcome_control": MU0, "outcome_treated": mu1},
    )
    assert r.estimate == pytest.approx(psi.mean(), abs=1e-12)
    assert r.std_error == pytest.approx(psi.std(ddof=1) / np.sqrt(6), abs=1e-12)


def test_att_without_features_is_the_difference_in_means():
    # Constant nuisances: e = share, mu0 = control mean, so the ATT score is the DiM's influence.
    y, d, _ = simulate_confounded(300, seed=2)
    att = estimate_effect(y, d, None, estimator="aipw", estimand="ATT")
    dim = estimate_effect(y, d, None, estimator="difference_in_means")
    assert att.estimate == pytest.approx(dim.estimate, abs=1e-12)
    assert att.std_error == pytest.approx(dim.std_error, abs=1e-12)


def test_supplied_predictions_are_validated():
    with pytest.raises(ValueError, match="also need .*outcome_treated"):
        estimate_effect(Y, D, None, estimator="aipw", predictions={"propensity": E, "outcome_control": MU0})
    with pytest.raises(ValueError, match="unknown key"):
        estimate_effect(Y, D, None, estimator="ipw", predictions={"propensity": E, "ps": E})
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        estimate_effect(Y, D, None, estimator="ipw", predictions={"propensity": E * 2})
    with pytest.raises(ValueError, match="has 5 values for 6 units"):
        estimate_effect(Y, D, None, estimator="ipw", predictions={"propensity": E[:5]})
    with pytest.raises(ValueError, match="nothing to re-split"):
        estimate_effect(Y, D, None, estimator="ipw", predictions={"propensity": E}, repetitions=2)


def test_trimming_drops_units_outside_the_band_and_reports_the_share():
    e = np.array([0.02, 0.5, 0.5, 0.5, 0.75, 0.97])  # units 1 and 6 are outside [0.05, 0.95]
    full = {"propensity": e, "outcome_control": MU0, "outcome_treated": MU0 + 2}
    r = estimate_effect(Y, D, None, estimator="aipw", trim=0.05, predictions=full)
    kept = np.array([False, True, True, True, True, False])
    subset = estimate_effect(
        Y[kept], D[kept], None, estimator="aipw",
        predictions={k: v[kept] for k, v in full.items()},
    )
    assert r.n == 4
    assert r.estimate == pytest.approx(subset.estimate, abs=1e-12)
    assert r.std_error == pytest.approx(subset.std_error, abs=1e-12)
    trimming = r.diagnostics["trimming"]
    assert trimming["n_trimmed"] == 2 and trimming["share_trimmed"] == pytest.approx(2 / 6)
    assert trimming["n_trimmed_by_arm"] == {"treated": 1, "control": 1}
    assert trimming["share_trimmed_by_arm"]["treated"] == pytest.approx(1 / 3)
    assert trimming["n_input"] == 6

    untrimmed = estimate_effect(Y, D, None, estimator="aipw", predictions=full)
    assert untrimmed.n == 6 and untrimmed.diagnostics["trimming"]["share_trimmed"] == 0.0
    with pytest.raises(ValueError, match="both arms need at least 2"):
        estimate_effect(Y, D, None, estimator="aipw", trim=0.45, predictions=full)
    with pytest.raises(ValueError, match=r"trim must be None or a number in \(0, 0.5\)"):
        estimate_effect(Y, D, None, estimator="aipw", trim=0.5, predictions=full)


def test_trimming_with_cross_fitted_propensities():
    y, d, X = simulate_confounded(600, seed=4, strength=2.5)  # poor overlap in the tails
    r = estimate_effect(y, d, X, estimator="aipw", trim=0.05)
    share = r.diagnostics["trimming"]["share_trimmed"]
    assert 0.0 < share < 0.5
    assert r.n == 600 - r.diagnostics["trimming"]["n_trimmed"]
    assert abs(r.estimate - TAU) < 4 * r.std_error  # constant effect: trimming keeps it
    dim = estimate_effect(y, d, X, estimator="difference_in_means", trim=0.05)
    assert dim.diagnostics["trimming"]["applied"] is False and dim.n == 600


def test_repeated_cross_fitting_takes_the_median_over_splits():
    y, d, X = simulate_confounded(400, seed=5)
    single = estimate_effect(y, d, X, estimator="aipw", seed=7)
    assert estimate_effect(y, d, X, estimator="aipw", seed=7, repetitions=1).to_dict() == single.to_dict()
    repeated = estimate_effect(y, d, X, estimator="aipw", seed=7, repetitions=5)
    info = repeated.diagnostics["repeated_cross_fitting"]
    estimates, ses = np.array(info["estimates"]), np.array(info["std_errors"])
    assert info["repetitions"] == 5 and len(set(info["fold_seeds"])) == 5
    assert estimates[0] == pytest.approx(single.estimate, abs=1e-12)  # split 0 is the single split
    assert len(set(np.round(estimates, 12))) > 1  # the other splits differ
    assert repeated.estimate == pytest.approx(np.median(estimates), abs=1e-12)
    expected_se = np.sqrt(np.median(ses**2 + (estimates - np.median(estimates)) ** 2))
    assert repeated.std_error == pytest.approx(expected_se, abs=1e-12)
    assert repeated.std_error >= np.median(ses) - 1e-12
    assert repeated.ci_high - repeated.ci_low == pytest.approx(2 * 1.959964 * expected_se, rel=1e-6)
    with pytest.raises(ValueError, match="repetitions must be an integer >= 1"):
        estimate_effect(y, d, X, repetitions=0)


def test_estimate_effects_matches_single_calls():
    y, d, X = simulate_confounded(300, seed=8)
    together = estimate_effects(y, d, X, trim=0.02)
    assert list(together) == ["difference_in_means", "ipw", "aipw", "dml"]
    for estimator, result in together.items():
        alone = estimate_effect(y, d, X, estimator=estimator, trim=0.02)
        assert json.dumps(result.to_dict(), sort_keys=True) == json.dumps(alone.to_dict(), sort_keys=True)
    att = estimate_effects(y, d, X, estimators=["ipw", "aipw"], estimand="ATT")
    assert set(att) == {"ipw", "aipw"} and "treated" not in att["aipw"].diagnostics["outcome_r2"]
    with pytest.raises(ValueError, match="'dml' with estimand 'ATT'"):
        estimate_effects(y, d, X, estimand="ATT")
    with pytest.raises(ValueError, match="estimators repeated"):
        estimate_effects(y, d, X, estimators=["aipw", "aipw"])


def test_fast_and_sklearn_solvers_give_the_same_estimates():
    y, d, X = simulate_confounded(600, p=40, seed=9)
    for estimator in ("ipw", "aipw", "dml"):
        fast = estimate_effect(y, d, X, estimator=estimator, solver="fast")
        reference = estimate_effect(y, d, X, estimator=estimator, solver="sklearn")
        assert fast.diagnostics["solver"] == "fast" and reference.diagnostics["solver"] == "sklearn"
        # Same penalties chosen, estimates equal up to the reference's lbfgs tolerance.
        assert fast.diagnostics["propensity_model"]["penalty_by_fold"] == (
            reference.diagnostics["propensity_model"]["penalty_by_fold"]
        )
        assert abs(fast.estimate - reference.estimate) < 0.01 * reference.std_error, estimator
        assert fast.std_error == pytest.approx(reference.std_error, rel=0.01)
