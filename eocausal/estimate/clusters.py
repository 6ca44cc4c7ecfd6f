"""The image effect-cluster model (after Jerzak, Johansson & Daoud, "Image-based Treatment Effect
Heterogeneity", CLeaR 2023), fitted by EM in torch on doubly robust pseudo-outcomes.

Each unit belongs to one of K latent clusters; membership is predicted from its image,

    P(Z_i = k | image_i) = pi_k(x_i) = softmax_k(x_i W + b),    x_i = the image's principal components,

and each cluster has its own effect distribution, tau_i | Z_i = k ~ N(mu_k, omega_k^2). The model sees
the effects through the AIPW pseudo-outcomes Gamma_i of the CATE stage (E[Gamma_i | X_i] = tau(X_i)),
whose noise variance nu_i is known up to the nuisance fit: given the unit's arm,
Var(Gamma_i | X_i, D_i) ~ sigma_1^2 / e(X_i)^2 (treated) or sigma_0^2 / (1 - e(X_i))^2 (control). So

    Gamma_i | x_i ~ sum_k pi_k(x_i) N(mu_k, omega_k^2 + nu_i).

EM: the E-step gives each unit's cluster posterior (responsibilities); the M-step maximises the
expected complete-data log-likelihood (plus an l2 penalty on W) with L-BFGS in torch — a generalised
EM step that never lowers the penalised likelihood. Clusters are initialised from quantiles of a
CATE prediction (the DR-learner's), which breaks the label symmetry, and are numbered by increasing
mu_k. ``choose_k`` picks K by cross-validated held-out log-likelihood (the mixture with the
image-predicted prior pi(x), so it is the fit for places whose outcome is unseen).

Torch keeps the model differentiable end to end: :mod:`eocausal.interpret` back-propagates
cluster membership through the PCA and the random convolutional features to the chip's pixels.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

FORMAT = "eocausal.effect_clusters/1"
_LOG_2PI = math.log(2.0 * math.pi)


def noise_variance(y, d, mu0, mu1, propensity) -> np.ndarray:
    """Per-unit variance of the AIPW score given X and the unit's arm.

    For a treated unit Gamma = mu_1 - mu_0 + (Y - mu_1) / e, so Var(Gamma | X, D=1) = sigma_1^2 / e^2;
    for a control, sigma_0^2 / (1 - e)^2. Each arm's residual variance sigma_d^2 is pooled over the
    arm. Conditioning on the arm keeps each unit's noise normal; the marginal variance
    sigma_1^2/e + sigma_0^2/(1-e) would make it a scale mixture, heavier-tailed than the model.
    """
    y, d = np.asarray(y, dtype=float), np.asarray(d).astype(int)
    e = np.asarray(propensity, dtype=float)
    mu0, mu1 = np.asarray(mu0, dtype=float), np.asarray(mu1, dtype=float)
    var1 = float(np.mean((y[d == 1] - mu1[d == 1]) ** 2))
    var0 = float(np.mean((y[d == 0] - mu0[d == 0]) ** 2))
    return np.where(d == 1, var1 / e**2, var0 / (1.0 - e) ** 2)


@dataclass
class ClusterFit:
    k: int
    mu: np.ndarray  # [K] cluster effect means (ascending)
    omega: np.ndarray  # [K] cluster effect sds
    mu_std_error: np.ndarray  # [K]
    weights: np.ndarray  # [p, K] gating weights (column 0 fixed at 0)
    bias: np.ndarray  # [K]
    feature_mean: np.ndarray  # [p] gating features are centred and divided by feature_scale
    feature_scale: float
    log_likelihood: float  # mean per unit, at the optimum (penalty excluded)
    n_iter: int
    converged: bool
    penalty: float
    history: list[float] = field(default_factory=list)

    # -- prediction --------------------------------------------------------------------------

    def _standardise(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=float) - self.feature_mean) / self.feature_scale

    def membership(self, features: np.ndarray) -> np.ndarray:
        """Image-predicted cluster probabilities pi(x): [n, K]."""
        logits = self._standardise(features) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def posterior(self, features: np.ndarray, score: np.ndarray, nu: np.ndarray) -> np.ndarray:
        """Cluster posterior given the image and the unit's pseudo-outcome: [n, K]."""
        log_prior = np.log(np.maximum(self.membership(features), 1e-300))
        var = self.omega[None, :] ** 2 + np.asarray(nu, dtype=float)[:, None]
        log_lik = -0.5 * (_LOG_2PI + np.log(var) + (np.asarray(score)[:, None] - self.mu[None, :]) ** 2 / var)
        joint = log_prior + log_lik
        joint -= joint.max(axis=1, keepdims=True)
        post = np.exp(joint)
        return post / post.sum(axis=1, keepdims=True)

    def expected_effect(self, features: np.ndarray) -> np.ndarray:
        """E[tau | image] = sum_k pi_k(x) mu_k."""
        return self.membership(features) @ self.mu

    def held_out_log_likelihood(self, features, score, nu) -> np.ndarray:
        """Per-unit log p(Gamma | image) under the image-predicted prior (no posterior peeking)."""
        log_prior = np.log(np.maximum(self.membership(features), 1e-300))
        var = self.omega[None, :] ** 2 + np.asarray(nu, dtype=float)[:, None]
        log_lik = -0.5 * (_LOG_2PI + np.log(var) + (np.asarray(score)[:, None] - self.mu[None, :]) ** 2 / var)
        joint = log_prior + log_lik
        top = joint.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(joint - top).sum(axis=1, keepdims=True))).ravel()

    def torch_gate(self, dtype=torch.float32):
        """(W, b, mean, scale) as tensors, for differentiating membership w.r.t. the features."""
        return (
            torch.as_tensor(self.weights, dtype=dtype),
            torch.as_tensor(self.bias, dtype=dtype),
            torch.as_tensor(self.feature_mean, dtype=dtype),
            float(self.feature_scale),
        )

    # -- storage -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "k": self.k, "mu": self.mu.tolist(), "omega": self.omega.tolist(),
            "mu_std_error": self.mu_std_error.tolist(), "weights": self.weights.tolist(),
            "bias": self.bias.tolist(), "feature_mean": self.feature_mean.tolist(),
            "feature_scale": self.feature_scale, "log_likelihood": self.log_likelihood,
            "n_iter": self.n_iter, "converged": self.converged, "penalty": self.penalty,
        }

    @classmethod
    def from_dict(cls, state: dict) -> "ClusterFit":
        if state.get("format") != FORMAT:
            raise ValueError(f"not a stored effect-cluster model: format {state.get('format')!r}")
        k = int(state["k"])
        return cls(
            k=k, mu=np.asarray(state["mu"], float), omega=np.asarray(state["omega"], float),
            mu_std_error=np.asarray(state["mu_std_error"], float),
            weights=np.asarray(state["weights"], float).reshape(-1, k), bias=np.asarray(state["bias"], float),
            feature_mean=np.asarray(state["feature_mean"], float), feature_scale=float(state["feature_scale"]),
            log_likelihood=float(state["log_likelihood"]), n_iter=int(state["n_iter"]),
            converged=bool(state["converged"]), penalty=float(state["penalty"]),
        )


@contextmanager
def _one_torch_thread():
    # The tensors are small: threads only contend (and on a shared machine, badly).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _initial_responsibilities(init_effect: np.ndarray, k: int) -> np.ndarray:
    """Soft one-hot of the K quantile groups of an initial effect prediction."""
    n = len(init_effect)
    ranks = np.argsort(np.argsort(init_effect, kind="stable"), kind="stable")
    groups = np.minimum((ranks * k) // n, k - 1)
    r = np.full((n, k), 0.1 / max(k - 1, 1)) if k > 1 else np.ones((n, 1))
    if k > 1:
        r[np.arange(n), groups] = 0.9
    return r


def fit_effect_clusters(
    features,
    score,
    nu,
    k: int = 2,
    *,
    init_effect=None,
    penalty: float = 0.1,
    max_iter: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> ClusterFit:
    """Fit the K-cluster model by EM.

    - ``features``: [n, p] image features (principal components); centred and divided by the
      largest column sd, so leading components keep their larger scale (a weaker penalty).
    - ``score``: pseudo-outcomes Gamma; ``nu``: their noise variances (:func:`noise_variance`).
    - ``init_effect``: an effect prediction to initialise the clusters from (default: ``score``
      smoothed by a ridge on the features).
    - ``penalty``: l2 penalty on the gating weights, per unit (the objective is a mean).
    """
    # Copies: torch wants writable arrays, and the caller's must not change.
    X = np.array(features, dtype=float)
    g = np.array(score, dtype=float)
    nu = np.array(nu, dtype=float)
    n, p = X.shape
    if len(g) != n or len(nu) != n:
        raise ValueError(f"features ({n} rows), score ({len(g)}) and nu ({len(nu)}) must match")
    if k < 1 or int(k) != k:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n < 2 * k:
        raise ValueError(f"{n} units are too few for {k} clusters")
    if not (np.isfinite(X).all() and np.isfinite(g).all() and np.isfinite(nu).all() and (nu > 0).all()):
        raise ValueError("features, score and nu must be finite, nu positive")
    k = int(k)
    with _one_torch_thread():
        return _fit(X, g, nu, k, init_effect, penalty, max_iter, tol, seed)


def _fit(X, g, nu, k, init_effect, penalty, max_iter, tol, seed) -> ClusterFit:
    n, p = X.shape
    torch.manual_seed(seed)
    mean = X.mean(axis=0)
    scale = float(X.std(axis=0).max()) or 1.0
    Xs = (X - mean) / scale
    if init_effect is None:
        A = Xs.T @ Xs + n * np.eye(p)
        init_effect = Xs @ np.linalg.solve(A, Xs.T @ (g - g.mean()))
    resp = _initial_responsibilities(np.asarray(init_effect, dtype=float), k)

    dt = torch.float64
    Xt, gt, nut = (torch.as_tensor(a, dtype=dt) for a in (Xs, g, nu))
    W = torch.zeros(p, max(k - 1, 0), dtype=dt, requires_grad=True)
    b = torch.zeros(max(k - 1, 0), dtype=dt, requires_grad=True)
    mu0 = np.array([np.average(g, weights=resp[:, j]) for j in range(k)])
    mu = torch.tensor(mu0, dtype=dt, requires_grad=True)
    # log omega^2 starts at a tenth of the scores' spread beyond their noise.
    spread = max(float(np.var(g) - np.mean(nu)), 0.01 * float(np.var(g)))
    log_omega2 = torch.full((k,), math.log(max(spread / k, 1e-4)), dtype=dt, requires_grad=True)
    params = [mu, log_omega2] + ([W, b] if k > 1 else [])

    def log_prior_of():
        if k == 1:
            return torch.zeros(n, 1, dtype=dt)
        logits = torch.cat([torch.zeros(n, 1, dtype=dt), Xt @ W + b], dim=1)
        return torch.log_softmax(logits, dim=1)

    def log_lik_of():
        var = torch.exp(log_omega2)[None, :] + nut[:, None]
        return -0.5 * (_LOG_2PI + torch.log(var) + (gt[:, None] - mu[None, :]) ** 2 / var)

    def penalised_log_likelihood() -> float:
        with torch.no_grad():
            ll = torch.logsumexp(log_prior_of() + log_lik_of(), dim=1).mean()
            return float(ll - 0.5 * penalty * (W**2).sum() / n)

    optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=10, line_search_fn="strong_wolfe")
    history: list[float] = []
    converged = False
    resp_t = torch.as_tensor(resp, dtype=dt)
    it = 0
    for it in range(1, max_iter + 1):
        def closure():
            optimiser.zero_grad()
            q = (resp_t * (log_prior_of() + log_lik_of())).sum(dim=1).mean()
            loss = -q + 0.5 * penalty * (W**2).sum() / n
            loss.backward()
            return loss

        optimiser.step(closure)
        with torch.no_grad():  # E-step
            resp_t = torch.softmax(log_prior_of() + log_lik_of(), dim=1)
        history.append(penalised_log_likelihood())
        if it > 1 and abs(history[-1] - history[-2]) < tol * (1.0 + abs(history[-2])):
            converged = True
            break

    with torch.no_grad():
        mu_np = mu.numpy().copy()
        omega_np = np.sqrt(np.exp(log_omega2.numpy()))
        W_full = np.zeros((p, k))
        b_full = np.zeros(k)
        if k > 1:
            W_full[:, 1:] = W.numpy()
            b_full[1:] = b.numpy()
        resp_np = resp_t.numpy()
        ll = float(torch.logsumexp(log_prior_of() + log_lik_of(), dim=1).mean())
    # Number clusters by increasing effect.
    order = np.argsort(mu_np, kind="stable")
    mu_np, omega_np, resp_np = mu_np[order], omega_np[order], resp_np[:, order]
    W_full, b_full = W_full[:, order], b_full[order]
    W_full, b_full = W_full - W_full[:, :1], b_full - b_full[0]  # cluster 0's logit is 0 again
    # SE of mu_k: inverse observed information of the weighted normal mean.
    info = (resp_np / (omega_np[None, :] ** 2 + nu[:, None])).sum(axis=0)
    mu_se = 1.0 / np.sqrt(np.maximum(info, 1e-300))
    return ClusterFit(
        k=k, mu=mu_np, omega=omega_np, mu_std_error=mu_se, weights=W_full, bias=b_full,
        feature_mean=mean, feature_scale=scale, log_likelihood=ll, n_iter=it, converged=converged,
        penalty=float(penalty), history=history,
    )


@dataclass
class KSelection:
    chosen: int
    held_out: dict  # k -> mean held-out log-likelihood per unit
    held_out_se: dict  # k -> its standard error (over units)


def choose_k(
    features, score, nu, fold_ids, candidates=(1, 2, 3, 4), *, init_effect=None, penalty: float = 0.1, seed: int = 0
) -> KSelection:
    """K with the best cross-validated held-out log-likelihood; a larger K must beat a smaller one
    by more than one standard error of the difference (the one-standard-error rule), so noise does
    not buy clusters."""
    X = np.asarray(features, dtype=float)
    g = np.asarray(score, dtype=float)
    nu = np.asarray(nu, dtype=float)
    fold_ids = np.asarray(fold_ids)
    init = None if init_effect is None else np.asarray(init_effect, dtype=float)
    per_unit: dict[int, np.ndarray] = {}
    for k in candidates:
        ll = np.empty(len(g))
        for f in np.unique(fold_ids):
            test = fold_ids == f
            fit = fit_effect_clusters(
                X[~test], g[~test], nu[~test], k, init_effect=None if init is None else init[~test],
                penalty=penalty, seed=seed,
            )
            ll[test] = fit.held_out_log_likelihood(X[test], g[test], nu[test])
        per_unit[int(k)] = ll
    ks = sorted(per_unit)
    chosen = ks[0]
    for k in ks[1:]:
        diff = per_unit[k] - per_unit[chosen]
        if diff.mean() > diff.std(ddof=1) / math.sqrt(len(diff)):
            chosen = k
    return KSelection(
        chosen=chosen,
        held_out={k: float(v.mean()) for k, v in per_unit.items()},
        held_out_se={k: float(v.std(ddof=1) / math.sqrt(len(v))) for k, v in per_unit.items()},
    )
