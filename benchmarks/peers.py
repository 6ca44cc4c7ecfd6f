"""Side by side: eocausal's AIPW and DML against DoubleML (IRM, PLR) and EconML (DRLearner,
LinearDML) on the same data, the same cross-fitting folds and the same learners.

    .venv/bin/python benchmarks/peers.py                 # n = 100,000, p = 1,024 (long: the peers take a while)
    .venv/bin/python benchmarks/peers.py --n 5000        # a quick run
    .venv/bin/python benchmarks/peers.py --peers doubleml-irm --json out.json

Prints one table from one run: estimate, SE, 95 % CI, wall and CPU time, and for each peer its
distance from eocausal's estimate of the same target in units of eocausal's SE, and eocausal's
speed-up. Everything runs on one BLAS thread, so CPU time is the work done; on a shared machine
wall time also counts waiting for a core.

Data. The demo's known process (eocausal.simulate.DemoProcess: confounder z, effect
tau = 1 + 0.5 z, ATE about 1) with z seen only through p "embedding" columns. The columns are
embedding-like, not RCF output (embedding 100,000 chips on a laptop CPU takes longer than the
benchmark): non-negative, strongly correlated ReLU features of a 16-dimensional latent image
descriptor whose first coordinate is z, f = relu(latent A + c) + noise — a few dominant
directions and a long tail of weak ones, the conditioning that makes penalty tuning expensive.

Learners. Propensity: StandardScaler + l2 logistic regression, C from logspace(-4, 4, 10) by
3-fold stratified inner CV on the log-likelihood, refitted at the chosen C. Outcome: StandardScaler
+ ridge with alpha from logspace(-3, 6, 19) by leave-one-out. The peers get these as the
scikit-learn pipelines (``solver="sklearn"`` in eocausal.estimate.nuisance: LogisticRegressionCV,
RidgeCV); eocausal fits the same statistics with its own solver (eocausal.estimate.linear).
``doubleml-irm-fast`` runs DoubleML with eocausal's learners, to show where the speed comes from.
eocausal's AIPW fits each arm's outcome model on its own units (``outcome_arms="separate"``), as
the peers do; its default lets the smaller arm borrow from the larger. Folds: eocausal's
(stratified by treatment), handed to every peer. Propensities clipped to
[0.01, 0.99] everywhere. Everyone runs on one BLAS thread.

EconML's DRLearner fits one outcome model on [W, T]; it gets a wrapper that fits the outcome
learner on each arm, as AIPW and IRM do. EconML would also replace a *CV learner by the plain
model at the hyperparameter chosen on all the data; a thin wrapper keeps the tuning inside each
fold. A difference that remains: DoubleML's SE divides by n, eocausal's by n - 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from eocausal.estimate import estimate_effect, make_folds  # noqa: E402
from eocausal.estimate.nuisance import NuisanceSpec, outcome_model, propensity_model  # noqa: E402
from eocausal.simulate import DemoProcess  # noqa: E402

PEERS = ("doubleml-irm", "doubleml-plr", "econml-dr", "econml-lineardml", "doubleml-irm-fast")
DEFAULT_PEERS = ("doubleml-irm", "doubleml-plr", "econml-dr", "econml-lineardml")
LATENT_DIM = 16
CLIP = 0.01


def embedding_study(n: int, p: int, seed: int) -> dict:
    """Embedding-like features carrying the confounder, and treatment/outcome from DemoProcess."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, LATENT_DIM))
    z = latent[:, 0]
    loadings = rng.standard_normal((LATENT_DIM, p)) / math.sqrt(LATENT_DIM)
    # Most columns lean on the confounder's coordinate a little, as image features of built-up
    # land all respond to it; the offsets spread the ReLU kinks.
    loadings[0] += 0.5
    offsets = rng.normal(0.0, 0.7, p)
    features = latent @ loadings
    features += offsets
    np.maximum(features, 0.0, out=features)
    features += 0.05 * rng.standard_normal((n, p))
    draws = DemoProcess().draw(z, rng)
    return {
        "X": features,
        "y": draws["outcome"].to_numpy(),
        "d": draws["treatment"].to_numpy(),
        "tau": draws["tau"].to_numpy(),
        "z": z,
    }


class _FoldwiseClassifier(ClassifierMixin, BaseEstimator):
    """Hides a learner's type from EconML, which otherwise swaps a *CV learner for the plain model
    at the hyperparameter it picks on *all* the data (tuning once, outside the folds), instead of
    tuning inside each fold as DoubleML and eocausal do."""

    def __init__(self, learner=None):
        self.learner = learner

    def fit(self, X, y, **fit_params):
        self.learner_ = clone(self.learner).fit(X, y)
        self.classes_ = self.learner_.classes_
        return self

    def predict(self, X):
        return self.learner_.predict(X)

    def predict_proba(self, X):
        return self.learner_.predict_proba(X)


class _FoldwiseRegressor(RegressorMixin, BaseEstimator):
    """See _FoldwiseClassifier."""

    def __init__(self, learner=None):
        self.learner = learner

    def fit(self, X, y, **fit_params):
        self.learner_ = clone(self.learner).fit(X, y)
        return self

    def predict(self, X):
        return self.learner_.predict(X)


class _ArmwiseRegressor(RegressorMixin, BaseEstimator):
    """EconML's DRLearner fits one outcome model on [features, T]; this fits the learner on each
    arm separately (T is the last column), as AIPW and DoubleML's IRM do, so that all three
    use the same outcome learner."""

    def __init__(self, learner=None):
        self.learner = learner

    def fit(self, X, y, **fit_params):
        X, y = np.asarray(X), np.asarray(y)
        arm = X[:, -1] > 0.5
        self.models_ = [clone(self.learner).fit(X[arm == a, :-1], y[arm == a]) for a in (False, True)]
        return self

    def predict(self, X):
        X = np.asarray(X)
        arm = X[:, -1] > 0.5
        out = np.empty(len(X))
        for a, model in zip((False, True), self.models_):
            if (arm == a).any():
                out[arm == a] = model.predict(X[arm == a, :-1])
        return out


def learners(seed: int, n: int, solver: str = "sklearn"):
    spec = NuisanceSpec(seed=seed, solver=solver)
    return propensity_model(spec, smaller_class_count=n), outcome_model(spec, n_train=n)


class Timer:
    """Wall and CPU seconds of a block. On a shared machine the wall time depends on the other
    load; with one BLAS thread the process CPU time is the work itself."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_ours(data, estimator, folds, seed, **options):
    with Timer() as t:
        r = estimate_effect(data["y"], data["d"], data["X"], estimator=estimator, folds=folds, seed=seed, clip=CLIP,
                            **options)
    return {"estimate": r.estimate, "std_error": r.std_error, "ci": (r.ci_low, r.ci_high),
            "seconds": t.wall, "cpu_seconds": t.cpu,
            "propensity_C_by_fold": r.diagnostics["propensity_model"]["penalty_by_fold"]}


def run_doubleml(data, kind, splits, seed, solver="sklearn"):
    import doubleml as dml

    n = len(data["y"])
    ml_m, ml_g = learners(seed, n, solver)
    with Timer() as t:
        dml_data = dml.DoubleMLData.from_arrays(data["X"], data["y"], data["d"])
        if kind == "irm":
            model = dml.DoubleMLIRM(dml_data, ml_g=ml_g, ml_m=ml_m, n_folds=len(splits), score="ATE",
                                    trimming_threshold=CLIP, draw_sample_splitting=False)
        else:
            model = dml.DoubleMLPLR(dml_data, ml_l=ml_g, ml_m=ml_m, n_folds=len(splits),
                                    score="partialling out", draw_sample_splitting=False)
        model.set_sample_splitting([splits])
        model.fit()
    ci = model.confint(level=0.95).to_numpy()[0]
    return {"estimate": float(model.coef[0]), "std_error": float(model.se[0]), "ci": tuple(ci),
            "seconds": t.wall, "cpu_seconds": t.cpu}


def run_econml(data, kind, splits, seed):
    from econml.dml import LinearDML
    from econml.dr import DRLearner

    n = len(data["y"])
    ml_m, ml_g = learners(seed, n)
    ml_m = _FoldwiseClassifier(ml_m)
    ml_g = _ArmwiseRegressor(ml_g) if kind == "dr" else _FoldwiseRegressor(ml_g)
    with Timer() as t:
        if kind == "dr":
            model = DRLearner(model_propensity=ml_m, model_regression=ml_g, cv=splits, min_propensity=CLIP,
                              random_state=seed)
        else:
            model = LinearDML(model_y=ml_g, model_t=ml_m, discrete_treatment=True, cv=splits, random_state=seed)
        model.fit(data["y"], data["d"], X=None, W=data["X"])
    inference = model.ate_inference()
    low, high = inference.conf_int_mean(alpha=0.05)
    return {"estimate": float(np.ravel(inference.mean_point)[0]), "std_error": float(np.ravel(inference.stderr_mean)[0]),
            "ci": (float(np.ravel(low)[0]), float(np.ravel(high)[0])), "seconds": t.wall, "cpu_seconds": t.cpu}


# Which eocausal estimator each peer is compared with.
COUNTERPART = {
    "doubleml-irm": "aipw", "doubleml-irm-fast": "aipw", "econml-dr": "aipw",
    "doubleml-plr": "dml", "econml-lineardml": "dml",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--p", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma-separated from {PEERS}")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {PEERS}")

    started = time.perf_counter()
    data = embedding_study(args.n, args.p, args.seed)
    print(f"data: n={args.n}, p={args.p} embedding-like columns, {int(data['d'].sum())} treated; "
          f"sample ATE {data['tau'].mean():.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    fold_ids = make_folds(args.n, args.folds, args.seed, stratify=data["d"])
    splits = [(np.flatnonzero(fold_ids != k), np.flatnonzero(fold_ids == k)) for k in range(args.folds)]

    results = {}
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence warnings from the reference learners
        for name in ("aipw", "dml"):
            # Each arm's outcome model on its own units, as DoubleML's IRM and EconML's DRLearner fit
            # them (eocausal's default borrows for the smaller arm: README, "outcome_arms").
            options = {"outcome_arms": "separate"} if name == "aipw" else {}
            results[f"eocausal-{name}"] = r = run_ours(data, name, args.folds, args.seed, **options)
            print(f"eocausal-{name}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU", flush=True)
        for peer in peers:
            if peer.startswith("doubleml"):
                kind = "irm" if "irm" in peer else "plr"
                results[peer] = run_doubleml(data, kind, splits, args.seed, "fast" if peer.endswith("fast") else "sklearn")
            else:
                results[peer] = run_econml(data, "dr" if peer == "econml-dr" else "dml", splits, args.seed)
            print(f"{peer}: {results[peer]['seconds']:.1f} s wall, {results[peer]['cpu_seconds']:.1f} s CPU", flush=True)

    print()
    print(f"n = {args.n:,}, p = {args.p:,}, {args.folds}-fold cross-fitting on the same folds, 1 BLAS thread each; "
          f"true sample ATE {data['tau'].mean():.4f}")
    print("| method | target | estimate | SE | 95% CI | wall s | CPU s | |diff| / eocausal SE | eocausal speed-up (CPU; wall) |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name, r in results.items():
        ours = results[f"eocausal-{COUNTERPART[name]}"] if name in COUNTERPART else None
        target = "ATE (AIPW score)" if (COUNTERPART.get(name) or name.removeprefix("eocausal-")) == "aipw" else "PLR theta"
        diff = f"{abs(r['estimate'] - ours['estimate']) / ours['std_error']:.3f}" if ours else ""
        speed = (f"{r['cpu_seconds'] / ours['cpu_seconds']:.1f}x; {r['seconds'] / ours['seconds']:.1f}x"
                 if ours else "")
        print(f"| {name} | {target} | {r['estimate']:.4f} | {r['std_error']:.4f} | "
              f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {diff} | {speed} |")
    if args.json:
        payload = {"n": args.n, "p": args.p, "folds": args.folds, "seed": args.seed,
                   "sample_ate": float(data["tau"].mean()), "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
