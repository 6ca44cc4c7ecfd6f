"""Calibrated propensities (eocausal.estimate.calibration) and ``propensity_fit="calibrated"``."""

import json

import numpy as np
import pytest

from eocausal.estimate.ate import estimate_effects
from eocausal.estimate.calibration import CalibratedLogisticCV, weight_estimation_influence
from eocausal.estimate.nuisance import NuisanceSpec
from eocausal.estimate.sensitivity import MISMATCH_NOTE, sensitivity_for_effects
from eocausal.study import AnalysisSpec


def _design(n=1500, seed=0):
    """A confounder the outcome models see only through a misspecified (linear) surface: y has
    exp(x0) where the models are linear in x0; the propensity is logistic in x0 and x1."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    d = (rng.random(n) < 1 / (1 + np.exp(-(0.8 * X[:, 0] - 0.5 * X[:, 1])))).astype(int)
    y = np.exp(X[:, 0]) + 0.5 * X[:, 1] + d + rng.standard_normal(n)
    return y, d, X


def test_the_weights_balance_the_arm_to_the_sample_at_a_small_penalty():
    y, d, X = _design()
    model = CalibratedLogisticCV(lambdas=(1e-6,)).fit(X, d)
    weights = 1.0 / model.predict_proba(X)[:, 1][d == 1]
    # The stationarity condition: sum over treated of w x = sum over all of x (and sum w = n).
    assert weights.sum() == pytest.approx(len(d), rel=1e-4)
    np.testing.assert_allclose((weights[:, None] * X[d == 1]).sum(axis=0) / len(d), X.mean(axis=0), atol=1e-3)
    assert model.lambda_ == 1e-6 and model.coef_.shape == (5,) and list(model.classes_) == [0, 1]


def test_the_penalty_is_chosen_by_inner_cv_and_undersmoothing_divides_it():
    y, d, X = _design(600)
    cv = CalibratedLogisticCV(seed=1).fit(X, d)
    under = CalibratedLogisticCV(seed=1, undersmooth=4.0).fit(X, d)
    assert under.lambda_ == pytest.approx(cv.lambda_ / 4)
    p = cv.predict_proba(X)[:, 1]
    assert ((p > 0) & (p < 1)).all() and np.corrcoef(cv.decision_function(X), X[:, 0])[0, 1] > 0.5


def test_calibrated_aipw_weights_only_the_ipw_and_aipw_scores():
    y, d, X = _design()
    plain = estimate_effects(y, d, X, estimators=("ipw", "aipw", "dml"), folds=5, seed=3)
    cal = estimate_effects(y, d, X, estimators=("ipw", "aipw", "dml"), folds=5, seed=3, propensity_fit="calibrated")
    # DML's residual D - e(X) keeps the likelihood propensity: the same estimate.
    assert cal["dml"].estimate == plain["dml"].estimate
    for estimator in ("ipw", "aipw"):
        assert cal[estimator].estimate != plain[estimator].estimate
        weights = cal[estimator].diagnostics["propensity_model"]["weights"]
        assert weights["fit"].startswith("calibrated") and len(weights["penalty_by_fold_and_arm"]) == 10
    # The overlap diagnostics still describe the likelihood propensity.
    assert cal["aipw"].diagnostics["propensity"] == plain["aipw"].diagnostics["propensity"]
    # The truth is 1.
    assert abs(cal["aipw"].estimate - 1.0) < 3 * cal["aipw"].std_error


def test_calibrated_needs_the_built_in_linear_propensity():
    with pytest.raises(ValueError, match="propensity_fit 'calibrated'"):
        NuisanceSpec(learner="boosting", propensity_fit="calibrated")
    with pytest.raises(ValueError, match="propensity_fit must be one of"):
        NuisanceSpec(propensity_fit="balanced")
    with pytest.raises(ValueError, match="learners.propensity 'boosting'"):
        AnalysisSpec(propensity_fit="calibrated", learners={"propensity": {"name": "boosting"}})


def test_the_study_setting_reaches_the_estimate_and_is_serialised_only_when_set():
    default = AnalysisSpec()
    assert "propensity_fit" not in json.loads(default.model_dump_json())
    calibrated = AnalysisSpec(propensity_fit="calibrated")
    assert json.loads(calibrated.model_dump_json())["propensity_fit"] == "calibrated"
    assert calibrated.nuisance_options()["propensity_fit"] == "calibrated"


def test_the_sensitivity_bounds_refit_the_calibrated_weights():
    from eocausal.estimate.ate import nuisance_spec

    y, d, X = _design(800)
    res = estimate_effects(y, d, X, estimators=("aipw",), folds=4, seed=2, propensity_fit="calibrated")["aipw"]
    spec = nuisance_spec(2, [], propensity_fit="calibrated")
    stats = sensitivity_for_effects(y, d, X, estimators=("aipw",), folds=4, seed=2, spec=spec,
                                    reported_estimates={"aipw": res.estimate})["aipw"]
    assert stats.theta == pytest.approx(res.estimate, abs=1e-9)
    assert stats.std_error == pytest.approx(res.std_error, rel=1e-9)  # with the weights' estimation term
    assert not any(MISMATCH_NOTE in note for note in stats.notes)


def test_the_weights_estimation_term_is_each_training_units_effect_on_the_held_out_mean():
    # One held-out fold's weighted mean, mean over held-out i of slope_i / P(arm | x_i), with the arm
    # model fitted on the other rows at a fixed penalty: dropping training unit j moves it by about
    # -(its term) / n, the first-order (M-estimation) effect the function returns.
    y, d, X = _design(400, seed=5)
    fold_ids = (np.arange(len(d)) % 4 == 0).astype(int)  # fold 1 held out, fold 0 trains
    slope = d * (y - np.exp(0.5) - d)  # residuals of a wrong outcome model, on the treated

    def held_out_mean(train):
        model = CalibratedLogisticCV(lambdas=(1e-3,)).fit(X[train], d[train])
        test = fold_ids == 1
        return (slope[test] / model.predict_proba(X[test])[:, 1]).sum() / len(d), model

    train = fold_ids == 0
    full, model = held_out_mean(train)
    extra = weight_estimation_influence({1: model}, X, d, slope, fold_ids, clip=0.0)
    assert (extra[fold_ids == 1] == 0).all()
    for j in np.flatnonzero(train)[:6]:
        without = train.copy()
        without[j] = False
        dropped, _ = held_out_mean(without)
        assert (full - dropped) * len(d) == pytest.approx(extra[j], rel=0.05, abs=0.01 * np.abs(extra).max())



@pytest.mark.parametrize("estimand", ["ATE", "ATT"])
def test_the_calibrated_aipw_se_counts_the_weights_estimation(estimand):
    y, d, X = _design()
    both = estimate_effects(y, d, X, estimators=("ipw", "aipw"), estimand=estimand, folds=5, seed=3,
                            propensity_fit="calibrated")
    term = both["aipw"].diagnostics["weights_estimation"]
    assert 0 < term["std_error_weights_known"] != pytest.approx(both["aipw"].std_error, rel=1e-6)
    # The Hajek IPW keeps the weights as known (calibration.calibrated_weights_influence says why).
    assert "weights_estimation" not in both["ipw"].diagnostics
    plain = estimate_effects(y, d, X, estimators=("aipw",), estimand=estimand, folds=5, seed=3)["aipw"]
    assert "weights_estimation" not in plain.diagnostics


def test_the_calibrated_fit_runs_only_for_the_weighting_estimators():
    y, d, X = _design(600)
    dml = estimate_effects(y, d, X, estimators=("dml",), folds=4, seed=1, propensity_fit="calibrated")["dml"]
    assert "weights" not in dml.diagnostics["propensity_model"]
    assert dml.estimate == estimate_effects(y, d, X, estimators=("dml",), folds=4, seed=1)["dml"].estimate


def test_the_products_comparison_carries_the_weights_term_as_the_headline_does():
    # Products of an all-zero image column change no outcome model: the comparison's estimate and
    # influence values are then the headline's, term included.
    from eocausal.estimate.fragility import products_comparison

    y, d, X = _design(600)
    image = np.zeros((len(y), 1))
    features = np.hstack([X, image])
    headline = estimate_effects(y, d, features, estimators=("aipw",), folds=4, seed=1,
                                propensity_fit="calibrated")["aipw"]
    comparison = products_comparison(y, d, X, image, folds=4, seed=1, headline=headline,
                                     propensity_fit="calibrated")
    assert comparison.estimate == pytest.approx(headline.estimate, abs=1e-9)
    assert comparison.std_error == pytest.approx(headline.std_error, rel=1e-6)
    assert headline.std_error != pytest.approx(headline.diagnostics["weights_estimation"]["std_error_weights_known"],
                                               rel=1e-6)
