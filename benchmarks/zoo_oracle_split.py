"""Which nuisance an AIPW error comes from: tabular+image AIPW on the zoo's draws and folds with
each of {estimated, true} propensity x {linear (the headline's), + the products of the 4 leading
components, true} outcome models (the smaller arm borrowing, as the headline), and the outcome
models' mean error on the other arm's units.

    .venv/bin/python benchmarks/zoo_oracle_split.py --designs landsat_dark_500_nonlin --replications 30

``--clip Z``: the products of the 4 leading components after standardising each and clipping it to
[-Z, Z] (do the products act through their tails?). ``--support Q``: after clipping each to the
larger arm's [Q, 1 - Q] quantiles (does the larger arm's model extrapolate?).

Prints per design the bias, sd, mean SE, bias/SE and coverage of each pair. Results:
benchmarks/results/zoo/variants.md (section "session 11").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import zoo_parser  # noqa: E402

from eocausal import zoo  # noqa: E402
from eocausal.estimate.ate import estimate_effects  # noqa: E402
from eocausal.estimate.folds import make_folds  # noqa: E402
from eocausal.estimate.fragility import leading_products  # noqa: E402
from eocausal.estimate.nuisance import NuisanceSpec, cross_fit_outcome_arms, cross_fit_propensity  # noqa: E402

FOLDS = 5


def products(image: np.ndarray, clip: float | None, d: np.ndarray, support: float | None = None) -> np.ndarray:
    lead = image[:, :4]
    if support is not None:
        larger = lead[d == int(d.mean() >= 0.5)]
        lead = np.clip(lead, np.quantile(larger, support, axis=0), np.quantile(larger, 1 - support, axis=0))
    if clip is not None:
        lead = np.clip((lead - lead.mean(axis=0)) / lead.std(axis=0), -clip, clip)
    return leading_products(lead, 4)


def one(prepared: zoo.PreparedDesign, rep: int, clip: float | None = None, support: float | None = None) -> dict:
    draw = zoo.replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    image = prepared.components["default"][:, :zoo.DEFAULT_COMPONENTS]
    base = np.hstack([tab, image])
    fold_ids = make_folds(len(y), FOLDS, rep, stratify=d)
    spec = NuisanceSpec()
    e_hat, _ = cross_fit_propensity(base, d, fold_ids, spec)
    outcomes = {
        "linear": cross_fit_outcome_arms(base, y, d, fold_ids, spec)[0],
        "+ products": cross_fit_outcome_arms(np.hstack([base, products(image, clip, d, support)]), y, d, fold_ids, spec)[0],
        "true": {0: draw["mu0"], 1: draw["mu0"] + draw["tau"]},
    }
    out = {}
    for e_name, e in (("estimated", e_hat), ("true", draw["e"])):
        for mu_name, mu in outcomes.items():
            r = estimate_effects(y, d, base, estimators=("aipw",), folds=FOLDS, seed=rep, predictions={
                "propensity": e, "outcome_control": mu[0], "outcome_treated": mu[1]})["aipw"]
            out[(e_name, mu_name)] = (r.estimate - truth, r.std_error)
    for mu_name in ("linear", "+ products"):
        mu, true = outcomes[mu_name], outcomes["true"]
        out[("error", mu_name)] = (float(np.mean((mu[0] - true[0])[d == 1])), float(np.mean((mu[1] - true[1])[d == 0])))
    return out


def main(argv=None) -> int:
    parser = zoo_parser(__doc__, replications=30)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--support", type=float, default=None)
    args = parser.parse_args(argv)
    from joblib import Parallel, delayed

    for name in args.designs.split(","):
        prepared = zoo.prepare(zoo.design_by_name(name), Path(args.cache), Path(args.landsat))
        results = Parallel(n_jobs=args.jobs)(delayed(one)(prepared, rep, args.clip, args.support) for rep in range(args.replications))
        print(f"{name} ({args.replications} replications)")
        for key in results[0]:
            values = np.array([r[key] for r in results])
            if key[0] == "error":
                print(f"  outcome {key[1]}: mean error of mu0 on the treated {values[:, 0].mean():+.3f}, "
                      f"of mu1 on the controls {values[:, 1].mean():+.3f}")
                continue
            err, se = values[:, 0], values[:, 1]
            print(f"  propensity {key[0]:9s} outcome {key[1]:10s}  bias {err.mean():+.3f}  sd {err.std():.3f}  "
                  f"SE {se.mean():.3f}  bias/SE {err.mean() / se.mean():+.2f}  "
                  f"coverage {(np.abs(err) <= 1.96 * se).mean():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
