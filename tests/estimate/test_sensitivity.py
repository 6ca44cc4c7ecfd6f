"""Omitted-variable-bias bounds and robustness values for AIPW / DML (eocausal.estimate.sensitivity)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eocausal.estimate.ate import estimate_effect
from eocausal.estimate.sensitivity import (
    SensitivityStats,
    benchmark_strengths,
    bounds,
    confounding_factor,
    contour_plot,
    robustness_value,
    robustness_value_alpha,
    sensitivity_for_effects,
    sensitivity_stats,
    summary,
)
from eocausal.simulate import HiddenConfounderProcess


def _ols_fit(X, target):
    design = np.column_stack([np.ones(len(target)), X])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return design @ coef


def _partial_r2(target, base, extra):
    """Share of target's residual variance (given base) that extra explains."""
    short = target - _ols_fit(base, target)
    long = target - _ols_fit(np.column_stack([base, extra]), target)
    return 1.0 - np.sum(long**2) / np.sum(short**2)


def test_bias_bound_is_exact_for_the_partially_linear_model_with_linear_nuisances():
    # OLS is the partially linear model with linear nuisances; there the bound with |rho| = 1
    # equals the actual omitted-variable bias (Cinelli & Hazlett's exact OVB formula).
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.standard_normal((n, 3))
    u = rng.standard_normal(n)
    d = 0.5 * x[:, 0] + 0.8 * u + rng.standard_normal(n)
    y = 1.0 * d + x @ np.array([1.0, -0.5, 0.2]) + 1.2 * u + rng.standard_normal(n)

    short = sensitivity_stats(y, d, {"e": _ols_fit(x, d), "l": _ols_fit(x, y)}, "dml")
    xu = np.column_stack([x, u])
    long = sensitivity_stats(y, d, {"e": _ols_fit(xu, d), "l": _ols_fit(xu, y)}, "dml")
    r2_d = _partial_r2(d, x, u)
    r2_y = _partial_r2(y, np.column_stack([d, x]), u)

    bias = abs(short.theta - long.theta)
    assert bias > 0.3  # the omitted confounder matters here
    bound = float(confounding_factor(r2_y, r2_d)) * short.scale
    assert bound == pytest.approx(bias, rel=1e-8)
    # and the bounds at the true strengths reach the long estimate exactly
    b = bounds(short, r2_y, r2_d)
    assert min(abs(b["theta_lower"] - long.theta), abs(b["theta_upper"] - long.theta)) < 1e-8


def test_robustness_value_is_the_cinelli_hazlett_formula_and_moves_the_estimate_to_zero():
    rng = np.random.default_rng(1)
    n = 800
    x = rng.standard_normal((n, 2))
    d = x[:, 0] + rng.standard_normal(n)
    y = 0.3 * d + x[:, 1] + rng.standard_normal(n)
    stats = sensitivity_stats(y, d, {"e": _ols_fit(x, d), "l": _ols_fit(x, y)}, "dml")
    rv = robustness_value(stats)

    # Cinelli & Hazlett: RV = (sqrt(f^4 + 4 f^2) - f^2) / 2, f = |t| / sqrt(dof), with the OLS
    # (homoskedastic) t-statistic; with 1/n variances throughout, dof = n.
    r_d = d - _ols_fit(x, d)
    resid = (y - _ols_fit(x, y)) - stats.theta * r_d
    t = stats.theta / np.sqrt(np.mean(resid**2) / (n * np.mean(r_d**2)))
    f = abs(t) / np.sqrt(n)
    assert rv == pytest.approx(0.5 * (np.sqrt(f**4 + 4 * f**2) - f**2), rel=1e-10)

    # At equal strengths RV the worst-case bias is exactly the estimate; below it, it is less.
    assert float(bounds(stats, rv, rv)["theta_lower"]) == pytest.approx(0.0, abs=1e-10)
    assert float(bounds(stats, 0.5 * rv, 0.5 * rv)["theta_lower"]) > 0

    # RV_alpha: where the confidence bound reaches zero; smaller than RV for a significant estimate.
    rv_a = robustness_value_alpha(stats)
    assert 0 < rv_a < rv
    assert float(bounds(stats, rv_a, rv_a)["ci_lower"]) == pytest.approx(0.0, abs=1e-6)


def test_robustness_value_alpha_is_zero_for_an_insignificant_estimate_and_sign_symmetric():
    rng = np.random.default_rng(3)
    n = 200
    x = rng.standard_normal((n, 2))
    d = x[:, 0] + rng.standard_normal(n)
    y = x[:, 1] + rng.standard_normal(n)  # no effect (t about 0.8 with this seed)
    stats = sensitivity_stats(y, d, {"e": _ols_fit(x, d), "l": _ols_fit(x, y)}, "dml")
    assert stats.theta - stats.critical_value * stats.std_error < 0 < stats.theta + stats.critical_value * stats.std_error
    assert robustness_value_alpha(stats) == 0.0

    flipped = sensitivity_stats(-y, d, {"e": _ols_fit(x, d), "l": _ols_fit(x, -y)}, "dml")
    assert robustness_value(flipped) == pytest.approx(robustness_value(stats))
    assert flipped.theta == pytest.approx(-stats.theta)


@pytest.mark.parametrize("features", [True, False])
@pytest.mark.parametrize("clustered", [False, True])
def test_refitted_nuisances_reproduce_the_reported_estimates_and_standard_errors(features, clustered):
    rng = np.random.default_rng(3)
    n = 300
    X = rng.standard_normal((n, 5))
    d = (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(int)
    y = X[:, 0] + d + rng.standard_normal(n)
    groups = np.repeat(np.arange(60), 5) if clustered else None
    X = X if features else None
    reported = {e: estimate_effect(y, d, X, e, folds=3, seed=4, groups=groups) for e in ("aipw", "dml")}
    stats = sensitivity_for_effects(y, d, X, folds=3, seed=4, groups=groups,
                                    reported_estimates={e: r.estimate for e, r in reported.items()})
    for estimator, s in stats.items():
        assert s.theta == pytest.approx(reported[estimator].estimate, abs=1e-10)
        assert s.std_error == pytest.approx(reported[estimator].std_error, rel=1e-8)
        assert s.critical_value == pytest.approx(reported[estimator].diagnostics["critical_value"])
        assert not s.notes


def test_a_mismatch_with_the_reported_estimate_is_noted():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((120, 3))
    d = (rng.random(120) < 0.5).astype(int)
    y = d + rng.standard_normal(120)
    stats = sensitivity_for_effects(y, d, X, ["dml"], folds=3, reported_estimates={"dml": 99.0})
    assert "differs from the reported estimate" in stats["dml"].notes[0]


def test_summary_round_trips_through_json_and_validates_inputs(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((150, 3))
    d = (rng.random(150) < 0.5).astype(int)
    y = 0.8 * d + X[:, 0] + rng.standard_normal(150)
    stats = sensitivity_for_effects(y, d, X, ["aipw"], folds=3)["aipw"]
    stored = json.loads(json.dumps(summary(stats)))
    again = SensitivityStats.from_dict(stored["stats"])
    assert robustness_value(again) == pytest.approx(stored["robustness_value"])
    assert [b["r2"] for b in stored["bounds_at_equal_strengths"]] == [0.01, 0.02, 0.05, 0.1, 0.2]
    widths = [b["theta_upper"] - b["theta_lower"] for b in stored["bounds_at_equal_strengths"]]
    assert widths == sorted(widths)  # stronger confounders, wider bounds

    with pytest.raises(ValueError, match=r"r2_treatment must lie in \[0, 1\)"):
        bounds(stats, 0.1, 1.0)
    with pytest.raises(ValueError, match="written for"):
        sensitivity_for_effects(y, d, X, ["ipw"])

    png = contour_plot(stats, tmp_path / "c.png", benchmarks={"a covariate": (0.05, 0.1)})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_strengths_of_an_observed_group():
    rng = np.random.default_rng(6)
    n = 3000
    x = rng.standard_normal((n, 2))
    d = 0.8 * x[:, 1] + rng.standard_normal(n)
    y = d + x[:, 0] + 1.0 * x[:, 1] + rng.standard_normal(n)
    long = sensitivity_stats(y, d, {"e": _ols_fit(x, d), "l": _ols_fit(x, y)}, "dml")
    short = sensitivity_stats(y, d, {"e": _ols_fit(x[:, :1], d), "l": _ols_fit(x[:, :1], y)}, "dml")
    r_d, r_y = benchmark_strengths(long, short)
    # For the partially linear model these are the partial R^2s of the left-out column.
    assert r_d == pytest.approx(_partial_r2(d, x[:, :1], x[:, 1]), rel=1e-8)
    assert r_y == pytest.approx(_partial_r2(y, np.column_stack([d, x[:, 0]]), x[:, 1]), abs=0.02)


def test_hidden_confounder_strengths_match_brute_force_simulation():
    process = HiddenConfounderProcess()
    z = np.random.default_rng(7).standard_normal(300)
    exact = process.strengths(z)
    # Brute force: many draws of u per unit.
    u = np.random.default_rng(8).standard_normal((300, 4000))
    e_long = process.propensity(z[:, None], u)
    e_short = e_long.mean(axis=1)
    r2_d = np.mean((e_long - e_short[:, None]) ** 2) / (np.mean(e_long * (1 - e_long)) + np.mean((e_long - e_short[:, None]) ** 2))
    assert exact["r2_treatment"] == pytest.approx(r2_d, abs=0.005)
    d = np.random.default_rng(9).random(e_long.shape) < e_long
    var_u = sum(np.mean(arm, axis=1) * np.array([u[i][arm[i]].var() for i in range(300)])
                for arm in (d, ~d))
    explained = process.hidden_outcome**2 * var_u.mean()
    assert exact["r2_outcome"] == pytest.approx(explained / (1 + explained), abs=0.01)
    assert 0.2 < exact["r2_treatment"] < exact["riesz_gain"] < 0.45


def test_robustness_value_flags_a_hidden_confounder_and_clears_when_nothing_is_hidden():
    # Oracle features (the image confounder itself) so the test isolates the sensitivity analysis;
    # the benchmark script runs the same check on real image embeddings.
    process = HiddenConfounderProcess()
    rng = np.random.default_rng(10)
    z = rng.standard_normal(1500)
    strengths = process.strengths(z)
    draws = process.draw(z, rng)
    y, d = draws["outcome"].to_numpy(), draws["treatment"].to_numpy()
    observed = np.column_stack([z, draws["market_access"], draws["household_size"]])
    hidden = sensitivity_for_effects(y, d, observed, folds=5)
    revealed = sensitivity_for_effects(y, d, np.column_stack([observed, draws["hidden_confounder"]]), folds=5)
    for estimator, r_d in (("dml", strengths["r2_treatment"]), ("aipw", strengths["riesz_gain"])):
        weakest, strongest = min(r_d, strengths["r2_outcome"]), max(r_d, strengths["r2_outcome"])
        assert robustness_value(hidden[estimator]) < weakest, estimator
        assert robustness_value(revealed[estimator]) > strongest, estimator
        # the bounds at the confounder's actual strength reach back to the truth
        truth = strengths["ate"] if estimator == "aipw" else strengths["plm_effect_long"]
        b = bounds(hidden[estimator], strengths["r2_outcome"], r_d)
        assert float(b["ci_lower"]) <= truth <= float(b["ci_upper"])


@pytest.mark.slow
def test_monte_carlo_robustness_values_flag_the_hidden_confounder_on_image_features():
    # The done-when check at a smaller scale than benchmarks/imputation_sensitivity.py, with the
    # demo scene's RCF image features in place of the oracle confounder.
    from eocausal.simulate import robustness_table, sensitivity_monte_carlo
    from tests.estimate.test_imputation import demo_design

    design = demo_design()
    results, strengths = sensitivity_monte_carlo(design.confounder_std, design.image_features[1], 20)
    table = robustness_table(results).set_index(["world", "estimator"])
    for estimator in ("aipw", "dml"):
        assert table.loc[("hidden", estimator), "share_rv_below_both"] >= 0.9, table
        assert table.loc[("hidden", estimator), "share_bounds_at_actual_cover_truth"] >= 0.9, table
    assert table.loc[("nothing_hidden", "dml"), "share_rv_above_both"] >= 0.8, table
    assert table.loc[("nothing_hidden", "aipw"), "median_rv"] > strengths["r2_outcome"], table


def test_trimming_is_mirrored_and_repeated_cross_fitting_is_noted():
    rng = np.random.default_rng(12)
    n = 400
    X = rng.standard_normal((n, 4))
    d = (rng.random(n) < 1 / (1 + np.exp(-2.5 * X[:, 0]))).astype(int)
    y = X[:, 0] + d + rng.standard_normal(n)
    trimmed = {e: estimate_effect(y, d, X, e, folds=3, trim=0.1) for e in ("aipw", "dml")}
    assert trimmed["aipw"].n < n
    stats = sensitivity_for_effects(y, d, X, folds=3, trim=0.1,
                                    reported_estimates={e: r.estimate for e, r in trimmed.items()})
    for estimator, s in stats.items():
        assert s.n == trimmed[estimator].n and not s.notes
        assert s.theta == pytest.approx(trimmed[estimator].estimate, abs=1e-10)
    repeated = estimate_effect(y, d, X, "dml", folds=3, repetitions=2)  # median of 2: their mean
    noted = sensitivity_for_effects(y, d, X, ["dml"], folds=3, reported_estimates={"dml": repeated.estimate})
    assert noted["dml"].notes  # bounds of the first split, around a median estimate


def test_on_imputed_pseudo_outcomes_r_y_is_read_against_the_measured_outcome():
    from eocausal.estimate.imputation import impute_outcomes
    from eocausal.simulate import missing_outcomes

    process = HiddenConfounderProcess()
    rng = np.random.default_rng(13)
    z = rng.standard_normal(1500)
    draws = process.draw(z, rng)
    y, d = draws["outcome"].to_numpy(), draws["treatment"].to_numpy()
    X = np.column_stack([z, draws["market_access"], draws["household_size"]])
    full = sensitivity_for_effects(y, d, X, ["dml"], folds=5)["dml"]
    y_obs = np.where(missing_outcomes(len(y), 0.6, rng), np.nan, y)
    imputed = impute_outcomes(y_obs, d, X, folds=5)
    pseudo = sensitivity_for_effects(imputed.corrected, d, X, ["dml"], folds=5)["dml"]
    measured = sensitivity_for_effects(imputed.corrected, d, X, ["dml"], folds=5, measured_outcome=y_obs,
                                       measured_weight=1 / imputed.labelling_propensity)["dml"]
    # the pseudo-outcome's residual variance is inflated by the imputation noise; the measured one is not
    assert pseudo.sigma2 > 1.3 * full.sigma2
    assert measured.sigma2 == pytest.approx(full.sigma2, rel=0.15)
    assert abs(robustness_value(measured) - robustness_value(full)) < abs(robustness_value(pseudo) - robustness_value(full))
    assert measured.notes and "measured outcomes" in measured.notes[0]
    # nothing missing: the same sigma2 either way
    same = sensitivity_for_effects(y, d, X, ["dml"], folds=5, measured_outcome=y, measured_weight=np.ones(len(y)))
    assert same["dml"].sigma2 == pytest.approx(full.sigma2, rel=1e-12)
