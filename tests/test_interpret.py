"""Saliency: the differentiable re-run of the RCF embedding + PCA, and pixel gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eocausal.embed.rcf import RCFEmbedder
from eocausal.embed.reduce import fit_pca
from eocausal.interpret import DifferentiableImageFeatures, LinearHead, fit_propensity_head, plot_saliency_panel, saliency


def _chips(n=40, size=24, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 500.0, size=(n, 3, size, size)).astype(np.float32) + 5000
    # some texture that varies between chips
    base[: n // 2, :, ::2, :] *= 1.3
    valid = np.ones((n, size, size), dtype=bool)
    valid[0, :6, :6] = False  # a nodata corner
    valid[1, :, -3:] = False
    base[~np.broadcast_to(valid[:, None], base.shape)] = 0
    return base, valid


@pytest.mark.parametrize("branches, pool_grid", [("positive", 1), ("both", 2)])
def test_differentiable_features_equal_the_embedder(branches, pool_grid):
    chips, valid = _chips()
    per_filter = (2 if branches == "both" else 1) * pool_grid**2
    emb = RCFEmbedder(n_features=16 * per_filter, patch_size=3, seed=1, device="cpu", dtype="float32",
                      branches=branches, pool_grid=pool_grid, impl="reference").fit(chips, valid)
    features = emb.transform(chips, valid)
    pca = fit_pca(features, 5, seed=0)
    model = DifferentiableImageFeatures(emb, pca)
    x, ok = model.normalised(chips, valid)
    with torch.no_grad():
        ours = model.embedding(x, ok).numpy()
        components = model(x, ok).numpy()
    np.testing.assert_allclose(ours, features, rtol=2e-4, atol=2e-4 * np.abs(features).max())
    np.testing.assert_allclose(components, pca.transform(features), rtol=1e-3, atol=1e-3)


def test_saliency_is_the_gradient_and_zero_on_nodata():
    chips, valid = _chips(n=12)
    emb = RCFEmbedder(n_features=16, patch_size=3, seed=2, device="cpu", dtype="float32", impl="reference").fit(chips, valid)
    pca = fit_pca(emb.transform(chips, valid), 4, seed=0)
    model = DifferentiableImageFeatures(emb, pca)
    head = LinearHead(mean=np.zeros(4), scale=1.0, weights=np.array([1.0, -0.5, 0.3, 0.2]), bias=0.1)
    maps, logits = saliency(model, chips[:2], valid[:2], lambda c: head.logits(c))
    assert maps.shape == (2, 24, 24)
    assert np.all(maps[0][~valid[0]] == 0) and np.all(maps[1][~valid[1]] == 0)
    assert maps[0][valid[0]].max() > 0
    # finite differences on one normalised pixel value, in float64
    x, ok = model.normalised(chips[:1], valid[:1])
    x = x.double()
    model = model.double()
    w = torch.as_tensor(head.weights)

    def logit(xx):
        return ((model(xx, ok) - torch.as_tensor(head.mean)) / head.scale) @ w + head.bias

    i, j = 12, 13
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(logit(xg).sum(), xg)[0][0, :, i, j].numpy()
    eps = 1e-4
    numeric = []
    for band in range(3):
        up, down = x.clone(), x.clone()
        up[0, band, i, j] += eps
        down[0, band, i, j] -= eps
        numeric.append(float(logit(up) - logit(down)) / (2 * eps))
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)


def test_propensity_head_and_panel(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4))
    d = (rng.random(300) < 1 / (1 + np.exp(-2 * X[:, 0]))).astype(int)
    head = fit_propensity_head(X, d)
    p = 1 / (1 + np.exp(-head.numpy_logits(X)))
    assert np.corrcoef(p, X[:, 0])[0, 1] > 0.9
    np.testing.assert_allclose(head.logits(torch.as_tensor(X, dtype=torch.float32)).numpy(), head.numpy_logits(X),
                               rtol=1e-4, atol=1e-4)
    chips, valid = _chips(n=2)
    maps = rng.random((2, 24, 24))
    path = plot_saliency_panel(chips, valid, maps, maps, ["a", "b"], "title", tmp_path / "panel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unfitted_or_mismatched_embedder_is_rejected():
    chips, valid = _chips(n=6)
    emb = RCFEmbedder(n_features=8, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="not fitted"):
        DifferentiableImageFeatures(emb, fit_pca(np.random.default_rng(0).normal(size=(6, 8)), 2))
    emb.fit(chips, valid)
    with pytest.raises(ValueError, match="PCA expects"):
        DifferentiableImageFeatures(emb, fit_pca(np.random.default_rng(0).normal(size=(6, 9)), 2))
