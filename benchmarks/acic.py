"""Tabular anchor: eocausal's AIPW beside DoubleML's IRM on the ACIC 2016 instances that causallib
ships, with the same learners and the same cross-fitting folds.

    .venv/bin/python benchmarks/acic.py                  # all instances causallib ships (10)
    .venv/bin/python benchmarks/acic.py --instances 2 --out /tmp/acic   # a quick run

Data. ACIC 2016 (Dorie, Hill, Shalit, Scott & Cervone 2019): 4,802 units with 58 real covariates
(3 categorical), treatment and outcomes simulated by the challenge's data-generating processes.
The challenge has 77 settings x 100 draws; causallib (``causallib.datasets.load_acic16``) ships
one draw from each of 10 of them (instances 1-10), and those are all that run here. Covariates:
categoricals one-hot encoded (every level a column), then every column standardised (the learners
standardise again inside each fold). Observed outcome y = y1 if treated else y0.

Truth. The sample ATE from the noiseless potential outcomes the instance gives: mean(mu1 - mu0)
over the 4,802 units (the noisy y1 - y0 average is written beside it for reference).

Estimators. eocausal ``estimate_effect(y, d, X, estimator="aipw", folds=5, seed=0)`` with its
default linear learners (fast solver), the same with ``propensity_fit="calibrated"`` (weights
that balance each arm's covariates: eocausal.estimate.calibration), and ``doubleml.DoubleMLIRM`` (score "ATE") with the
scikit-learn pipelines that compute the same statistics (StandardScaler + l2
LogisticRegressionCV propensity, StandardScaler + RidgeCV per-arm outcome models), given
eocausal's treatment-stratified folds through ``draw_sample_splitting=False`` /
``set_sample_splitting``. Propensities clipped to [0.01, 0.99] in both; one BLAS thread each.
The runners, learners and timer are benchmarks/peers.py's.

Writes to ``--out`` (default benchmarks/results/acic/): instances.csv (one row per instance and
estimator), summary.md (the table printed at the end) and settings.json (versions, CPU, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import CLIP, run_doubleml, run_ours  # noqa: E402  (also puts the repo root on sys.path)
from threadpoolctl import threadpool_limits  # noqa: E402

from eocausal.estimate import estimate_effect, make_folds  # noqa: E402

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
N_INSTANCES = 10  # causallib ships instances 1..10 (one draw each from 10 of the 77 settings)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "acic"
METHODS = ("eocausal-aipw", "eocausal-aipw-calibrated", "doubleml-irm")


def load_instance(instance: int) -> dict:
    """One ACIC 2016 instance as arrays: standardised one-hot covariates, treatment, outcome,
    and the truths (sample ATE from mu1 - mu0, and from the noisy y1 - y0)."""
    from causallib.datasets import load_acic16

    X, zymu = load_acic16(instance=instance, raw=True)
    categorical = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
    X = pd.get_dummies(X, columns=categorical, dtype=float).astype(float)
    sd = X.std(ddof=0)
    X = X.loc[:, sd > 0]
    X = (X - X.mean()) / X.std(ddof=0)
    d = zymu["z"].to_numpy().astype(int)
    y = np.where(d == 1, zymu["y1"], zymu["y0"]).astype(float)
    return {
        "X": X.to_numpy(),
        "y": y,
        "d": d,
        "columns": list(X.columns),
        "categorical": categorical,
        "truth": float((zymu["mu1"] - zymu["mu0"]).mean()),
        "sate_noisy": float((zymu["y1"] - zymu["y0"]).mean()),
        "satt": float((zymu["mu1"] - zymu["mu0"])[d == 1].mean()),
    }


def run_instance(instance: int, folds: int, seed: int) -> tuple[list[dict], dict]:
    data = load_instance(instance)
    n, p = data["X"].shape
    fold_ids = make_folds(n, folds, seed, stratify=data["d"])
    splits = [(np.flatnonzero(fold_ids != k), np.flatnonzero(fold_ids == k)) for k in range(folds)]
    results = {
        "eocausal-aipw": run_ours(data, "aipw", folds, seed),
        "eocausal-aipw-calibrated": run_ours(data, "aipw", folds, seed, propensity_fit="calibrated"),
        "doubleml-irm": run_doubleml(data, "irm", splits, seed),
    }
    # A check, and the nuisance diagnostics: eocausal fitting DoubleML's scikit-learn pipelines
    # (solver "sklearn") on the same folds, each arm's outcome model on its own units as DoubleML's
    # IRM fits them, should give DoubleML's estimate to rounding.
    check = estimate_effect(data["y"], data["d"], data["X"], estimator="aipw", folds=folds, seed=seed,
                            clip=CLIP, solver="sklearn", outcome_arms="separate")
    diag = check.diagnostics
    instance_level = {
        "eocausal_sklearn_solver_estimate": check.estimate,
        "propensity_auc": diag["propensity"]["auc"],
        "share_clipped": diag["propensity"]["share_clipped"],
        "outcome_r2_control": diag["outcome_r2"]["control"],
        "outcome_r2_treated": diag["outcome_r2"]["treated"],
    }
    rows = []
    for method, r in results.items():
        low, high = (float(v) for v in r["ci"])
        rows.append({
            "instance": instance, "method": method, "n": n, "p": p,
            "treated_share": round(float(data["d"].mean()), 4),
            "truth_sate": data["truth"], "sate_noisy": data["sate_noisy"], "satt": data["satt"],
            "estimate": r["estimate"], "std_error": r["std_error"], "ci_low": low, "ci_high": high,
            "error": r["estimate"] - data["truth"], "abs_error": abs(r["estimate"] - data["truth"]),
            "covered": bool(low <= data["truth"] <= high),
            "wall_s": r["seconds"], "cpu_s": r["cpu_seconds"], **instance_level,
        })
    meta = {"n": n, "p": p, "categorical": data["categorical"]}
    return rows, meta


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    out = []
    for method in METHODS:
        t = table[table["method"] == method]
        k = len(t)
        cover = float(t["covered"].mean())
        out.append({
            "method": method, "instances": k,
            "mean_abs_error": float(t["abs_error"].mean()),
            "rmse": float(np.sqrt((t["error"] ** 2).mean())),
            "mean_error": float(t["error"].mean()),
            "mean_se": float(t["std_error"].mean()),
            "coverage": cover, "coverage_mc_se": math.sqrt(cover * (1 - cover) / k),
            "mean_wall_s": float(t["wall_s"].mean()), "mean_cpu_s": float(t["cpu_s"].mean()),
        })
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, table: pd.DataFrame) -> str:
    wide = table.pivot(index="instance", columns="method", values="estimate")
    diff = (wide["eocausal-aipw"] - wide["doubleml-irm"]).abs()
    se = table[table["method"] == "eocausal-aipw"].set_index("instance")["std_error"]
    lines = [
        "| method | instances | mean abs error | RMSE | mean error | mean SE | 95 % CI coverage (MC SE) | mean wall s | mean CPU s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for _, s in summary.iterrows():
        lines.append(
            f"| {s['method']} | {s['instances']} | {s['mean_abs_error']:.4f} | {s['rmse']:.4f} | "
            f"{s['mean_error']:+.4f} | {s['mean_se']:.4f} | {s['coverage']:.2f} ({s['coverage_mc_se']:.2f}) | "
            f"{s['mean_wall_s']:.2f} | {s['mean_cpu_s']:.2f} |"
        )
    check = table[table["method"] == "doubleml-irm"].set_index("instance")
    check = (check["eocausal_sklearn_solver_estimate"] - check["estimate"]).abs()
    lines.append("")
    lines.append(f"Max |eocausal - DoubleML| estimate: {diff.max():.2e} (instance {int(diff.idxmax())}); "
                 f"max of that in eocausal SEs: {(diff / se).max():.2e}. Check: eocausal with solver='sklearn' "
                 f"(DoubleML's own pipelines) on the same folds differs from DoubleML by at most {check.max():.1e}.")
    return "\n".join(lines)


def instance_table(table: pd.DataFrame) -> str:
    lines = ["| instance | treated | truth (SATE) | method | estimate | SE | 95 % CI | abs error | error / SE | covered "
             "| propensity AUC | clipped | outcome R2 (control; treated) |",
             "|---:|---:|---:|---|---:|---:|---|---:|---:|---|---:|---:|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['instance']} | {r['treated_share']:.3f} | {r['truth_sate']:.4f} | {r['method']} | "
                     f"{r['estimate']:.4f} | {r['std_error']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
                     f"{r['abs_error']:.4f} | {r['error'] / r['std_error']:+.2f} | {'yes' if r['covered'] else 'no'} | "
                     f"{r['propensity_auc']:.3f} | {r['share_clipped']:.3f} | "
                     f"{r['outcome_r2_control']:.3f}; {r['outcome_r2_treated']:.3f} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("eocausal", "DoubleML", "causallib", "scikit-learn", "numpy", "pandas", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def invocation() -> str:
    """This run's command line as it was started: its niceness and thread variables, then the script."""
    threads = [f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ]
    niceness = os.nice(0)
    return ((f"nice -n {niceness} " if niceness else "") + (f"env {' '.join(threads)} " if threads else "")
            + ".venv/bin/python benchmarks/" + " ".join([Path(__file__).name] + sys.argv[1:]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=N_INSTANCES,
                        help=f"run instances 1..N (default all {N_INSTANCES} that causallib ships)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    args = parser.parse_args(argv)
    if not 1 <= args.instances <= N_INSTANCES:
        parser.error(f"--instances must be between 1 and {N_INSTANCES} (causallib ships {N_INSTANCES})")

    started = time.perf_counter()
    rows, meta = [], {}
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence warnings from the reference learners
        for instance in range(1, args.instances + 1):
            instance_rows, meta = run_instance(instance, args.folds, args.seed)
            rows += instance_rows
            print(f"instance {instance}: truth {instance_rows[0]['truth_sate']:.4f}; " + "; ".join(
                f"{r['method']} {r['estimate']:.4f} ({r['std_error']:.4f}) {r['wall_s']:.1f} s" for r in instance_rows),
                flush=True)
    table = pd.DataFrame(rows)
    summary = summarise(table)
    body = markdown(summary, table)
    command = invocation()
    heading = (f"ACIC 2016, {args.instances} instance(s) shipped by causallib (one draw each), n = {meta['n']:,}, "
               f"p = {meta['p']} (one-hot, standardised); truth = sample ATE mean(mu1 - mu0); "
               f"{args.folds}-fold cross-fitting on the same folds, same linear learners, 1 BLAS thread")
    print()
    print(heading)
    print(body)

    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "instances.csv", index=False, float_format="%.6g")
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    (args.out / "summary.md").write_text(
        f"# ACIC 2016: eocausal AIPW (likelihood and calibrated propensity) beside DoubleML IRM\n\n`{command}` ({date[:10]}, {cpu_model()}, "
        f"{os.cpu_count()} cores shared with other jobs: load average {os.getloadavg()[0]:.1f} at the end)\n\n"
        f"{heading}.\n\n{body}\n\nMC SE of coverage: sqrt(c (1 - c) / instances), treating the instances as "
        f"independent draws (they are one draw each from different settings).\n\n"
        f"## Per instance\n\n{instance_table(table)}\n"
    )
    settings = {
        "date": date, "command": command, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()), "total_seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
        "data": {
            "source": "causallib.datasets.load_acic16(instance, raw=True)",
            "instances": list(range(1, args.instances + 1)),
            "note": "ACIC 2016 has 77 settings x 100 draws; causallib ships one draw from each of 10 settings "
                    "(instances 1-10), all run here.",
            "n": meta["n"], "p": meta["p"], "categorical_one_hot": meta["categorical"],
            "encoding": "categoricals one-hot (all levels), every column standardised (mean 0, sd 1); "
                        "outcome y = y1 if z else y0",
            "truth": "sample ATE: mean over units of mu1 - mu0 (noiseless potential outcomes); "
                     "sate_noisy = mean(y1 - y0) and satt (treated units) in instances.csv for reference",
        },
        "estimation": {
            "folds": args.folds, "seed": args.seed, "fold_split": "eocausal.estimate.make_folds, stratified by "
            "treatment; the same splits handed to DoubleML (draw_sample_splitting=False, set_sample_splitting)",
            "propensity_clip": CLIP,
            "eocausal": "estimate_effect(estimator='aipw'), default linear learners (solver 'fast')",
            "doubleml": "DoubleMLIRM(score='ATE', trimming_threshold=0.01) with the scikit-learn pipelines "
                        "(NuisanceSpec(solver='sklearn')): StandardScaler + LogisticRegressionCV (l2, Cs=10, "
                        "3-fold stratified inner CV, log-likelihood) and StandardScaler + RidgeCV "
                        "(alphas logspace(-3, 6, 19), leave-one-out), each refitted at the CV penalty / "
                        "eocausal.estimate.nuisance.UNDERSMOOTH (4), as eocausal's default learners",
            "threads": "threadpoolctl limits=1, and the command's thread variables",
        },
    }
    (args.out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"\nwrote {args.out}/instances.csv, summary.md, settings.json ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
