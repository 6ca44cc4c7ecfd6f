"""Outcome imputation with valid inference (eocausal.estimate.imputation), its study contract and
survey rules, its place in the effect-estimates stage, and the simulated studies."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest

from eocausal.estimate.effects import estimate_study, estimates_markdown
from eocausal.estimate.imputation import (
    CORRECTED,
    MEASURED,
    PLUGIN,
    ImputedOutcomes,
    estimate_with_imputation,
    impute_outcomes,
)
from eocausal.quality import DataQualityError, validate_survey
from eocausal.simulate import (
    COLUMNS,
    HIDDEN_CONFOUNDER_COLUMN,
    coverage_table,
    imputation_monte_carlo,
    missing_outcomes,
    write_hidden_confounder_study,
    write_imputation_study,
)
from eocausal.study import AnalysisSpec, load_study
from eocausal.survey import load_survey


def _trial(rng, n=300, p=6):
    """A randomised trial whose outcome the features predict well (R^2 about 0.6)."""
    Z = rng.standard_normal((n, p))
    d = (rng.random(n) < 0.5).astype(int)
    tau = 1.0 + 0.5 * Z[:, 0]
    y = 1.5 * Z[:, 0] + Z[:, 1] - 0.5 * Z[:, 2] + tau * d + rng.standard_normal(n)
    return Z, d, y, float(tau.mean())


def test_nothing_missing_leaves_the_outcomes_as_they_are():
    Z, d, y, _ = _trial(np.random.default_rng(0))
    imputed = impute_outcomes(y, d, Z, folds=3)
    np.testing.assert_allclose(imputed.corrected, y, atol=1e-12)
    np.testing.assert_array_equal(imputed.filled, y)
    assert imputed.diagnostics["n_missing"] == 0


def test_corrected_arm_means_are_the_prediction_powered_estimator():
    rng = np.random.default_rng(1)
    Z, d, y, _ = _trial(rng)
    missing = missing_outcomes(len(y), 0.7, rng)
    imputed = impute_outcomes(np.where(missing, np.nan, y), d, Z, folds=5)
    f, lab = imputed.predicted, ~missing
    for arm, name in ((1, "treated"), (0, "control")):
        lam = imputed.diagnostics["power"][name]
        in_arm = d == arm
        # PPI++: lambda * mean of predictions over all units + mean of (Y - lambda f) over the labelled.
        ppi = lam * f[in_arm].mean() + np.mean(y[in_arm & lab] - lam * f[in_arm & lab])
        assert imputed.corrected[in_arm].mean() == pytest.approx(ppi, abs=1e-10)
        assert 0.0 <= lam <= 1.0
    # The plug-in keeps measured outcomes and fills the rest with predictions.
    np.testing.assert_array_equal(imputed.filled[lab], y[lab])
    np.testing.assert_array_equal(imputed.filled[missing], f[missing])
    assert imputed.diagnostics["imputation_r2"]["treated"] > 0.3


def test_corrected_intervals_cover_and_the_plug_in_intervals_do_not():
    # A small, fast version of the benchmark (benchmarks/imputation_sensitivity.py): a trial,
    # 70 % of outcomes missing at random, difference in means; 60 replications (coverage MC
    # error about 3 points), so the thresholds leave room.
    n = 200
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((n, 6))
    covers = {MEASURED: [], CORRECTED: [], PLUGIN: []}
    estimates = {k: [] for k in covers}
    for rep in range(60):
        r = np.random.default_rng([2, rep])
        d = (r.random(n) < 0.5).astype(int)
        tau = 1.0 + 0.5 * Z[:, 0]
        y = 1.5 * Z[:, 0] + Z[:, 1] - 0.5 * Z[:, 2] + tau * d + 2.0 * r.standard_normal(n)
        imputed = impute_outcomes(np.where(missing_outcomes(n, 0.7, r), np.nan, y), d, Z, folds=5, seed=rep)
        for source, res in estimate_with_imputation(imputed, None, "difference_in_means").items():
            covers[source].append(res.ci_low <= tau.mean() <= res.ci_high)
            estimates[source].append(res.estimate - tau.mean())
    coverage = {k: np.mean(v) for k, v in covers.items()}
    assert coverage[CORRECTED] >= 0.88, coverage
    assert coverage[PLUGIN] <= 0.80, coverage
    # prediction-powered: no bias, and less spread than the measured units alone
    assert abs(np.mean(estimates[CORRECTED])) < 0.1
    assert np.std(estimates[CORRECTED]) < np.std(estimates[MEASURED])


def test_power_tuning_ignores_useless_predictions():
    rng = np.random.default_rng(3)
    n = 400
    noise_features = rng.standard_normal((n, 5))
    d = (rng.random(n) < 0.5).astype(int)
    y = d + rng.standard_normal(n)
    y_obs = np.where(missing_outcomes(n, 0.6, rng), np.nan, y)
    tuned = impute_outcomes(y_obs, d, noise_features, folds=5)
    plain = impute_outcomes(y_obs, d, noise_features, folds=5, power_tuning=False)
    assert max(tuned.diagnostics["power"].values()) < 0.5
    assert set(plain.diagnostics["power"].values()) == {1.0}
    se = {k: estimate_with_imputation(v, None, "difference_in_means")[CORRECTED].std_error
          for k, v in (("tuned", tuned), ("plain", plain))}
    measured = estimate_with_imputation(tuned, None, "difference_in_means")[MEASURED].std_error
    assert se["tuned"] <= se["plain"] * 1.001
    assert se["tuned"] <= measured * 1.05  # never much worse than ignoring the predictions


def test_missing_at_random_given_features_needs_the_labelling_model():
    # Units with high Z0 are measured more often, and the effect is non-linear in Z0 where the
    # (linear) outcome model cannot follow it. Then the by-arm correction, which assumes outcomes
    # missing completely at random, is biased; with the labelling model pi(D, Z) the correction is
    # doubly robust and unbiased again. The measured units alone are biased too.
    rng = np.random.default_rng(4)
    n = 500
    Z = rng.standard_normal((n, 4))
    errors = {"measured": [], "by_arm": [], "features": []}
    for rep in range(10):
        r = np.random.default_rng([4, rep])
        d = (r.random(n) < 0.5).astype(int)
        tau = 1.0 + 2.0 * np.abs(Z[:, 0])
        y = Z[:, 0] + Z[:, 1] + tau * d + r.standard_normal(n)
        measured = r.random(n) < 1 / (1 + np.exp(-(-1.0 + 1.5 * Z[:, 0])))
        y_obs = np.where(measured, y, np.nan)
        for labelling in ("by_arm", "features"):
            imputed = impute_outcomes(y_obs, d, Z, folds=5, seed=rep, labelling=labelling)
            results = estimate_with_imputation(imputed, None, "difference_in_means")
            errors[labelling].append(results[CORRECTED].estimate - tau.mean())
        errors["measured"].append(results[MEASURED].estimate - tau.mean())
    bias = {k: np.mean(v) for k, v in errors.items()}  # Monte Carlo SE about 0.08 each
    assert abs(bias["features"]) < 0.2, bias
    assert bias["by_arm"] < -0.2, bias
    assert bias["measured"] > 0.2, bias


def test_inputs_are_validated_with_clear_messages():
    rng = np.random.default_rng(5)
    Z, d, y, _ = _trial(rng, n=60)
    with pytest.raises(ValueError, match=r"finite or missing: 1 infinite value\(s\), first at position\(s\) \[7\]"):
        impute_outcomes(np.where(np.arange(60) == 7, np.inf, y), d, Z)
    only_control_measured = np.where(d == 1, np.nan, y)
    only_control_measured[np.flatnonzero(d == 1)[:2]] = 1.0
    with pytest.raises(ValueError, match="at least 3 units with a measured outcome in each arm; the treated arm has 2"):
        impute_outcomes(only_control_measured, d, Z)
    with pytest.raises(ValueError, match="labelling must be one of"):
        impute_outcomes(y, d, Z, labelling="magic")


def test_imputed_outcomes_round_trip_through_a_table_in_any_order():
    rng = np.random.default_rng(6)
    Z, d, y, _ = _trial(rng, n=80)
    imputed = impute_outcomes(np.where(missing_outcomes(80, 0.5, rng), np.nan, y), d, Z, folds=3)
    ids = [f"u{i:02d}" for i in range(80)]
    frame = imputed.to_frame(ids).sample(frac=1.0, random_state=0)
    back = ImputedOutcomes.from_frame(frame, ids)
    np.testing.assert_array_equal(back.corrected, imputed.corrected)
    np.testing.assert_array_equal(back.labelled, imputed.labelled)
    with pytest.raises(ValueError, match="lack 1 analysis unit"):
        ImputedOutcomes.from_frame(frame.iloc[1:], ids)


def _units(rng, n=240, missing_share=0.0):
    emb = rng.standard_normal((n, 24))
    z = emb[:, 0]
    d = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    y = 2 * z + d + rng.standard_normal(n)
    y[missing_outcomes(n, missing_share, rng)] = np.nan
    units = pd.DataFrame({"unit_id": [f"u{i:03d}" for i in range(n)], "lat": 0.0, "lon": 0.0,
                          "treatment": d, "outcome": y, "cov_a": rng.standard_normal(n)})
    units["embedding"] = list(emb)
    return units


def test_effect_stage_reports_measured_corrected_and_plug_in_rows_with_robustness_values():
    units = _units(np.random.default_rng(7), missing_share=0.6)
    analysis = AnalysisSpec(folds=3, image_components=6, outcome_imputation=True,
                            estimators=["difference_in_means", "aipw", "dml"], feature_sets=["none", "image"])
    table = estimate_study(units, ["cov_a"], analysis, study_name="s", survey_version="a",
                           embeddings_version="b").table
    assert len(table) == 3 * 2 * 3
    by_source = table.groupby("outcome_source")
    assert set(by_source.groups) == {MEASURED, CORRECTED, PLUGIN}
    n_measured = int(units["outcome"].notna().sum())
    assert (by_source.get_group(MEASURED)["n"] == n_measured).all()
    assert (by_source.get_group(CORRECTED)["n"] == len(units)).all()
    assert (table["n_outcome_observed"] == n_measured).all()
    # robustness values for AIPW/DML, except on the plug-in (its standard errors are wrong)
    has_rv = table["robustness_value"].notna()
    assert (has_rv == (table["estimator"].isin(["aipw", "dml"]) & (table["outcome_source"] != PLUGIN))).all()
    assert ((table.loc[has_rv, "robustness_value"] > table.loc[has_rv, "robustness_value_alpha"])
            | (table.loc[has_rv, "robustness_value_alpha"] == 0)).all()
    diag = json.loads(table.loc[table["outcome_source"] == PLUGIN, "diagnostics"].iloc[0])
    assert diag["outcome_imputation"]["outcome_source"] == PLUGIN
    md = estimates_markdown(table)
    assert "| outcome |" in md and "imputed_corrected" in md and "RV_alpha" in md


def test_effect_stage_without_imputation_is_one_measured_row_per_spec():
    units = _units(np.random.default_rng(8))
    analysis = AnalysisSpec(folds=3, image_components=6, estimators=["ipw", "dml"], feature_sets=["image"])
    table = estimate_study(units, [], analysis, study_name="s", survey_version="a", embeddings_version="b").table
    assert list(table["outcome_source"]) == [MEASURED, MEASURED]
    assert table["robustness_value"].isna().tolist() == [True, False]
    assert "| outcome |" not in estimates_markdown(table)
    with pytest.raises(ValueError, match="y \\(outcome\\) must be finite"):
        units.loc[3, "outcome"] = np.nan
        estimate_study(units, [], analysis, study_name="s", survey_version="a", embeddings_version="b")


def _survey(n=40):
    rng = np.random.default_rng(9)
    return pd.DataFrame({"unit_id": [f"V{i}" for i in range(n)], "lat": 10.0, "lon": 20.0,
                         "treatment": np.arange(n) % 2, "outcome": rng.standard_normal(n)})


def test_survey_suite_allows_missing_outcomes_only_with_imputation_and_counts_them():
    df = _survey()
    df.loc[[3, 4, 10], "outcome"] = np.nan
    strict = validate_survey(df, [])
    assert not strict.success and "outcome not null" in strict.message() and "V3" in strict.message()
    lenient = validate_survey(df, [], outcome_may_be_missing=True)
    assert lenient.success, lenient.message()
    assert lenient.observations["outcome_missing"]["n_missing"] == 3
    assert lenient.observations["outcome_missing"]["unit_ids"] == ["V3", "V4", "V10"]
    assert "outcome missing for 3 of 40 units" in lenient.message()
    assert lenient.to_metadata()["observations"]["outcome_missing"]["by_arm"]["treated"]["n_missing"] == 1


def test_survey_suite_still_rejects_non_finite_outcomes_and_arms_without_measurements():
    df = _survey()
    df.loc[5, "outcome"] = np.inf
    report = validate_survey(df, [], outcome_may_be_missing=True)
    assert not report.success and "outcome finite" in report.message() and "V5" in report.message()
    df = _survey()
    df.loc[df["treatment"] == 1, "outcome"] = np.nan
    df.loc[1, "outcome"] = 0.5
    report = validate_survey(df, [], outcome_may_be_missing=True)
    assert "outcome measured for at least 3 treated units" in report.message()


def test_simulated_imputation_study_has_a_known_share_missing(tmp_path, tiny_study):
    scene = next((tiny_study.parent / "imagery").glob("*.tif"))
    study_path = write_imputation_study(tmp_path / "imp", missing_share=0.7, n_units=120, seed=2,
                                        scene=scene, chip_size_px=32)
    study = load_study(study_path)
    assert study.analysis.outcome_imputation is True
    raw = pd.read_csv(study_path.parent / "villages.csv")
    assert raw[COLUMNS["outcome"]].isna().sum() == 84
    truth = json.loads((study_path.parent / "truth.json").read_text())
    assert truth["outcome_missing"]["n_missing"] == 84
    df, report = load_survey(study.survey_path, study.survey, outcome_may_be_missing=True)
    assert report.observations["outcome_missing"]["n_missing"] == 84
    with pytest.raises(DataQualityError, match="outcome not null"):
        load_survey(study.survey_path, study.survey)


def test_simulated_hidden_confounder_study_hides_or_reveals_the_same_draws(tmp_path, tiny_study):
    scene = next((tiny_study.parent / "imagery").glob("*.tif"))
    kwargs = dict(n_units=120, seed=2, scene=scene, chip_size_px=32)
    hidden = write_hidden_confounder_study(tmp_path / "hidden", hidden=True, **kwargs)
    revealed = write_hidden_confounder_study(tmp_path / "revealed", hidden=False, **kwargs)
    a, b = (pd.read_csv(p.parent / "villages.csv") for p in (hidden, revealed))
    assert HIDDEN_CONFOUNDER_COLUMN not in a and HIDDEN_CONFOUNDER_COLUMN in b
    pd.testing.assert_frame_equal(a, b.drop(columns=[HIDDEN_CONFOUNDER_COLUMN]))
    assert HIDDEN_CONFOUNDER_COLUMN in load_study(revealed).survey.covariates
    assert HIDDEN_CONFOUNDER_COLUMN not in load_study(hidden).survey.covariates
    truth = json.loads((hidden.parent / "truth.json").read_text())
    strengths = truth["hidden_confounder"]["strengths_over_imageable_units"]
    assert 0.2 < strengths["r2_treatment"] < 0.5 and 0.2 < strengths["r2_outcome"] < 0.5
    # the naive contrast is pulled down by the hidden confounder (it lowers the outcome of the treated)
    assert truth["naive_difference_in_means"] < truth["ate"]


def test_imputation_monte_carlo_harness_reports_coverage_per_source():
    rng = np.random.default_rng(11)
    z = rng.standard_normal(200)
    features = np.column_stack([z + 0.2 * rng.standard_normal(200), rng.standard_normal((200, 3))])
    results = imputation_monte_carlo(z, features, 2, estimators=("difference_in_means",), randomised=True, folds=3)
    table = coverage_table(results)
    assert list(table["outcome_source"]) == ["all_measured", MEASURED, CORRECTED, PLUGIN]
    assert (table["replications"] == 2).all()
    assert (results["n_measured"] == 60).all()


@functools.lru_cache(maxsize=1)
def demo_design(n_units: int = 400, components: int = 16):
    """Fixed units and image features on the shipped Landsat-8 crop (for the slow Monte Carlos)."""
    from eocausal.montecarlo import prepare_design

    return prepare_design(n_units=n_units, seed=0, factors=(1,), image_components=components)


@pytest.mark.slow
def test_monte_carlo_corrected_covers_at_the_nominal_rate_and_the_plug_in_does_not():
    # The done-when check at a smaller scale than benchmarks/imputation_sensitivity.py: a trial on
    # the demo scene's units and RCF image features, 70 % of outcomes missing at random.
    design = demo_design()
    results = imputation_monte_carlo(design.confounder_std, design.image_features[1], 200,
                                     estimators=("difference_in_means", "aipw"), randomised=True)
    table = coverage_table(results).set_index(["estimator", "outcome_source"])
    for estimator in ("difference_in_means", "aipw"):
        assert 0.92 <= table.loc[(estimator, CORRECTED), "coverage"] <= 0.985, table
        assert table.loc[(estimator, PLUGIN), "coverage"] < 0.88, table


def test_estimates_markdown_compares_each_row_with_its_own_target():
    table = pd.DataFrame({
        "estimand": ["ATE", "ATE", "ATT"], "estimator": ["aipw", "dml", "aipw"], "feature_set": ["image"] * 3,
        "estimate": [1.0, 0.8, 1.5], "std_error": [0.1] * 3,
        "ci_low": [0.8, 0.6, 1.3], "ci_high": [1.2, 1.0, 1.7],
    })
    lines = estimates_markdown(table, truth={"ATE": 1.1, "ATT": 1.4, "dml": 0.9}).splitlines()[2:]
    assert "-0.100 | yes" in lines[0] and "-0.100 | yes" in lines[1] and "+0.100 | yes" in lines[2]
    assert "+0.000 | yes" in estimates_markdown(table, truth=1.0).splitlines()[2]
