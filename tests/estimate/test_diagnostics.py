import json

import numpy as np
import pytest

from eocausal.estimate import balance_ok, effective_sample_size, estimate_effect, overlap_ok
from eocausal.estimate.diagnostics import (
    HISTOGRAM_EDGES,
    MAX_BALANCE_ROWS,
    jsonable,
    propensity_overlap,
    standardized_mean_differences,
)
from tests.estimate.test_ate import simulate_confounded, simulate_randomised


@pytest.fixture(scope="module")
def confounded_ipw():
    y, d, X = simulate_confounded(1500, p=6, seed=31, strength=1.5)
    # The propensity at its CV penalty (undersmooth 1): balance after weighting is a property of
    # that fit; the default's 4x weaker penalty trades some of it for a less biased AIPW score
    # (0.11 vs 0.07 max |SMD| here).
    return estimate_effect(y, d, X, estimator="ipw", undersmooth=1.0), d


def test_weighting_reduces_imbalance_on_a_confounded_design(confounded_ipw):
    result, _ = confounded_ipw
    bal = result.diagnostics["balance"]
    assert bal["max_abs_smd_before"] > 0.4  # x0 strongly drives treatment
    assert bal["max_abs_smd_after"] < 0.1
    assert bal["max_abs_smd_after"] < bal["max_abs_smd_before"] / 4
    x0 = bal["columns"][0]
    assert x0["column"] == "x0" and abs(x0["smd_after"]) < abs(x0["smd_before"])
    ok, message = balance_ok(result.diagnostics)
    assert ok, message


def test_effective_sample_size_is_at_most_the_arm_size(confounded_ipw):
    result, d = confounded_ipw
    ess = result.diagnostics["ess"]
    for arm, n_arm in (("treated", int(d.sum())), ("control", int((1 - d).sum()))):
        assert 0 < ess[arm] <= n_arm
        assert ess[f"{arm}_share"] == pytest.approx(ess[arm] / n_arm)
    # Confounding forces unequal weights, so some efficiency is lost.
    assert ess["treated_share"] < 0.95 and ess["control_share"] < 0.95


def test_effective_sample_size_formula():
    assert effective_sample_size(np.ones(50)) == pytest.approx(50)
    assert effective_sample_size(np.r_[1000.0, np.full(99, 1e-3)]) == pytest.approx(1.0, abs=0.01)


def test_propensity_summary_counts_clipped_units_exactly():
    e_raw = np.array([0.001, 0.004, 0.02, 0.5, 0.5, 0.97, 0.996, 0.3])
    d = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    out = propensity_overlap(e_raw, d, clip=0.01)
    assert out["share_clipped"] == pytest.approx(3 / 8)  # 0.001, 0.004, 0.996
    assert out["share_clipped_by_arm"]["treated"] == pytest.approx(2 / 4)
    assert out["share_clipped_by_arm"]["control"] == pytest.approx(1 / 4)
    assert sum(out["histogram"]["treated"]) == 4 and sum(out["histogram"]["control"]) == 4
    assert out["histogram"]["bin_edges"] == HISTOGRAM_EDGES.tolist()
    treated = out["by_arm"]["treated"]
    assert treated["min"] == 0.001 and treated["max"] == 0.996
    assert treated["q05"] <= treated["q25"] <= treated["q50"] <= treated["q75"] <= treated["q95"]


def test_clipped_share_reported_for_extreme_propensities():
    # logit = 8 x0: the true propensity leaves [0.01, 0.99] when |x0| > logit(0.99) / 8,
    # i.e. for about 56.6 % of units; the cross-fitted model should find about as many.
    rng = np.random.default_rng(2)
    n = 1500
    X = rng.standard_normal((n, 2))
    true_e = 1 / (1 + np.exp(-8 * X[:, 0]))
    d = (rng.random(n) < true_e).astype(int)
    y = X[:, 0] + d + rng.standard_normal(n)
    result = estimate_effect(y, d, X, estimator="aipw", clip=0.01)
    true_share = np.mean((true_e < 0.01) | (true_e > 0.99))
    reported = result.diagnostics["propensity"]["share_clipped"]
    assert reported == pytest.approx(true_share, abs=0.1)
    assert result.diagnostics["propensity"]["auc"] > 0.9
    ok, message = overlap_ok(result.diagnostics)
    assert not ok and "outside [0.01, 0.99]" in message


def test_overlap_ok_flags_a_design_without_overlap():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((800, 3))
    d = (X[:, 0] > 0).astype(int)  # treatment is a deterministic function of x0
    y = X[:, 0] + d + rng.standard_normal(800)
    result = estimate_effect(y, d, X, estimator="ipw")
    ok, message = overlap_ok(result.diagnostics)
    assert not ok
    assert message.startswith("poor overlap")


def test_overlap_ok_passes_a_randomised_design():
    y, d, X = simulate_randomised(600, seed=4)
    result = estimate_effect(y, d, X, estimator="aipw")
    ok, message = overlap_ok(result.diagnostics)
    assert ok, message
    assert result.diagnostics["propensity"]["auc"] < 0.6  # nothing predicts a coin flip


def test_overlap_ok_reports_low_effective_sample_size():
    diagnostics = {
        "clip": 0.01,
        "propensity": {"share_clipped": 0.0, "by_arm": {"control": {"n": 400}}},
        "ess": {"treated": 300.0, "treated_share": 0.75, "control": 20.0, "control_share": 0.05},
    }
    ok, message = overlap_ok(diagnostics, min_ess_share=0.1)
    assert not ok
    assert "control arm is 20.0, 5.0% of its 400 units" in message
    assert overlap_ok(diagnostics, min_ess_share=0.01)[0]


def test_overlap_ok_without_a_propensity_model():
    y, d, X = simulate_randomised(100, seed=1)
    result = estimate_effect(y, d, X, estimator="difference_in_means")
    ok, message = overlap_ok(result.diagnostics)
    assert ok and "not assessed" in message
    assert "smd_after" not in result.diagnostics["balance"]["columns"][0]


def test_outcome_fit_reported_per_arm_for_aipw_and_overall_for_dml():
    y, d, X = simulate_confounded(800, seed=8)
    aipw = estimate_effect(y, d, X, estimator="aipw")
    # y = 2 x0 - x1 + 0.5 x2 + noise: linear models explain most of the variance in each arm.
    assert aipw.diagnostics["outcome_r2"]["treated"] > 0.7
    assert aipw.diagnostics["outcome_r2"]["control"] > 0.7
    dml = estimate_effect(y, d, X, estimator="dml")
    assert dml.diagnostics["outcome_r2"]["all"] > 0.7
    assert dml.diagnostics["folds"] == 5 and dml.diagnostics["clip"] == 0.01


def test_balance_rows_limited_for_wide_features_but_max_covers_all():
    rng = np.random.default_rng(5)
    n, p = 300, 60
    X = rng.standard_normal((n, p))
    d = (rng.random(n) < 1 / (1 + np.exp(-1.5 * X[:, 45]))).astype(int)  # confounder past column 20
    y = X[:, 45] + d + rng.standard_normal(n)
    result = estimate_effect(y, d, X, estimator="ipw")
    bal = result.diagnostics["balance"]
    assert len(bal["columns"]) == MAX_BALANCE_ROWS and bal["n_columns"] == p
    assert bal["max_abs_smd_before"] > 0.4  # found in column 45, not among the listed rows
    assert max(abs(r["smd_before"]) for r in bal["columns"]) < bal["max_abs_smd_before"]


def test_standardized_mean_difference_matches_hand_computation():
    X = np.array([[0.0], [2.0], [1.0], [3.0], [5.0], [7.0]])
    d = np.array([0, 0, 0, 1, 1, 1])
    pooled_sd = np.sqrt((X[:3].var(ddof=1) + X[3:].var(ddof=1)) / 2)
    assert standardized_mean_differences(X, d)[0] == pytest.approx((5.0 - 1.0) / pooled_sd)
    # Weighting the control arm towards its largest value shrinks the gap.
    w = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert standardized_mean_differences(X, d, w)[0] == pytest.approx((5.0 - 2.0) / pooled_sd)


def test_diagnostics_are_strict_json():
    assert jsonable({"a": np.float64("nan"), "b": [np.int64(3), np.inf], "c": np.bool_(True)}) == {
        "a": None, "b": [3, None], "c": True,
    }
    y, d, X = simulate_confounded(300, seed=9)
    result = estimate_effect(y, d, X, estimator="aipw", estimand="ATT")
    json.dumps(result.diagnostics, allow_nan=False)


def test_overlap_of_a_small_study_is_judged_on_the_cv_penalty_propensity():
    """160 units, 40 features: the estimate keeps the undersmoothed propensity, the overlap
    diagnostics (clipped share, ESS) come from the CV-penalty refit, and both are recorded."""
    y, d, X = simulate_confounded(160, p=40, seed=7)
    small = estimate_effect(y, d, X, estimator="aipw")
    propensity = small.diagnostics["propensity"]
    assert propensity["overlap_from"] == "cv_penalty_refit"
    assert propensity["estimation_share_clipped"] >= propensity["share_clipped"]
    assert "ess_estimation" in small.diagnostics
    ok, message = overlap_ok(small.diagnostics)
    assert ok, message
    # Enough rows per feature: one fit, no refit.
    y, d, X = simulate_confounded(1500, p=6, seed=31)
    assert "overlap_from" not in estimate_effect(y, d, X, estimator="aipw").diagnostics["propensity"]
