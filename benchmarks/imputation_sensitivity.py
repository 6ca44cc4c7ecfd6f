"""Monte Carlo for outcome imputation and sensitivity analysis (issue 8's done-when checks).

1. Coverage with missing outcomes: on the demo scene's units (real Landsat-8 pixels, RCF
   embeddings, fixed), each replication redraws covariates, treatment and outcomes from the demo
   process and blanks a random 70 % of the outcomes. The 95 % CI of the corrected
   (prediction-powered) estimator should cover the truth at the nominal rate; the plug-in's
   should not. Designs: ``randomised`` (a trial), ``observational`` (the demo's image-targeted
   treatment, adjusted for the image: what remains of its confounding shows with all outcomes
   measured too) and ``observational_oracle`` (the same, with the true confounder among the
   features, so that only the imputation is under test).
2. Robustness values against a hidden confounder: the same units, outcomes drawn from
   HiddenConfounderProcess. With the confounder hidden, the robustness value should fall below
   its actual partial R²s (the analysis flags the problem); with nothing hidden (the confounder
   measured and adjusted for), above them.

Usage (about an hour on one core at the defaults; --quick for a smoke run):

    .venv/bin/python benchmarks/imputation_sensitivity.py --out benchmarks/results/imputation_sensitivity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eocausal.estimate.sensitivity import sensitivity_for_effects, contour_plot  # noqa: E402
from eocausal.montecarlo import prepare_design  # noqa: E402
from eocausal.simulate import (  # noqa: E402
    HiddenConfounderProcess,
    _survey_features,
    coverage_table,
    imputation_monte_carlo,
    robustness_table,
    sensitivity_monte_carlo,
)


DESIGNS = ("observational", "observational_oracle", "randomised")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table.itertuples(index=False):
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contour_figures(design, out: Path, seed: int) -> dict:
    """Replication 0 of the sensitivity design: contours with the hidden confounder's actual strength."""
    process = HiddenConfounderProcess()
    z = design.confounder_std
    strengths = process.strengths(z)
    draws = process.draw(z, np.random.default_rng(np.random.SeedSequence([seed, 0x41DE, 0])))
    features = design.image_features[1]
    worlds = {
        "hidden": _survey_features(draws, features),
        "nothing_hidden": _survey_features(draws, features, extra=[draws["hidden_confounder"].to_numpy()]),
    }
    paths = {}
    for world, X in worlds.items():
        stats = sensitivity_for_effects(draws["outcome"].to_numpy(), draws["treatment"].to_numpy(), X, folds=5, seed=0)
        for estimator, s in stats.items():
            r_d = strengths["riesz_gain"] if estimator == "aipw" else strengths["r2_treatment"]
            path = contour_plot(
                s, out / f"contour_{world}_{estimator}.png",
                title=f"{estimator}, {'confounder hidden' if world == 'hidden' else 'nothing hidden'}: {s.theta:.3f} (SE {s.std_error:.3f})",
                benchmarks={"hidden confounder (actual)": (r_d, strengths["r2_outcome"])},
                max_strength=0.6,
            )
            paths[f"{world}_{estimator}"] = str(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/imputation_sensitivity")
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--sensitivity-replications", type=int, default=50)
    parser.add_argument("--n-units", type=int, default=1500, help="units sampled on the demo scene (the demo's 1,500)")
    parser.add_argument("--components", type=int, default=64, help="principal components of the embedding (the demo's 64)")
    parser.add_argument("--missing-share", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--what", choices=["imputation", "sensitivity", "both"], default="both")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 replications, 300 units")
    args = parser.parse_args(argv)
    if args.quick:
        args.replications, args.sensitivity_replications, args.n_units = 5, 3, 300

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Embeddings are cached outside the results (.eocausal/ is git-ignored).
    design = prepare_design(n_units=args.n_units, seed=args.seed, factors=(1,), image_components=args.components,
                            cache_dir=ROOT / ".eocausal" / "mc_cache", log=log)
    features = design.image_features[1]
    log(f"design: {design.n_units} analysis units, {features.shape[1]} image components")
    summary = {"settings": {**design.settings, **{k: v for k, v in vars(args).items() if k != "out"}}}

    if args.what in ("imputation", "both"):
        tables = []
        for name in args.designs.split(","):
            if name not in DESIGNS:
                parser.error(f"unknown design {name!r}; known: {DESIGNS}")
            randomised = name == "randomised"
            estimators = ("difference_in_means", "aipw") if randomised else ("aipw", "dml")
            # observational_oracle: the true confounder joins the image features, so adjustment is
            # right and only the imputation is under test.
            adjust = np.column_stack([design.confounder_std, features]) if name == "observational_oracle" else features
            results = imputation_monte_carlo(
                design.confounder_std, adjust, args.replications, missing_share=args.missing_share,
                estimators=estimators, randomised=randomised, seed=args.seed, log=log,
            )
            results.insert(0, "design", name)
            results.to_csv(out / f"imputation_{name}.csv", index=False)
            table = coverage_table(results)
            table.insert(0, "design", name)
            tables.append(table)
            log(f"imputation, {name}:\n{markdown(table)}")
        coverage = pd.concat(tables, ignore_index=True)
        (out / "imputation_coverage.md").write_text(markdown(coverage) + "\n")
        summary["imputation_coverage"] = coverage.to_dict(orient="records")

    if args.what in ("sensitivity", "both"):
        results, strengths = sensitivity_monte_carlo(
            design.confounder_std, features, args.sensitivity_replications, seed=args.seed, log=log,
        )
        results.to_csv(out / "sensitivity.csv", index=False)
        table = robustness_table(results)
        (out / "robustness.md").write_text(markdown(table) + "\n")
        log(f"sensitivity (strengths {strengths}):\n{markdown(table)}")
        summary["hidden_confounder_strengths"] = strengths
        summary["robustness"] = table.to_dict(orient="records")
        summary["figures"] = contour_figures(design, out, args.seed)

    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    log(f"done in {summary['seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
