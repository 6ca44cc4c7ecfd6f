"""Calibrated propensities (Tan 2020, "regularized calibrated estimation"): each arm's inverse
propensity weights fitted by the calibration loss, whose first-order condition is that the weighted
arm's feature means equal the whole sample's (covariate balance), instead of by the log-likelihood.
An AIPW score's bias is the weighted imbalance of the outcome models' errors, so weights that
balance the features remove whatever part of those errors the features span. Tabular+image AIPW on
the zoo's draws and folds, against the headline.

    .venv/bin/python benchmarks/zoo_calibrated.py --replications 30 \
        --designs landsat_mix_750,landsat_dark_500_nonlin,landsat_texture_600,landsat_bright_750,demo_edges_450_chip32

Variants (``--variants``, comma-separated): ``product`` (the shipped option,
``estimate_effects(..., propensity_fit="calibrated")``), ``cal`` (the calibrated propensity on the headline's
features, the headline's outcome models), ``calbo`` (the same with the squares and products of the
4 leading components in the outcome models), ``calpbo`` (the products in both), ``bo`` (the
headline's propensity, products in the outcome models, for reference); a suffix ``/U`` divides the
calibration penalty chosen by inner CV by U (undersmoothing, as the headline's), ``w`` before the
suffix fits the outcome models with Tan's weights ((1 - pi) / pi of the arm, normalised).
``cal``, ``calbo`` and ``calpbo`` without a suffix fit the product's per-arm models
(nuisance.cross_fit_calibrated_propensity) and their SE counts the weights' estimation, as the
product's does (calibration.weight_estimation_influence); the others take the weights as known.
Prints per design and variant the bias, sd, mean SE, bias/SE, coverage and RMSE (the headline's on
the same draws first). Results: benchmarks/results/zoo/variants.md (sections "session 12" and
"session 13").
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import variant_main, variant_row  # noqa: E402

from eocausal import zoo  # noqa: E402
from eocausal.estimate.ate import DEFAULT_CLIP, estimate_effects, with_influence  # noqa: E402
from eocausal.estimate.calibration import CalibratedLogisticCV, calibrated_weights_influence  # noqa: E402
from eocausal.estimate.folds import make_folds  # noqa: E402
from eocausal.estimate.fragility import leading_products  # noqa: E402
from eocausal.estimate.nuisance import (  # noqa: E402
    NuisanceSpec,
    cross_fit_calibrated_propensity,
    cross_fit_outcome_arms,
    cross_fit_propensity,
)

FOLDS = 5
LAMBDAS = np.logspace(-5, 0, 11)


def calibrated_arm_logodds(F_train, a_train, F_test, undersmooth: float, seed: int):
    """The test and training rows' log-odds of being in the arm, by the product's calibrated model
    (eocausal.estimate.calibration: penalty by 3-fold inner CV, divided by ``undersmooth``)."""
    model = CalibratedLogisticCV(lambdas=LAMBDAS, seed=seed, undersmooth=undersmooth).fit(F_train, a_train)
    return model.decision_function(F_test), model.decision_function(F_train)


def cross_fit_calibrated(F, d, fold_ids, undersmooth: float, seed: int):
    """Out-of-fold propensity to put in the AIPW score: for treated units the treated arm's
    calibrated P(D=1), for controls 1 - the control arm's calibrated P(D=0); and each arm's
    Tan weights (1 - pi) / pi on the training rows of each fold (for the weighted outcome fits)."""
    e = np.empty(len(d))
    train_weights = {}
    for k in np.unique(fold_ids):
        test, train = fold_ids == k, fold_ids != k
        eta1, eta1_train = calibrated_arm_logodds(F[train], d[train].astype(float), F[test], undersmooth, seed)
        eta0, eta0_train = calibrated_arm_logodds(F[train], 1.0 - d[train], F[test], undersmooth, seed)
        p1 = 1 / (1 + np.exp(-eta1))
        p0 = 1 / (1 + np.exp(-eta0))
        e[test] = np.where(d[test] == 1, p1, 1 - p0)
        train_weights[int(k)] = {1: np.exp(-eta1_train), 0: np.exp(-eta0_train)}
    return e, train_weights


def weighted_arms(X, y, d, fold_ids, train_weights):
    """Each arm's ridge outcome model on its own units weighted by Tan's (1 - pi) / pi, the ridge
    penalty as the headline's outcome models choose it (on the unweighted fit)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from eocausal.estimate.nuisance import outcome_model

    out = {0: np.empty(len(y)), 1: np.empty(len(y))}
    spec = NuisanceSpec()
    for k in np.unique(fold_ids):
        test, train = fold_ids == k, fold_ids != k
        for arm in (0, 1):
            on = train & (d == arm)
            chooser = outcome_model(spec, int(on.sum())).fit(X[on], y[on])
            alpha = float(chooser.named_steps["model"].alpha_)
            scaler = StandardScaler().fit(X[on])
            w = train_weights[int(k)][arm][d[train] == arm]
            model = Ridge(alpha=alpha).fit(scaler.transform(X[on]), y[on], sample_weight=w / w.mean())
            out[arm][test] = model.predict(scaler.transform(X[test]))
    return out


def one(prepared: zoo.PreparedDesign, rep: int, variants: list[str]) -> list[dict]:
    draw = zoo.replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    image = prepared.components["default"][:, :zoo.DEFAULT_COMPONENTS]
    base = np.hstack([tab, image])
    expanded = np.hstack([base, leading_products(image, 4)])
    fold_ids = make_folds(len(y), FOLDS, rep, stratify=d)
    spec = NuisanceSpec()
    headline = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep)["aipw"]
    cache = {}

    def arms(X_name):
        key = ("arms", X_name)
        if key not in cache:
            cache[key] = cross_fit_outcome_arms(base if X_name == "base" else expanded, y, d, fold_ids, spec)[0]
        return cache[key]

    rows = []
    for variant in variants:
        if variant == "product":  # the shipped option: analysis.propensity_fit = calibrated
            r = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep,
                                 propensity_fit="calibrated")["aipw"]
            rows.append(_row(prepared, variant, rep, truth, headline, r))
            continue
        name, _, u = variant.partition("/")
        undersmooth = float(u) if u else 1.0
        weighted = name.endswith("w")
        name = name.rstrip("w")
        if name == "bo":
            e, _ = cross_fit_propensity(base, d, fold_ids, spec)
            mu = arms("expanded")
        elif undersmooth == 1.0 and not weighted:  # the product's fit, and its SE with the weights' term
            F = expanded if name == "calpbo" else base
            e, _, models = cross_fit_calibrated_propensity(F, d, fold_ids, replace(spec, seed=rep))
            mu = arms("base" if name == "cal" else "expanded")
            r = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep, predictions={
                "propensity": e, "outcome_control": mu[0], "outcome_treated": mu[1]})["aipw"]
            extra = calibrated_weights_influence(models, F, y, d, {"mu0": mu[0], "mu1": mu[1]}, fold_ids, DEFAULT_CLIP)
            r = with_influence(r, r.influence + sum(extra.values()))
            rows.append(_row(prepared, variant, rep, truth, headline, r))
            continue
        else:
            F = expanded if name == "calpbo" else base
            e, tw = cross_fit_calibrated(F, d, fold_ids, undersmooth, rep)
            X_out = base if name == "cal" else expanded
            mu = weighted_arms(X_out, y, d, fold_ids, tw) if weighted else arms("base" if name == "cal" else "expanded")
        r = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep, predictions={
            "propensity": e, "outcome_control": mu[0], "outcome_treated": mu[1]})["aipw"]
        rows.append(_row(prepared, variant, rep, truth, headline, r))
    return rows


def _row(prepared, variant, rep, truth, headline, r) -> dict:
    return variant_row(prepared, variant, rep, truth, headline, r)


def main(argv=None) -> int:
    return variant_main(__doc__, one, "cal,calbo,calpbo,bo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
