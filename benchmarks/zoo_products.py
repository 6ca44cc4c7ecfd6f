"""Where the products of the leading image components act: in both nuisances, in the propensity
only, or in the outcome models only. Tabular+image AIPW on the zoo's draws and folds, against the
headline (64 components + tabular), with the paired comparison of the specification check.

    .venv/bin/python benchmarks/zoo_products.py --replications 30 \
        --designs landsat_mix_750,landsat_dark_500_nonlin,landsat_texture_600,landsat_bright_750,demo_edges_450_chip32

Variants: ``prodM`` (squares and products of the M leading components in both nuisances, as the
specification check's comparison), ``pprodM`` (propensity only), ``oprodM`` (outcome models only),
``cprodM`` (the control arm's outcome model only), ``iprodM`` (one outcome model for both arms:
the products shared, treatment and its interactions with the linear features per arm); with the
outcome models per arm as the headline's (the smaller arm borrows, effects-8): ``boprodM`` (the
products in the outcome models only), ``soprodM`` (the outcome features, with or without the
products, chosen per fit by the out-of-fold squared error of the observed arm's prediction).
Prints per design and variant: the headline's bias/SE, the variant's bias, sd, mean SE, bias/SE,
coverage, and the median |z| and rate beyond 3 SE of its paired comparison with the headline.
Results: benchmarks/results/zoo/variants.md (section 2026-12-07).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.model_selection import KFold, cross_val_predict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import replication_rows, zoo_parser  # noqa: E402

from eocausal import zoo  # noqa: E402
from eocausal.estimate.ate import estimate_effects  # noqa: E402
from eocausal.estimate.folds import make_folds  # noqa: E402
from eocausal.estimate.fragility import compare, leading_products  # noqa: E402
from eocausal.estimate.nuisance import (  # noqa: E402
    NuisanceSpec,
    cross_fit_outcome,
    cross_fit_outcome_arms,
    cross_fit_propensity,
    outcome_model,
)

FOLDS = 5


class IndexPowers(RegressorMixin, BaseEstimator):
    """The built-in outcome model on X, then again on X plus powers of its (standardised)
    prediction: a nonlinear surface of a confounder that X holds linearly. The index of the
    training rows is cross-fitted (3 folds), so the second stage does not see an overfitted one."""

    def __init__(self, powers=(2, 3)):
        self.powers = powers

    def _with_powers(self, X, index):
        t = (index - self.centre_) / self.scale_
        return np.hstack([X] + [t[:, None] ** p for p in self.powers])

    def fit(self, X, y):
        spec = NuisanceSpec()
        first = outcome_model(spec, len(y))
        index = cross_val_predict(first, X, y, cv=KFold(3, shuffle=True, random_state=0))
        self.first_ = clone(first).fit(X, y)
        self.centre_, self.scale_ = float(index.mean()), float(index.std()) or 1.0
        self.second_ = outcome_model(spec, len(y)).fit(self._with_powers(X, index), y)
        return self

    def predict(self, X):
        return self.second_.predict(self._with_powers(X, self.first_.predict(X)))


def one(prepared: zoo.PreparedDesign, rep: int, variants: list[str]) -> list[dict]:
    design = prepared.design
    draw = zoo.replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    image = prepared.components["default"][:, :zoo.DEFAULT_COMPONENTS]
    base = np.hstack([tab, image])
    headline = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep)["aipw"]
    fold_ids = make_folds(len(y), FOLDS, rep, stratify=d)  # estimate_effects(seed=rep)'s folds
    spec = NuisanceSpec()

    def aipw(e, mu0, mu1):
        return estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep, predictions={
            "propensity": e, "outcome_control": mu0, "outcome_treated": mu1})["aipw"]

    def observed_arm_loss(arms):
        return float(np.mean((y - np.where(d == 1, arms[1], arms[0])) ** 2))

    rows = []
    for variant in variants:
        if variant.startswith("idx"):  # the headline's propensity; outcome arms on X + index powers
            e, _ = cross_fit_propensity(base, d, fold_ids, spec)
            powers = tuple(int(c) for c in variant[3:])
            arms, _, _ = cross_fit_outcome_arms(base, y, d, fold_ids, NuisanceSpec(outcome_learner=IndexPowers(powers)))
            r = aipw(e, arms[0], arms[1])
        else:
            r = _products_variant(variant, y, d, base, image, fold_ids, spec, rep, aipw, observed_arm_loss)
        rows.append({"design": design.name, "replication": rep, "variant": variant,
                     "headline_error": headline.estimate - truth, "headline_se": headline.std_error,
                     "error": r.estimate - truth, "se": r.std_error, "covered": r.ci_low <= truth <= r.ci_high,
                     "z": compare(variant, headline, r).z})
    return rows


def _products_variant(variant, y, d, base, image, fold_ids, spec, rep, aipw, observed_arm_loss):
    where = {"pprod": "p", "oprod": "o", "cprod": "c", "iprod": "i", "boprod": "bo",
             "soprod": "so", "cvboprod": "cvbo"}.get(variant[:variant.index("prod") + len("prod")], "b")
    m = int(variant[variant.index("prod") + len("prod"):])
    expanded = np.hstack([base, leading_products(image, m)])
    if where == "b":
        return estimate_effects(y, d, expanded, estimators=("aipw",), folds=FOLDS, seed=rep)["aipw"]
    if where in ("bo", "so", "cvbo"):  # the headline's propensity and outcome arms, products in the outcomes
        # cvbo: the propensity at its CV penalty (not undersmoothed)
        e, _ = cross_fit_propensity(base, d, fold_ids, NuisanceSpec(undersmooth=1.0) if where == "cvbo" else spec)
        arms, _, _ = cross_fit_outcome_arms(expanded, y, d, fold_ids, spec)
        if where == "so":
            plain, _, _ = cross_fit_outcome_arms(base, y, d, fold_ids, spec)
            arms = arms if observed_arm_loss(arms) < observed_arm_loss(plain) else plain
        return aipw(e, arms[0], arms[1])
    if where == "i":  # one outcome model for both arms: products shared, the linear terms per arm
        e, _ = cross_fit_propensity(base, d, fold_ids, spec)

        def pooled(arm):
            return np.hstack([expanded, arm[:, None], arm[:, None] * base])

        mu0, mu1 = np.empty(len(y)), np.empty(len(y))
        for k in np.unique(fold_ids):
            test = fold_ids == k
            model = outcome_model(spec, int((~test).sum())).fit(pooled(d.astype(float))[~test], y[~test])
            mu0[test] = model.predict(pooled(np.zeros(len(y)))[test])
            mu1[test] = model.predict(pooled(np.ones(len(y)))[test])
        return aipw(e, mu0, mu1)
    # the products in one nuisance only
    e, _ = cross_fit_propensity(expanded if where == "p" else base, d, fold_ids, spec)
    control_x = base if where == "p" else expanded
    treated_x = expanded if where == "o" else base
    mu0, _ = cross_fit_outcome(control_x, y, fold_ids, spec, fit_on=d == 0, arms=(0,))
    mu1, _ = cross_fit_outcome(treated_x, y, fold_ids, spec, fit_on=d == 1, arms=(1,))
    return aipw(e, mu0, mu1)


def main(argv=None) -> int:
    parser = zoo_parser(__doc__, replications=30)
    parser.set_defaults(designs="landsat_mix_750,landsat_dark_500_nonlin,landsat_texture_600,landsat_bright_750,"
                                "demo_edges_450_chip32")
    parser.add_argument("--variants", default="pprod4,oprod4,prod4")
    args = parser.parse_args(argv)
    frame = pd.DataFrame(replication_rows(args, one, args.variants.split(",")))
    table = frame.groupby(["design", "variant"], sort=False).agg(
        headline_bias=("headline_error", "mean"), headline_se=("headline_se", "mean"), bias=("error", "mean"),
        sd=("error", "std"), se=("se", "mean"), coverage=("covered", "mean"),
        headline_rmse=("headline_error", lambda s: float(np.sqrt((s ** 2).mean()))),
        rmse=("error", lambda s: float(np.sqrt((s ** 2).mean()))),
        median_abs_z=("z", lambda s: s.abs().median()), beyond_3=("z", lambda s: (s.abs() > 3).mean()))
    table.insert(2, "headline_bias_over_se", table.pop("headline_bias") / table["headline_se"])
    table["bias_over_se"] = table["bias"] / table["se"]
    pd.set_option("display.width", 200)
    print(table.drop(columns="headline_se").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
