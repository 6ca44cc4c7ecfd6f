"""Rank-weighted average treatment effects (RATE; Yadlowsky, Fleming, Shah, Brunskill & Wager,
"Evaluating treatment prioritization rules via rank-weighted average treatment effects", 2021).

A prioritisation rule S (e.g. a CATE model's predictions) ranks units; with doubly robust scores
Gamma_i (E[Gamma_i | X_i] = tau(X_i)) the targeting operator characteristic is

    TOC(q) = mean of Gamma over the top ceil(q n) units by S  -  mean of Gamma over all units,

and RATE integrates it: AUTOC weights every q equally, Qini weights by q. With the grf package's
normalisation (``rank_average_treatment_effect``; unit sample weights):

    AUTOC = (1/n) sum_{i=1..n} TOC(i/n),    Qini = (1/n) sum_{i=1..n} (i/n) TOC(i/n).

Units with tied priorities share the average of their scores. Standard errors come from grf's
half-sample bootstrap: R draws of half the units (or half the clusters) without replacement; the
SE is the standard deviation of the R estimates (half-sampling without replacement already has
the full sample's variance for smooth statistics, so no rescaling).

Valid inference needs priorities fitted without the units they rank (held-out folds) and scores
that are cross-fitted: :mod:`eocausal.estimate.cate` provides both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

TARGETS = ("AUTOC", "QINI")
DEFAULT_Q = tuple(np.round(np.arange(0.05, 1.0001, 0.05), 2))


@dataclass
class RateResult:
    target: str  # "AUTOC" | "QINI"
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    n: int
    n_bootstrap: int
    q: list[float] = field(default_factory=list)  # the TOC grid
    toc: list[float] = field(default_factory=list)  # TOC(q) on the grid
    toc_std_error: list[float] = field(default_factory=list)

    @property
    def z(self) -> float:
        return self.estimate / self.std_error if self.std_error > 0 else float("nan")

    @property
    def p_value(self) -> float:
        """Two-sided p-value for RATE = 0 (no heterogeneity that the rule can target)."""
        return float(2 * stats.norm.sf(abs(self.z))) if self.std_error > 0 else float("nan")


def _tie_averaged_sorted(scores: np.ndarray, priorities: np.ndarray) -> np.ndarray:
    """Scores sorted by decreasing priority, each tie group replaced by its mean."""
    order = np.argsort(-priorities, kind="stable")
    sorted_prio = priorities[order]
    sorted_scores = scores[order]
    # Group boundaries where the priority changes.
    starts = np.flatnonzero(np.r_[True, sorted_prio[1:] != sorted_prio[:-1]])
    if len(starts) == len(scores):
        return sorted_scores
    sums = np.add.reduceat(sorted_scores, starts)
    counts = np.diff(np.r_[starts, len(scores)])
    return np.repeat(sums / counts, counts)


def _rate_and_toc(sorted_scores: np.ndarray, q: np.ndarray, target: str) -> tuple[float, np.ndarray]:
    n = len(sorted_scores)
    ate = sorted_scores.mean()
    ranks = np.arange(1, n + 1)
    toc_all = np.cumsum(sorted_scores) / ranks - ate
    if target == "AUTOC":
        rate = toc_all.mean()
    else:
        rate = (ranks / n * toc_all).mean()
    # TOC on the grid, using a fraction of the boundary unit when q n is not whole (as grf does).
    qn = q * n
    whole = np.floor(qn + 1e-12).astype(int)
    frac = qn - whole
    csum = np.r_[0.0, np.cumsum(sorted_scores)]
    nxt = sorted_scores[np.minimum(whole, n - 1)]
    numer = csum[whole] + frac * nxt
    toc_grid = numer / np.maximum(qn, 1e-300) - ate
    return float(rate), toc_grid


def rank_average_treatment_effect(
    scores,
    priorities,
    target: str = "AUTOC",
    q=DEFAULT_Q,
    n_bootstrap: int = 200,
    seed: int = 0,
    clusters=None,
    alpha: float = 0.05,
) -> RateResult:
    """RATE of a prioritisation rule, with half-sample bootstrap SE and a normal CI.

    - ``scores``: doubly robust scores Gamma_i (e.g. AIPW pseudo-outcomes), cross-fitted.
    - ``priorities``: the rule's scores S(X_i), higher = treat first; fitted on other units.
    - ``clusters``: optional cluster labels; the bootstrap then draws half of the clusters.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    scores = np.asarray(scores, dtype=float).ravel()
    priorities = np.asarray(priorities, dtype=float).ravel()
    if scores.shape != priorities.shape:
        raise ValueError(f"scores ({scores.size}) and priorities ({priorities.size}) must have the same length")
    if not (np.isfinite(scores).all() and np.isfinite(priorities).all()):
        raise ValueError("scores and priorities must be finite")
    q = np.asarray(q, dtype=float)
    if q.ndim != 1 or len(q) == 0 or np.any(np.diff(q) <= 0) or q[0] <= 0 or not np.isclose(q[-1], 1.0):
        raise ValueError("q must be an increasing grid of fractions in (0, 1] ending at 1")
    n = len(scores)
    if clusters is None:
        codes = np.arange(n)
    else:
        _, codes = np.unique(np.asarray(clusters), return_inverse=True)
        codes = codes.ravel()
    n_clusters = int(codes.max()) + 1 if n else 0
    if n_clusters // 2 < 2:
        raise ValueError(f"need at least 4 units (or clusters) for the half-sample bootstrap, got {n_clusters}")

    estimate, toc = _rate_and_toc(_tie_averaged_sorted(scores, priorities), q, target)

    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(codes == c) for c in range(n_clusters)] if clusters is not None else None
    boot_rate = np.empty(n_bootstrap)
    boot_toc = np.empty((n_bootstrap, len(q)))
    half = n_clusters // 2
    for b in range(n_bootstrap):
        drawn = rng.choice(n_clusters, size=half, replace=False)
        idx = drawn if members is None else np.concatenate([members[c] for c in drawn])
        boot_rate[b], boot_toc[b] = _rate_and_toc(
            _tie_averaged_sorted(scores[idx], priorities[idx]), q, target
        )
    std_error = float(boot_rate.std(ddof=1)) if n_bootstrap >= 2 else 0.0
    toc_se = boot_toc.std(axis=0, ddof=1) if n_bootstrap >= 2 else np.zeros(len(q))
    critical = stats.norm.ppf(1 - alpha / 2)
    return RateResult(
        target=target,
        estimate=estimate,
        std_error=std_error,
        ci_low=estimate - critical * std_error,
        ci_high=estimate + critical * std_error,
        n=n,
        n_bootstrap=int(n_bootstrap),
        q=[float(v) for v in q],
        toc=[float(v) for v in toc],
        toc_std_error=[float(v) for v in toc_se],
    )


def pehe(tau_hat, tau_true) -> float:
    """Precision in estimating heterogeneous effects: sqrt(mean((tau_hat - tau)^2))."""
    tau_hat = np.asarray(tau_hat, dtype=float)
    tau_true = np.asarray(tau_true, dtype=float)
    if tau_hat.shape != tau_true.shape:
        raise ValueError(f"shapes differ: {tau_hat.shape} vs {tau_true.shape}")
    return float(np.sqrt(np.mean(np.square(tau_hat - tau_true))))
