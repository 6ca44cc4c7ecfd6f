"""Refit the zoo's comparison rows (tabular+image AIPW on the previous default's and the reference's
components, ``eocausal.zoo.comparison_fit``) in an existing ``replications.csv`` and rewrite the
summaries, without rerunning the rest of the zoo. Same draws, folds and seeds as the zoo.

    .venv/bin/python benchmarks/zoo_comparison_rows.py --jobs 2

Made for one occasion: the full zoo run of 2026-12-07 (session 11) fitted those rows with the
product's new default outcome models (the smaller arm borrowing, effects-8), whereas the two
comparisons are defined with each arm's outcome model on its own units (the reference is the
issue's per-arm RidgeCV); ``comparison_fit`` now says so, and this script brought the run's rows
in line with it. Prints each design's RMSE of the two comparisons before and after.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo_support import zoo_parser  # noqa: E402

from eocausal import zoo  # noqa: E402

COMPARISONS = ("previous", "reference")


def refit(prepared: zoo.PreparedDesign, rep: int, folds: int) -> list[dict]:
    draw = zoo.replication_draw(prepared, rep)
    truth = float(np.mean(draw["tau"]))
    rows = []
    for name in COMPARISONS:
        res, seconds = zoo.comparison_fit(prepared, draw, name, rep, folds)
        r = res["aipw"]
        rows.append({"design": prepared.design.name, "replication": rep, "representation": name,
                     "feature_set": "tabular+image", "estimator": "aipw", "estimate": r.estimate,
                     "std_error": r.std_error, "ci_low": r.ci_low, "ci_high": r.ci_high,
                     "covered": bool(r.ci_low <= truth <= r.ci_high), "seconds": seconds})
    return rows


def rmse(frame: pd.DataFrame) -> pd.Series:
    rows = frame[frame["representation"].isin(COMPARISONS)]
    return rows.groupby(["design", "representation"], sort=False).apply(
        lambda g: float(np.sqrt(((g["estimate"] - g["truth"]) ** 2).mean())), include_groups=False)


def main(argv=None) -> int:
    args = zoo_parser(__doc__).parse_args(argv)
    from joblib import Parallel, delayed

    out = Path(args.out)
    replicates = pd.read_csv(out / "replications.csv")
    settings = json.loads((out / "settings.json").read_text())
    before = rmse(replicates)
    started = time.perf_counter()
    prepared, refitted = {}, []
    for name in replicates["design"].unique():
        if name not in args.designs.split(","):
            continue
        prepared[name] = zoo.prepare(zoo.design_by_name(name), Path(args.cache), Path(args.landsat))
        reps = sorted(replicates.loc[replicates["design"] == name, "replication"].unique())
        for batch in Parallel(n_jobs=args.jobs)(delayed(refit)(prepared[name], int(rep), settings["folds"])
                                                for rep in reps):
            refitted += batch
        print(f"{name}: {len(reps)} replications refitted", flush=True)
    key = ["design", "replication", "representation", "feature_set", "estimator"]
    new = pd.DataFrame(refitted).set_index(key)
    rows = replicates.set_index(key)
    if not new.index.isin(rows.index).all() or rows.index.duplicated().any():
        raise SystemExit("replications.csv does not hold exactly one row per design, replication, representation, "
                         "feature set and estimator")
    rows.update(new)  # the refitted columns of those rows only
    replicates = rows.reset_index()[replicates.columns]
    zoo.write_results(out, replicates, Path(args.landsat), None, prepared, Path(args.cache))
    settings["comparison_rows_refit"] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.perf_counter() - started, 1),
        "why": "previous and reference rows refitted with each arm's outcome model on its own units "
               "(benchmarks/zoo_comparison_rows.py)"}
    (out / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n", encoding="utf-8")
    after = rmse(replicates)
    print(pd.DataFrame({"rmse_before": before, "rmse_after": after}).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
