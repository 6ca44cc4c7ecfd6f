"""Tabular+image AIPW under nuisance variants on chosen zoo designs, same draws as the zoo
(``eocausal simulate --zoo``; its cache under benchmarks/results/zoo/cache must exist).

    .venv/bin/python benchmarks/zoo_variants.py --designs procedural_vegetation_900_n500,demo_proximity_900 \
        --replications 30 --variants default,cv_penalty,k32,k16
    .venv/bin/python benchmarks/zoo_variants.py --designs landsat_mix_750,demo_proximity_900 \
        --replications 20 --variants default,boosting

Variants: ``default`` (the product's: linear nuisances, undersmoothed, 64 components), ``cv_penalty``
(the penalties as inner CV picks them), ``k32``/``k16`` (fewer components), ``boosting`` (gradient
boosting for both nuisances). Prints bias, sd, mean SE, coverage, bias/SE, RMSE and seconds per fit.
Results: benchmarks/results/zoo/variants.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import zoo
from eocausal.estimate.ate import estimate_effects

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / "zoo" / "cache"
LANDSAT = REPO.parent / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
VARIANTS = {
    "default": (64, {}),
    "cv_penalty": (64, {"undersmooth": 1.0}),
    "k32": (32, {}),
    "k16": (16, {}),
    "boosting": (64, {"learner": "boosting"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", required=True)
    parser.add_argument("--replications", type=int, default=30)
    parser.add_argument("--variants", default="default,cv_penalty,k32,k16")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in args.designs.split(","):
        prepared = zoo.prepare(zoo.design_by_name(name), CACHE, LANDSAT)
        rows = []
        for rep in range(args.replications):
            draw = zoo.replication_draw(prepared, rep)
            truth = float(np.mean(draw["tau"]))
            for variant in variants:
                k, options = VARIANTS[variant]
                X = np.hstack([draw["tabular"], prepared.components["default"][:, :k]])
                started = time.perf_counter()
                r = estimate_effects(draw["y"], draw["d"], X, estimators=("aipw",), folds=5, seed=rep,
                                     **options)["aipw"]
                rows.append({"variant": variant, "error": r.estimate - truth, "estimate": r.estimate,
                             "se": r.std_error, "covered": r.ci_low <= truth <= r.ci_high,
                             "seconds": time.perf_counter() - started})
        df = pd.DataFrame(rows)
        table = df.groupby("variant").agg(bias=("error", "mean"), sd=("estimate", "std"), se=("se", "mean"),
                                          coverage=("covered", "mean"), seconds=("seconds", "mean"))
        table["bias_over_se"] = table["bias"] / table["se"]
        table["rmse"] = np.sqrt(df.assign(e2=df["error"] ** 2).groupby("variant")["e2"].mean())
        print(f"{name} ({len(prepared.z)} units, {args.replications} replications)")
        print(table.round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()
