"""The image effect-cluster model: EM recovery of gated clusters, K by held-out fit, storage."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from eocausal.estimate.clusters import ClusterFit, choose_k, fit_effect_clusters, noise_variance


def _gated(k, n=900, p=6, seed=0, effects=None, noise_sd=2.0):
    """Clusters decided by the features (a softmax of a linear function), noisy pseudo-outcomes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    W = rng.normal(scale=3.0, size=(p, k))
    labels = np.argmax(X @ W + rng.gumbel(scale=0.3, size=(n, k)), axis=1)
    effects = np.linspace(-1.0, 3.0, k) if effects is None else np.asarray(effects)
    nu = np.full(n, noise_sd**2) * rng.uniform(0.5, 1.5, n)
    score = effects[labels] + np.sqrt(nu) * rng.normal(size=n)
    return X, score, nu, labels, effects


@pytest.mark.parametrize("k", [2, 3])
def test_em_recovers_gated_clusters(k):
    X, score, nu, labels, effects = _gated(k)
    fit = fit_effect_clusters(X, score, nu, k, seed=0)
    assert fit.converged
    # penalised likelihood never decreases across EM iterations (generalised EM)
    assert np.all(np.diff(fit.history) > -1e-6)
    np.testing.assert_allclose(fit.mu, effects, atol=0.4)  # clusters numbered by increasing effect
    floor = {2: 0.75, 3: 0.6}[k]  # chance is 0; noise sd 2 against effects 2 apart
    assert adjusted_rand_score(labels, fit.membership(X).argmax(axis=1)) > floor
    post = fit.posterior(X, score, nu)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    assert adjusted_rand_score(labels, post.argmax(axis=1)) > floor - 0.05
    # effects match their SEs: each true effect within 4 SE
    assert np.all(np.abs(fit.mu - effects) < 4 * fit.mu_std_error + 0.05)


def test_initialisation_from_an_effect_prediction_is_used():
    X, score, nu, labels, effects = _gated(2, seed=1)
    fit = fit_effect_clusters(X, score, nu, 2, init_effect=effects[labels])
    assert adjusted_rand_score(labels, fit.membership(X).argmax(axis=1)) > 0.8


def test_one_cluster_is_a_normal_mean():
    rng = np.random.default_rng(2)
    nu = np.full(500, 4.0)
    score = 1.5 + 2.0 * rng.normal(size=500)
    fit = fit_effect_clusters(rng.normal(size=(500, 3)), score, nu, 1)
    assert fit.mu[0] == pytest.approx(score.mean(), abs=0.05)
    assert fit.mu_std_error[0] == pytest.approx(np.sqrt((fit.omega[0] ** 2 + 4.0) / 500), rel=1e-6)
    np.testing.assert_allclose(fit.membership(np.zeros((3, 3))), 1.0)


@pytest.mark.parametrize("k", [2, 3])
def test_choose_k_by_held_out_fit(k):
    X, score, nu, labels, _ = _gated(k, n=600, seed=3)
    folds = np.arange(len(score)) % 3
    sel = choose_k(X, score, nu, folds, candidates=(1, 2, 3, 4) if k == 3 else (1, 2, 3))
    assert sel.chosen == k
    assert set(sel.held_out) >= {1, 2, 3}
    assert sel.held_out[k] > sel.held_out[1]


def test_no_heterogeneity_chooses_one_cluster():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(400, 4))
    nu = np.full(400, 4.0)
    score = 1.0 + 2.0 * rng.normal(size=400)
    sel = choose_k(X, score, nu, np.arange(400) % 3, candidates=(1, 2))
    assert sel.chosen == 1


def test_storage_round_trip_and_torch_gate():
    import torch

    X, score, nu, _, _ = _gated(3, n=300, seed=5)
    fit = fit_effect_clusters(X, score, nu, 3)
    again = ClusterFit.from_dict(fit.to_dict())
    np.testing.assert_allclose(again.membership(X), fit.membership(X))
    W, b, mean, scale = fit.torch_gate(torch.float64)
    probs = torch.softmax(((torch.as_tensor(X) - mean) / scale) @ W + b, dim=1).numpy()
    np.testing.assert_allclose(probs, fit.membership(X), atol=1e-10)
    with pytest.raises(ValueError, match="format"):
        ClusterFit.from_dict({"format": "other"})


def test_noise_variance_is_arm_specific():
    y = np.array([1.0, 3.0, 0.0, 2.0])
    d = np.array([1, 1, 0, 0])
    mu1 = np.array([2.0, 2.0, 2.0, 2.0])
    mu0 = np.array([1.0, 1.0, 1.0, 1.0])
    e = np.array([0.5, 0.25, 0.5, 0.75])
    nu = noise_variance(y, d, mu0, mu1, e)
    # arm residual variances: treated mean((1-2)^2, (3-2)^2) = 1; control mean((0-1)^2, (2-1)^2) = 1
    np.testing.assert_allclose(nu, [1 / 0.25, 1 / 0.0625, 1 / 0.25, 1 / 0.0625])


def test_bad_inputs():
    X = np.zeros((10, 2))
    with pytest.raises(ValueError, match="must match"):
        fit_effect_clusters(X, np.zeros(9), np.ones(10), 2)
    with pytest.raises(ValueError, match="too few"):
        fit_effect_clusters(X, np.zeros(10), np.ones(10), 6)
    with pytest.raises(ValueError, match="positive"):
        fit_effect_clusters(X, np.zeros(10), np.zeros(10), 2)
