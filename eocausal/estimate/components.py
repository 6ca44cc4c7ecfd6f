"""How many image components the nuisance models get: chosen by cross-validated nuisance loss.

A fixed count fails both ways. Too few components lose the part of a confounder that lives in
the trailing components (a land-cover share within a small radius is often there); too many
make the penalised propensity model shrink every coefficient, the confounder's with the rest,
and the adjustment keeps part of the bias. The count is therefore chosen per study from a grid
(``CANDIDATES``, capped by the components stored) by the summed, variance-normalised
leave-one-out losses of the two nuisances, each a ridge regression on
``[tabular, leading k components]``:

    loss(k) = LOO-MSE(Y | X, PC_1..k, D) / Var(Y) + LOO-MSE(D | X, PC_1..k) / Var(D)

(the propensity as a linear probability model: its Brier score, which ranks feature sets as the
log-loss does while its leave-one-out error has a closed form). Each ridge's penalty is itself
chosen by leave-one-out from a grid. Ties within ``TOLERANCE`` go to the smaller count.

The choice uses Y and D but is one discrete tuning parameter among a handful, made before the
cross-fitting: the same practice as tuning a learner's penalty on the whole sample, which leaves
the cross-fitted scores' first-order properties unchanged. The confounder zoo
(:mod:`eocausal.zoo`) is the evidence for the rule and the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Component counts tried (those above the stored count are dropped).
CANDIDATES = (8, 16, 32, 64, 128)
# Ridge penalties, relative to the mean eigenvalue of the standardised design's Gram matrix.
_ALPHAS = np.logspace(-4, 3, 15)
# A larger count must lower the loss by more than this (in normalised-loss units) to be chosen.
TOLERANCE = 0.002


@dataclass
class ComponentChoice:
    n_components: int
    losses: dict[int, float] = field(default_factory=dict)  # k -> loss(k)
    rule: str = "min over k of LOO-MSE(Y|X,PC_k,D)/Var(Y) + LOO-MSE(D|X,PC_k)/Var(D) (ridge, LOO penalty)"

    def to_dict(self) -> dict:
        return {"n_components": self.n_components, "losses": {str(k): round(v, 6) for k, v in self.losses.items()},
                "rule": self.rule, "candidates": list(self.losses)}


def _loo_ridge_mse(Z: np.ndarray, target: np.ndarray) -> float:
    """The smallest leave-one-out MSE over the penalty grid of a ridge of ``target`` on ``Z``
    (columns standardised, intercept unpenalised), from one SVD (the hat matrix's diagonal)."""
    n = len(target)
    y = target - target.mean()
    sd = Z.std(axis=0)
    Zs = (Z - Z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    u, s, _ = np.linalg.svd(Zs, full_matrices=False)
    s2 = s * s
    uty = u.T @ y
    scale = max(float(s2.mean()), 1e-12)
    best = np.inf
    for a in _ALPHAS * scale:
        shrink = s2 / (s2 + a)
        fitted = u @ (shrink * uty)
        hat = (u * u) @ shrink + 1.0 / n  # + the intercept's leverage
        resid = (y - fitted) / np.clip(1.0 - hat, 1e-6, None)
        best = min(best, float(np.mean(resid * resid)))
    return best


def choose_components(
    y: np.ndarray,
    d: np.ndarray,
    tabular: np.ndarray | None,
    components: np.ndarray,
    candidates: tuple[int, ...] = CANDIDATES,
) -> ComponentChoice:
    """The image component count with the smallest cross-validated nuisance loss.

    ``components``: the image components, leading first ([n, K]); ``tabular``: [n, p] or None.
    Counts above K are not tried; K itself is tried when it is below every candidate.
    """
    y = np.asarray(y, dtype=float)
    d = np.asarray(d, dtype=float)
    components = np.asarray(components, dtype=float)
    n, available = components.shape
    grid = sorted({k for k in candidates if k <= available} or {available})
    tab = np.zeros((n, 0)) if tabular is None else np.asarray(tabular, dtype=float).reshape(n, -1)
    var_y, var_d = float(y.var()), float(d.var())
    losses: dict[int, float] = {}
    for k in grid:
        Z = np.hstack([tab, components[:, :k]])
        loss_y = _loo_ridge_mse(np.hstack([Z, d[:, None]]), y) / var_y if var_y > 0 else 0.0
        loss_d = _loo_ridge_mse(Z, d) / var_d if var_d > 0 else 0.0
        losses[k] = loss_y + loss_d
    chosen = grid[0]
    for k in grid[1:]:
        if losses[k] < losses[chosen] - TOLERANCE:
            chosen = k
    return ComponentChoice(chosen, losses)
