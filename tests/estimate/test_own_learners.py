"""The caller's own learners (``learners={"propensity": ..., "outcome": ...}``) and the study's named ones."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LinearRegression, LogisticRegression

from eocausal.estimate.ate import estimate_effect
from eocausal.estimate.folds import make_folds


def _design(n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    d = (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(int)
    y = X[:, 0] + 0.5 * X[:, 1] + d + rng.standard_normal(n)
    return y, d, X


FITS: list[int] = []  # training sizes of every CountingRegressor fit (clones copy their parameters)


class CountingRegressor(RegressorMixin, BaseEstimator):
    """A linear regression that records its fits."""

    def __init__(self, fit_intercept=True):
        self.fit_intercept = fit_intercept

    def fit(self, X, y):
        FITS.append(len(y))
        self.model_ = LinearRegression().fit(X, y)
        return self

    def predict(self, X):
        return self.model_.predict(X)


def test_own_learners_are_cloned_per_fold_and_arm_and_named_in_the_diagnostics():
    y, d, X = _design()
    FITS.clear()
    mine = CountingRegressor()
    res = estimate_effect(y, d, X, estimator="aipw", folds=4,
                          learners={"propensity": LogisticRegression(C=0.5), "outcome": mine})
    assert len(FITS) == 2 * 4 and not hasattr(mine, "model_")  # a clone per fold and arm; ours untouched
    assert sum(FITS) == 3 * len(y)  # each arm's units, in the three training folds of four
    assert res.diagnostics["learners"] == {"propensity": "LogisticRegression(C=0.5)", "outcome": "CountingRegressor()"}
    assert abs(res.estimate - 1.0) < 4 * res.std_error


def test_default_learners_are_named_too():
    y, d, X = _design()
    res = estimate_effect(y, d, X, estimator="aipw", folds=3)
    assert res.diagnostics["learners"]["propensity"].startswith("penalised linear")


@pytest.mark.parametrize("learners, message", [
    ({"propensity": LinearRegression()}, "lacks ['predict_proba']"),
    ({"outcome": LinearRegression}, "write LinearRegression()"),
    ({"outcomes": LinearRegression()}, "unknown key(s) ['outcomes']"),
    ([LinearRegression()], "must be a dict"),
])
def test_unusable_learners_are_rejected_by_name(learners, message):
    y, d, X = _design(100)
    with pytest.raises(ValueError) as info:
        estimate_effect(y, d, X, estimator="aipw", folds=3, learners=learners)
    assert message in str(info.value)


def test_aipw_equals_doubleml_irm_with_the_same_learners_and_folds():
    dml = pytest.importorskip("doubleml")  # the `bench` extra
    y, d, X = _design(800, seed=3)
    folds = 5
    fold_ids = make_folds(len(y), folds, 11, stratify=d)
    # DoubleML fits each arm's outcome model on its own units: outcome_arms="separate".
    ours = estimate_effect(y, d, X, estimator="aipw", folds=folds, seed=11, clip=0.01, outcome_arms="separate",
                           learners={"propensity": LogisticRegression(C=1.0), "outcome": LinearRegression()})
    data = dml.DoubleMLData.from_arrays(X, y, d)
    model = dml.DoubleMLIRM(data, ml_g=LinearRegression(), ml_m=LogisticRegression(C=1.0), n_folds=folds,
                            score="ATE", trimming_threshold=0.01, draw_sample_splitting=False)
    model.set_sample_splitting([[(np.flatnonzero(fold_ids != k), np.flatnonzero(fold_ids == k))
                                 for k in range(folds)]])
    model.fit()
    assert ours.estimate == pytest.approx(float(model.coef[0]), abs=1e-6)
    assert ours.std_error == pytest.approx(float(model.se[0]), rel=1e-2)


def test_study_names_a_learner_and_its_params():
    import pandas as pd

    from eocausal.estimate.effects import estimate_study
    from eocausal.study import AnalysisSpec

    y, d, X = _design(300)
    units = pd.DataFrame({"unit_id": [f"u{i}" for i in range(len(y))], "treatment": d, "outcome": y})
    units["embedding"] = list(X)
    analysis = AnalysisSpec(folds=3, image_components=3, estimators=["aipw"], feature_sets=["image"],
                            chip_scale_check=False,
                            learners={"outcome": {"name": "random_forest", "params": {"n_estimators": 20}}})
    table = estimate_study(units, [], analysis, study_name="s", survey_version="a", embeddings_version="b").table
    import json

    learners = json.loads(table["diagnostics"].iloc[0])["learners"]
    assert learners["outcome"].startswith("RandomForestRegressor(") and "n_estimators=20" in learners["outcome"]
    assert learners["propensity"].startswith("penalised linear")


@pytest.mark.parametrize("learners, message", [
    ({"outcome": {"name": "random_forest", "params": {"n_tree": 5}}}, "has no parameter(s) ['n_tree']"),
    ({"outcome": {"name": "xgboost"}}, "'linear', 'boosting'"),
    ({"treatment": {"name": "boosting"}}, "propensity"),
    ({"outcome": {"name": "linear", "params": {"alpha": 1}}}, "takes no params"),
])
def test_study_rejects_unknown_learners_and_params(learners, message):
    from pydantic import ValidationError

    from eocausal.study import AnalysisSpec

    with pytest.raises(ValidationError) as info:
        AnalysisSpec(learners=learners)
    assert message in str(info.value)


def _study_table(**settings):
    import pandas as pd

    from eocausal.estimate.effects import estimate_study
    from eocausal.study import AnalysisSpec

    y, d, X = _design(300)
    units = pd.DataFrame({"unit_id": [f"u{i}" for i in range(len(y))], "treatment": d, "outcome": y})
    units["embedding"] = list(X)
    analysis = AnalysisSpec(folds=3, image_components=3, estimators=["aipw"], feature_sets=["image"],
                            chip_scale_check=False, **settings)
    return analysis, estimate_study(units, [], analysis, study_name="s", survey_version="a",
                                    embeddings_version="b").table


def test_study_sets_the_outcome_arms_and_only_a_non_default_changes_the_analysis_spec():
    import json

    default, table = _study_table()
    separate, table_separate = _study_table(outcome_arms="separate")
    assert json.loads(table["diagnostics"].iloc[0])["outcome_arms"].startswith("borrow")
    assert json.loads(table_separate["diagnostics"].iloc[0])["outcome_arms"].startswith("separate")
    assert table["estimate"].iloc[0] != table_separate["estimate"].iloc[0]
    assert "outcome_arms" not in default.model_dump()  # versions of default analyses unchanged
    assert separate.model_dump()["outcome_arms"] == "separate"


def test_sensitivity_bounds_describe_the_estimate_of_the_studys_own_learners_and_outcome_arms():
    import json

    from eocausal.estimate.sensitivity import MISMATCH_NOTE

    for settings in ({"learners": {"outcome": {"name": "random_forest", "params": {"n_estimators": 20}}}},
                     {"outcome_arms": "separate"}):
        _, table = _study_table(**settings)
        sensitivity = json.loads(table["sensitivity"].iloc[0])
        assert not any(MISMATCH_NOTE in note for note in sensitivity["stats"]["notes"]), settings
        assert sensitivity["stats"]["theta"] == pytest.approx(table["estimate"].iloc[0], abs=1e-9)


def test_study_rejects_an_unknown_outcome_arms():
    from pydantic import ValidationError

    from eocausal.study import AnalysisSpec

    with pytest.raises(ValidationError) as info:
        AnalysisSpec(outcome_arms="pooled")
    assert "'borrow' or 'separate'" in str(info.value)
