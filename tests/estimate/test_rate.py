"""RATE (AUTOC, Qini) with grf's normalisation, its bootstrap, and PEHE."""

from __future__ import annotations

import numpy as np
import pytest

from eocausal.estimate.rate import pehe, rank_average_treatment_effect


def _hand_rate(scores, priorities, target):
    """grf's estimate_rate written out for untied priorities, unit weights."""
    order = np.argsort(-np.asarray(priorities))
    g = np.asarray(scores, dtype=float)[order]
    n = len(g)
    toc = np.array([g[: i + 1].mean() for i in range(n)]) - g.mean()
    weights = np.ones(n) if target == "AUTOC" else np.arange(1, n + 1) / n
    return float((weights * toc).sum() / n), toc


@pytest.mark.parametrize("target", ["AUTOC", "QINI"])
def test_point_estimate_matches_the_grf_formula(target):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=37)
    priorities = rng.normal(size=37)
    expected, toc = _hand_rate(scores, priorities, target)
    r = rank_average_treatment_effect(scores, priorities, target=target, n_bootstrap=10, seed=1,
                                      q=[i / 37 for i in range(1, 38)])
    assert r.estimate == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(r.toc, toc, atol=1e-12)  # on a grid of whole units, TOC is exact
    assert r.toc[-1] == pytest.approx(0.0, abs=1e-12)  # TOC(1) = 0 by definition


def test_toc_grid_uses_a_fraction_of_the_boundary_unit():
    scores = np.array([4.0, 2.0, 0.0, -2.0])
    r = rank_average_treatment_effect(scores, [4, 3, 2, 1], q=[0.375, 1.0], n_bootstrap=2)
    # q n = 1.5 units: (4 + 0.5 * 2) / 1.5 - mean
    assert r.toc[0] == pytest.approx((4 + 1) / 1.5 - scores.mean())


def test_tied_priorities_share_their_scores():
    scores = np.array([5.0, -1.0, 2.0, 0.0, 3.0, 1.0])
    # every priority tied: the ranking carries no information, so TOC = 0 everywhere
    flat = rank_average_treatment_effect(scores, np.ones(6), n_bootstrap=5)
    assert flat.estimate == pytest.approx(0.0, abs=1e-12)
    # two tied pairs: each pair's scores are averaged before ranking
    tied = rank_average_treatment_effect(scores, [2, 2, 1, 1, 0, 0], n_bootstrap=5)
    averaged, _ = _hand_rate([2.0, 2.0, 1.0, 1.0, 2.0, 2.0], [6, 5, 4, 3, 2, 1], "AUTOC")
    assert tied.estimate == pytest.approx(averaged, abs=1e-12)


def test_a_rule_that_targets_heterogeneity_has_a_ci_above_zero():
    rng = np.random.default_rng(3)
    n = 1500
    x = rng.normal(size=n)
    tau = 1.0 + x  # the effect grows with x
    scores = tau + rng.normal(scale=3.0, size=n)  # noisy doubly robust scores
    good = rank_average_treatment_effect(scores, x, n_bootstrap=200, seed=0)
    assert good.ci_low > 0
    assert good.p_value < 0.01
    # A rule unrelated to the effect: RATE near 0 and its CI covers 0.
    noise = rank_average_treatment_effect(scores, rng.normal(size=n), n_bootstrap=200, seed=0)
    assert noise.ci_low < 0 < noise.ci_high
    # The reversed rule is as bad as the good one is good.
    bad = rank_average_treatment_effect(scores, -x, n_bootstrap=50, seed=0)
    assert bad.estimate == pytest.approx(-good.estimate, rel=0.05, abs=0.05)


def test_half_sample_bootstrap_se_matches_the_sampling_spread():
    """The SE from one sample tracks the spread of RATE over independent samples."""
    rng = np.random.default_rng(11)
    estimates, ses = [], []
    for _ in range(40):
        x = rng.normal(size=400)
        scores = 1.0 + 0.5 * x + rng.normal(scale=2.0, size=400)
        r = rank_average_treatment_effect(scores, x, n_bootstrap=100, seed=int(rng.integers(1 << 30)))
        estimates.append(r.estimate)
        ses.append(r.std_error)
    assert np.mean(ses) == pytest.approx(np.std(estimates, ddof=1), rel=0.35)


def test_clusters_are_drawn_whole():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=60)
    clusters = np.repeat(np.arange(6), 10)
    r = rank_average_treatment_effect(scores, rng.normal(size=60), clusters=clusters, n_bootstrap=20)
    assert np.isfinite(r.std_error) and r.std_error > 0
    with pytest.raises(ValueError, match="at least 4"):
        rank_average_treatment_effect(scores, scores, clusters=np.repeat([0, 1, 2], 20))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "AUTO"}, "target must be"),
        ({"q": [0.5, 0.9]}, "ending at 1"),
        ({"q": [0.0, 1.0]}, "in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_average_treatment_effect(np.arange(10.0), np.arange(10.0), **kwargs)


def test_mismatched_or_non_finite_inputs_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        rank_average_treatment_effect(np.arange(10.0), np.arange(9.0))
    with pytest.raises(ValueError, match="finite"):
        rank_average_treatment_effect(np.r_[np.arange(9.0), np.nan], np.arange(10.0))


def test_pehe():
    assert pehe([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert pehe([0.0, 0.0], [3.0, 4.0]) == pytest.approx(np.sqrt(12.5))
    with pytest.raises(ValueError):
        pehe([1.0], [1.0, 2.0])
