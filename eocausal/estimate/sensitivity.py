"""How strong would an unobserved confounder have to be to explain an AIPW / DML estimate away?

Omitted-variable-bias bounds for debiased machine learning (Chernozhukov, Cinelli, Newey, Sharma
& Syrgkanis 2022, "Long story short: omitted variable bias in causal machine learning"), in the
robustness-value form of Cinelli & Hazlett (2020).

Both estimators target a linear functional of the regression g(D, X) = E[Y | D, X], with a Riesz
representer alpha (AIPW, ATE: alpha = D/e - (1 - D)/(1 - e); DML, partially linear:
alpha = (D - m(X)) / E[(D - m(X))^2]). If a latent confounder A was left out of X, the estimate
theta_s (short) differs from the one that also adjusts for A (theta, long) by at most

    |theta_s - theta| <= |rho| * sqrt(r_y * r_d / (1 - r_d)) * S,    S^2 = sigma^2 * nu^2,

- sigma^2 = E[(Y - g(D, X))^2] and nu^2 = E[alpha^2], both estimable from the short model;
- ``r_y`` = the share of the outcome's residual variance that A explains: its partial R^2 with
  the outcome given D and X;
- ``r_d`` = 1 - E[alpha_s^2] / E[alpha^2], the share of the Riesz representer's variation due to
  A. In the partially linear model this is exactly the partial R^2 of A with the treatment given
  X; for the AIPW (ATE) it is the gain in the precision of the inverse-propensity weights;
- ``rho`` the correlation of the two confounding terms; |rho| = 1 is the worst case (default).

The robustness value RV is the equal strength r_y = r_d that moves the estimate to zero:
RV = (sqrt(f^4 + 4 f^2) - f^2) / 2 with f = |theta_s| / (|rho| S) (Cinelli & Hazlett's formula,
with their t / sqrt(dof) replaced by the DML ratio). RV_alpha is the strength at which the
confidence bound reaches zero, using the influence functions of theta, sigma^2 and nu^2 for the
bound's standard error. A confounder weaker than RV in both respects cannot explain the estimate
away; one stronger than RV in both can.

Everything needed to redraw the bounds (theta, sigma^2, nu^2, the covariance of their estimates,
the critical value) is kept in :class:`SensitivityStats`, which is stored with each estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats
from threadpoolctl import threadpool_limits

from eocausal.estimate.calibration import calibrated_weights_influence, weights_influence_total
from eocausal.estimate.folds import make_folds
from eocausal.estimate.nuisance import (
    NuisanceSpec,
    cross_fit_calibrated_propensity,
    cross_fit_outcome,
    cross_fit_outcome_arms,
    cross_fit_propensity,
)

# Estimators whose score has a Riesz representer these bounds are written for (ATE only).
SENSITIVITY_ESTIMATORS = ("aipw", "dml")
# Equal strengths r_y = r_d at which bounds are tabulated with every estimate.
DEFAULT_STRENGTHS = (0.01, 0.02, 0.05, 0.1, 0.2)
_MAX_STRENGTH = 1.0 - 1e-9
# In a note, marks bounds whose refitted estimate is not the reported one.
MISMATCH_NOTE = "differs from the reported estimate"


@dataclass(frozen=True)
class SensitivityStats:
    """The sufficient statistics of the bounds for one estimate (JSON-storable via to_dict)."""

    estimator: str
    theta: float
    std_error: float
    sigma2: float  # E[(Y - g(D, X))^2], out of fold
    nu2: float  # E[alpha^2]
    # Covariance of the estimates (theta, sigma2, nu2): influence functions, cluster-robust with groups.
    cov: list[list[float]]
    critical_value: float
    n: int
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """S = sqrt(sigma^2 nu^2): the bias of a confounder with r_y = 1 and C_D = 1."""
        return math.sqrt(max(self.sigma2, 0.0) * max(self.nu2, 0.0))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scale"] = self.scale
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityStats":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_strength(value, name: str) -> np.ndarray:
    value = np.asarray(value, dtype=float)
    if np.any(~np.isfinite(value)) or np.any(value < 0) or np.any(value >= 1):
        raise ValueError(f"{name} must lie in [0, 1) (a partial R^2), got {value.tolist()}")
    return value


def confounding_factor(r2_outcome, r2_treatment, rho: float = 1.0):
    """|rho| sqrt(r_y r_d / (1 - r_d)): the bias bound in units of S."""
    r_y = _check_strength(r2_outcome, "r2_outcome")
    r_d = _check_strength(r2_treatment, "r2_treatment")
    if not 0.0 <= abs(rho) <= 1.0:
        raise ValueError(f"rho must lie in [-1, 1], got {rho}")
    return abs(rho) * np.sqrt(r_y * r_d / (1.0 - r_d))


def bounds(stats: SensitivityStats, r2_outcome, r2_treatment, rho: float = 1.0) -> dict:
    """The estimate's range under a confounder of the given strengths, with confidence bounds.

    ``theta_lower``/``theta_upper``: theta -/+ the bias bound; ``ci_lower``/``ci_upper``: the
    lower (upper) confidence bound of theta_lower (theta_upper), so that [ci_lower, ci_upper]
    covers the long-model theta with the study's confidence level (Chernozhukov et al. 2022, §4).
    Arrays broadcast.
    """
    k = confounding_factor(r2_outcome, r2_treatment, rho)
    s = stats.scale
    bias = k * s
    se_lower = _bound_se(stats, -k)
    se_upper = _bound_se(stats, k)
    return {
        "bias_bound": bias,
        "theta_lower": stats.theta - bias,
        "theta_upper": stats.theta + bias,
        "ci_lower": stats.theta - bias - stats.critical_value * se_lower,
        "ci_upper": stats.theta + bias + stats.critical_value * se_upper,
    }


def _bound_se(stats: SensitivityStats, signed_k):
    """Standard error of theta + k S (delta method on the covariance of theta, sigma2, nu2)."""
    k = np.asarray(signed_k, dtype=float)
    s = stats.scale
    cov = np.asarray(stats.cov, dtype=float)
    if s > 0:
        g_sigma, g_nu = stats.nu2 / (2.0 * s), stats.sigma2 / (2.0 * s)
    else:
        g_sigma = g_nu = 0.0
    a = [np.ones_like(k), k * g_sigma, k * g_nu]
    var = sum(a[i] * a[j] * cov[i, j] for i in range(3) for j in range(3))
    return np.sqrt(np.maximum(var, 0.0))


def robustness_value(stats: SensitivityStats, rho: float = 1.0) -> float:
    """RV: the equal strength r_y = r_d of a confounder that would move the estimate to zero."""
    s = abs(rho) * stats.scale
    if s == 0:
        return 1.0 if stats.theta != 0 else 0.0
    f = abs(stats.theta) / s
    return float(0.5 * (math.sqrt(f**4 + 4.0 * f**2) - f**2))


def robustness_value_alpha(stats: SensitivityStats, rho: float = 1.0, tol: float = 1e-7) -> float:
    """RV_alpha: the equal strength at which the confidence bound nearest zero reaches zero.

    0 when the estimate is not significant to begin with.
    """
    sign = 1.0 if stats.theta >= 0 else -1.0

    def gap(r: float) -> float:  # distance of the confidence bound nearest zero from zero
        k = float(confounding_factor(r, r, rho))
        return abs(stats.theta) - k * stats.scale - stats.critical_value * float(_bound_se(stats, -sign * k))

    if gap(0.0) <= 0:
        return 0.0
    # Scan for the first sign change (the gap is monotone in practice; the scan guards against
    # a bump in the standard error), then bisect.
    grid = np.concatenate([np.linspace(0.0, 0.99, 100), [0.999, _MAX_STRENGTH]])
    values = [gap(r) for r in grid]
    first = next((i for i, v in enumerate(values) if v <= 0), None)
    if first is None:
        return 1.0
    lo, hi = grid[first - 1], grid[first]
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    return float(0.5 * (lo + hi))


def summary(stats: SensitivityStats, strengths=DEFAULT_STRENGTHS, rho: float = 1.0) -> dict:
    """JSON-ready: robustness values, the statistics, and bounds at equal strengths."""
    table = []
    for r in strengths:
        b = bounds(stats, r, r, rho)
        table.append({"r2": float(r), **{k: float(v) for k, v in b.items()}})
    return {
        "method": "omitted-variable-bias bounds for debiased ML (Chernozhukov et al. 2022), "
                  "robustness values as in Cinelli & Hazlett (2020)",
        "rho": float(rho),
        "robustness_value": robustness_value(stats, rho),
        "robustness_value_alpha": robustness_value_alpha(stats, rho),
        "stats": stats.to_dict(),
        "bounds_at_equal_strengths": table,
    }


def benchmark_strengths(long: SensitivityStats, short: SensitivityStats) -> tuple[float, float]:
    """(r_d, r_y) of an observed feature group, as if it were the omitted confounder: ``short``
    adjusts without the group, ``long`` with it (Chernozhukov et al. 2022, §6 benchmarking):
    r_y = 1 - sigma^2_long / sigma^2_short, r_d = 1 - nu^2_short / nu^2_long, each in [0, 0.99]."""
    r_y = 1.0 - long.sigma2 / short.sigma2 if short.sigma2 > 0 else 0.0
    r_d = 1.0 - short.nu2 / long.nu2 if long.nu2 > 0 else 0.0
    return float(np.clip(r_d, 0.0, 0.99)), float(np.clip(r_y, 0.0, 0.99))


# --- statistics from nuisance estimates --------------------------------------------------------


def sensitivity_stats(
    y, d, nuisance: dict, estimator: str, groups=None, alpha: float = 0.05,
    measured_outcome=None, measured_weight=None,
) -> SensitivityStats:
    """The bound statistics from an estimator's cross-fitted nuisances.

    ``nuisance``: for ``aipw`` the clipped propensity ``e`` and the arm regressions ``mu0``,
    ``mu1``; for ``dml`` ``e`` (= m(X), the treatment regression) and ``l`` (= E[Y | X]).
    ``groups``: cluster labels, for cluster-robust covariances (as the estimate's own SE).

    ``measured_outcome`` (NaN where missing) and ``measured_weight`` (1 / labelling probability):
    when ``y`` is an imputation pseudo-outcome, sigma^2 is taken from the measured outcomes
    instead (inverse-probability weighted), so that r_y is the partial R^2 with the outcome itself.
    The bias bound is unchanged by this (it depends on r_y sigma^2, the variance the confounder
    explains, which Y and the pseudo-outcome share); the robustness values become comparable with
    those of estimates on measured outcomes.
    """
    y = np.asarray(y, dtype=float)
    d = np.asarray(d, dtype=float)
    n = len(y)
    e = np.asarray(nuisance["e_weights" if estimator == "aipw" and "e_weights" in nuisance else "e"], dtype=float)
    notes = []
    if estimator == "aipw":
        mu0, mu1 = np.asarray(nuisance["mu0"], float), np.asarray(nuisance["mu1"], float)
        riesz = d / e - (1 - d) / (1 - e)
        psi = mu1 - mu0 + riesz * (y - np.where(d == 1, mu1, mu0))
        theta = psi.mean()
        psi_theta = psi - theta + weights_influence_total(nuisance)
        residual = y - np.where(d == 1, mu1, mu0)
        # E[alpha^2 | X] = 1/e + 1/(1 - e). Averaging that is far steadier than averaging alpha^2
        # or the debiased 2 m(W; alpha) - alpha^2, whose 1/e^2 terms explode near the clip.
        nu_terms = 1.0 / e + 1.0 / (1 - e)
    elif estimator == "dml":
        r_d = d - e
        r_y = y - np.asarray(nuisance["l"], dtype=float)
        var_d = np.mean(r_d * r_d)
        theta = (r_d * r_y).sum() / (r_d * r_d).sum()
        psi_theta = r_d * (r_y - theta * r_d) / var_d
        # g(D, X) = theta D + l(X) - theta m(X), so Y - g = r_y - theta r_d.
        residual = r_y - theta * r_d
        # alpha = r_d / E[r_d^2]: E[2 m - alpha^2] = 2 / E[r_d^2] - r_d^2 / E[r_d^2]^2.
        nu_terms = 2.0 / var_d - r_d**2 / var_d**2
    else:
        raise ValueError(f"sensitivity bounds are written for {SENSITIVITY_ESTIMATORS}, not {estimator!r}")
    if measured_outcome is None:
        sigma_terms = residual**2
        sigma2 = float(sigma_terms.mean())
    else:
        measured = np.asarray(measured_outcome, dtype=float)
        labelled = ~np.isnan(measured)
        # Y - g = (Y~ - g) - (Y~ - Y) on the labelled units.
        squared = np.where(labelled, np.square(residual - (y - np.nan_to_num(measured))), 0.0)
        w = np.where(labelled, np.asarray(measured_weight, dtype=float), 0.0)
        w = w / w.mean()  # Hajek: the weights average to one
        sigma2 = float(np.mean(w * squared))
        sigma_terms = w * (squared - sigma2) + sigma2  # influence w (r^2 - sigma2), mean sigma2
        notes.append("sigma2 from the measured outcomes (weighted by 1/labelling probability), so r_y "
                     "is the partial R^2 with the outcome, not with the imputation pseudo-outcome")
    nu2 = float(nu_terms.mean())
    influence = np.column_stack([psi_theta, sigma_terms - sigma2, nu_terms - nu2])
    cov, n_clusters = _mean_covariance(influence, groups)
    if n_clusters is None:
        critical = scipy_stats.norm.ppf(1 - alpha / 2)
    else:
        critical = scipy_stats.t.ppf(1 - alpha / 2, df=n_clusters - 1)
    return SensitivityStats(
        estimator=estimator,
        theta=float(theta),
        std_error=float(math.sqrt(max(cov[0, 0], 0.0))),
        sigma2=sigma2,
        nu2=nu2,
        cov=cov.tolist(),
        critical_value=float(critical),
        n=n,
        notes=notes,
    )


def _mean_covariance(influence: np.ndarray, groups) -> tuple[np.ndarray, int | None]:
    """Covariance of the column means: the same estimator as the effect's own standard error."""
    n = influence.shape[0]
    centred = influence - influence.mean(axis=0)
    if groups is None:
        return centred.T @ centred / (n * (n - 1)), None
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.ravel()
    n_clusters = int(codes.max()) + 1
    sums = np.zeros((n_clusters, influence.shape[1]))
    np.add.at(sums, codes, centred)
    return n_clusters / (n_clusters - 1) * sums.T @ sums / n**2, n_clusters


def cross_fitted_nuisance(
    y, d, X, estimators=SENSITIVITY_ESTIMATORS, folds: int = 5, seed: int = 0, groups=None,
    clip: float = 0.01, learner: str = "linear", spec: NuisanceSpec | None = None,
) -> dict:
    """The nuisances :func:`eocausal.estimate.ate.estimate_effect` fits for ``aipw``/``dml`` (ATE),
    refitted through the public nuisance API with the same folds, learners and seed, so the
    bounds describe the very estimate that was reported (``sensitivity_for_effects`` checks it).
    ``spec``: the estimate's nuisance learners (:func:`eocausal.estimate.ate.nuisance_spec`);
    None = the built-in ``learner`` with ``seed``. The propensity is fitted once for all ``estimators``."""
    unknown = sorted(set(estimators) - set(SENSITIVITY_ESTIMATORS))
    if unknown:
        raise ValueError(f"sensitivity bounds are written for {SENSITIVITY_ESTIMATORS}, not {unknown}")
    y = np.asarray(y, dtype=float)
    d = np.asarray(d).astype(int)
    n = len(y)
    if X is None or np.asarray(X).shape[1] == 0:
        share = d.mean()
        return {"e": np.full(n, share), "mu1": np.full(n, y[d == 1].mean()),
                "mu0": np.full(n, y[d == 0].mean()), "l": np.full(n, y.mean())}
    X = np.asarray(X, dtype=float)
    if groups is not None:
        groups = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    fold_ids = make_folds(n, folds, seed, stratify=d, groups=groups)
    spec = NuisanceSpec(learner=learner, seed=seed) if spec is None else spec
    e_raw, _ = cross_fit_propensity(X, d, fold_ids, spec)
    out = {"e_raw": e_raw, "e": np.clip(e_raw, clip, 1.0 - clip)}
    if "aipw" in estimators and spec.propensity_fit == "calibrated":  # the AIPW's weights, as the estimate's
        e_cal, _, calibrated_models = cross_fit_calibrated_propensity(X, d, fold_ids, spec)
        out["e_weights"] = np.clip(e_cal, clip, 1.0 - clip)
    if "aipw" in estimators:
        arms, _, _ = cross_fit_outcome_arms(X, y, d, fold_ids, spec)
        out["mu0"], out["mu1"] = arms[0], arms[1]
        if "e_weights" in out:  # the estimate's SE counts the calibrated weights' estimation too
            out.update(calibrated_weights_influence(calibrated_models, X, y, d, out, fold_ids, clip))
    if "dml" in estimators:
        out["l"], _ = cross_fit_outcome(X, y, fold_ids, spec)
    return out


def sensitivity_for_effects(
    y, d, X, estimators=SENSITIVITY_ESTIMATORS, folds: int = 5, seed: int = 0, groups=None,
    clip: float = 0.01, alpha: float = 0.05, learner: str = "linear",
    reported_estimates: dict[str, float] | None = None, trim: float | None = None,
    measured_outcome=None, measured_weight=None, spec: NuisanceSpec | None = None,
) -> dict[str, SensitivityStats]:
    """Bound statistics for AIPW and/or DML ATE estimates with features X (None: no features).

    ``trim``: as :func:`estimate_effect`'s, the bounds then cover the units kept.
    ``measured_outcome``/``measured_weight``: see :func:`sensitivity_stats`. With
    ``reported_estimates`` (estimator -> the estimate :func:`estimate_effect` returned), a note
    records any disagreement with the refitted nuisances' estimate, e.g. under repeated
    cross-fitting (the bounds are those of the first split; the reported estimate is a median).
    ``spec``: as :func:`cross_fitted_nuisance`'s.
    """
    with threadpool_limits(limits=1):  # as estimate_effect: reproducible, no thread contention
        nuisance = cross_fitted_nuisance(y, d, X, tuple(estimators), folds, seed, groups, clip, learner, spec)
    y, d = np.asarray(y, dtype=float), np.asarray(d).astype(int)
    if trim is not None and "e_raw" in nuisance:
        keep = (nuisance["e_raw"] >= trim) & (nuisance["e_raw"] <= 1.0 - trim)
        y, d = y[keep], d[keep]
        nuisance = {k: v[keep] for k, v in nuisance.items()}
        groups = None if groups is None else np.asarray(groups)[keep]
        if measured_outcome is not None:
            measured_outcome = np.asarray(measured_outcome, dtype=float)[keep]
            measured_weight = np.asarray(measured_weight, dtype=float)[keep]
    out = {}
    for estimator in estimators:
        stats = sensitivity_stats(y, d, nuisance, estimator, groups=groups, alpha=alpha,
                                  measured_outcome=measured_outcome, measured_weight=measured_weight)
        reported = (reported_estimates or {}).get(estimator)
        if reported is not None:
            gap = abs(stats.theta - reported)
            if gap > 1e-6 * max(1.0, abs(reported)):
                stats.notes.append(
                    f"bounds computed around {stats.theta:.6g}, which {MISMATCH_NOTE} "
                    f"{reported:.6g}: the refitted nuisances do not reproduce the estimator's"
                )
        out[estimator] = stats
    return out


# --- the contour plot --------------------------------------------------------------------------


def contour_plot(
    stats: SensitivityStats,
    path: Path,
    title: str = "",
    benchmarks: dict[str, tuple[float, float]] | None = None,
    rho: float = 1.0,
    max_strength: float | None = None,
) -> Path:
    """:func:`contour_figure` written as a PNG at ``path``."""
    from eocausal.figures import save_figure

    fig = contour_figure(stats, title, benchmarks, rho, max_strength)
    return save_figure(fig, path, dpi=fig.get_dpi())


def contour_figure(
    stats: SensitivityStats,
    title: str = "",
    benchmarks: dict[str, tuple[float, float]] | None = None,
    rho: float = 1.0,
    max_strength: float | None = None,
):
    """Contours of the bound nearest zero over (r_d, r_y): where it reaches zero (red line) and
    where its confidence bound does (dashed orange), RV and RV_alpha on the diagonal, and
    ``benchmarks`` (label -> (r_d, r_y)) as labelled points (a pyplot-free Figure)."""
    from matplotlib.colors import TwoSlopeNorm

    from eocausal.figures import new_figure

    rv, rv_a = robustness_value(stats, rho), robustness_value_alpha(stats, rho)
    points = [rv, rv_a] + [v for pair in (benchmarks or {}).values() for v in pair]
    top = max_strength or min(0.95, max(0.3, 1.5 * max(points)))
    grid = np.linspace(0.0, top, 121)
    r_d, r_y = np.meshgrid(grid, grid)
    sign = 1.0 if stats.theta >= 0 else -1.0
    b = bounds(stats, r_y, r_d, rho)
    nearest = b["theta_lower"] if sign > 0 else b["theta_upper"]
    confidence = b["ci_lower"] if sign > 0 else b["ci_upper"]

    fig = new_figure((6.0, 5.2), dpi=110)
    ax = fig.subplots()
    low, high = float(np.nanmin(nearest)), float(np.nanmax(nearest))
    # White at zero: red where the estimate keeps its sign, blue where the bias could flip it.
    norm = TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high) if low < 0 < high else None
    filled = ax.contourf(r_d, r_y, nearest, levels=20, cmap="RdBu_r" if sign > 0 else "RdBu", norm=norm)
    fig.colorbar(filled, ax=ax, label="estimate after the worst-case bias")
    lines = ax.contour(r_d, r_y, nearest, levels=8, colors="k", linewidths=0.5, alpha=0.6)
    ax.clabel(lines, fontsize=7, fmt="%.2f")
    if low < 0 < high:
        ax.contour(r_d, r_y, nearest, levels=[0.0], colors="red", linewidths=2.0)
    if np.nanmin(confidence * sign) < 0 < np.nanmax(confidence * sign):
        ax.contour(r_d, r_y, confidence, levels=[0.0], colors="darkorange", linewidths=1.5, linestyles="--")
    ax.plot([0, top], [0, top], color="0.4", lw=0.6, ls=":")
    ax.plot([rv], [rv], "o", color="red", ms=7, label=f"RV = {rv:.3f} (estimate to zero)")
    ax.plot([rv_a], [rv_a], "s", color="darkorange", ms=6, label=f"RV_alpha = {rv_a:.3f} (not significant)")
    for label, (bd, by) in (benchmarks or {}).items():
        ax.plot([bd], [by], "^", color="black", ms=7)
        ax.annotate(label, (bd, by), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("confounder strength with treatment (r_d: partial R² / Riesz gain)")
    ax.set_ylabel("confounder strength with outcome (r_y: partial R²)")
    ax.set_title(title or f"{stats.estimator}: estimate {stats.theta:.3f} (SE {stats.std_error:.3f})", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig
