"""Side-by-side with DoubleML and EconML on a small case: same data, same folds, same learners.
Skipped where the benchmark extra (``pip install -e ".[bench]"``) is not installed."""

import warnings

import numpy as np
import pytest

from eocausal.estimate import estimate_effect, make_folds
from eocausal.estimate.nuisance import NuisanceSpec, outcome_model, propensity_model
from tests.estimate.test_ate import simulate_confounded

N, FOLDS, SEED = 600, 5, 0


@pytest.fixture(scope="module")
def case():
    y, d, X = simulate_confounded(N, p=12, seed=31)
    fold_ids = make_folds(N, FOLDS, SEED, stratify=d)
    splits = [(np.flatnonzero(fold_ids != k), np.flatnonzero(fold_ids == k)) for k in range(FOLDS)]
    return y, d, X, splits


def reference_learners():
    spec = NuisanceSpec(seed=SEED, solver="sklearn")
    return propensity_model(spec, smaller_class_count=N), outcome_model(spec, n_train=N)


def test_aipw_and_dml_agree_with_doubleml(case):
    dml = pytest.importorskip("doubleml")
    y, d, X, splits = case
    ml_m, ml_g = reference_learners()
    data = dml.DoubleMLData.from_arrays(X, y, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        irm = dml.DoubleMLIRM(data, ml_g=ml_g, ml_m=ml_m, n_folds=FOLDS, trimming_threshold=0.01,
                              draw_sample_splitting=False)
        irm.set_sample_splitting([splits])
        irm.fit()
        plr = dml.DoubleMLPLR(data, ml_l=ml_g, ml_m=ml_m, n_folds=FOLDS, draw_sample_splitting=False)
        plr.set_sample_splitting([splits])
        plr.fit()
    for estimator, peer in (("aipw", irm), ("dml", plr)):
        # DoubleML fits each arm's outcome model alone (eocausal's default borrows for the smaller arm).
        ours = estimate_effect(y, d, X, estimator=estimator, folds=FOLDS, seed=SEED, outcome_arms="separate")
        # Same folds and learners: the only differences are solver tolerances and n vs n - 1.
        assert abs(ours.estimate - peer.coef[0]) < 0.01 * ours.std_error, estimator
        assert ours.std_error == pytest.approx(peer.se[0], rel=0.01), estimator


def test_dml_agrees_with_econml_lineardml(case):
    econml_dml = pytest.importorskip("econml.dml")
    y, d, X, splits = case
    ml_m, ml_g = reference_learners()
    # EconML replaces *CV learners by their full-sample choice; a plain wrapper keeps tuning per fold.
    from benchmarks.peers import _FoldwiseClassifier, _FoldwiseRegressor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = econml_dml.LinearDML(model_y=_FoldwiseRegressor(ml_g), model_t=_FoldwiseClassifier(ml_m),
                                   discrete_treatment=True, cv=splits, random_state=SEED)
        est.fit(y, d, X=None, W=X)
    inference = est.ate_inference()
    ours = estimate_effect(y, d, X, estimator="dml", folds=FOLDS, seed=SEED)
    assert abs(ours.estimate - float(np.ravel(inference.mean_point)[0])) < 0.01 * ours.std_error
    assert ours.std_error == pytest.approx(float(np.ravel(inference.stderr_mean)[0]), rel=0.02)
