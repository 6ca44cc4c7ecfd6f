"""What the zoo benchmark scripts share: their command-line arguments (imported as ``zoo_support``
by scripts run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eocausal import zoo

ROOT = Path(__file__).resolve().parents[1]


def zoo_parser(doc: str, replications: int = 100) -> argparse.ArgumentParser:
    """``--designs`` (default: the whole zoo), ``--replications``, ``--jobs``, ``--cache`` (the
    zoo's prepared embeddings), ``--landsat`` (the shared scene) and ``--out`` (the results folder)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--designs", default=",".join(d.name for d in zoo.ZOO))
    parser.add_argument("--replications", type=int, default=replications)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", default=str(ROOT / "benchmarks/results/zoo/cache"))
    parser.add_argument("--landsat", default=str(ROOT.parent / "shared/data/landsat8_224078_20200518_rgb.tif"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/zoo"))
    return parser


def replication_rows(args: argparse.Namespace, one, *extra) -> list[dict]:
    """``one(prepared, replication, *extra)`` (a list of row dicts) over ``args.designs`` x
    ``args.replications``, ``args.jobs`` at a time, each design prepared from ``args.cache``."""
    from joblib import Parallel, delayed

    rows: list[dict] = []
    for name in args.designs.split(","):
        prepared = zoo.prepare(zoo.design_by_name(name), Path(args.cache), Path(args.landsat))
        for batch in Parallel(n_jobs=args.jobs)(delayed(one)(prepared, rep, *extra)
                                                for rep in range(args.replications)):
            rows += batch
    return rows


def variant_row(prepared, variant: str, rep: int, truth: float, headline, result, **extra) -> dict:
    """One replication's row for a variant against the headline on the same draw: errors, SEs, coverage."""
    return {"design": prepared.design.name, "variant": variant, "replication": rep,
            "headline_error": headline.estimate - truth, "headline_se": headline.std_error,
            "headline_covered": headline.ci_low <= truth <= headline.ci_high, "error": result.estimate - truth,
            "se": result.std_error, "covered": result.ci_low <= truth <= result.ci_high, **extra}


def variant_table(frame, **extra):
    """Per design and variant: the headline's RMSE, mean SE, coverage and bias, the variant's bias, sd,
    mean SE, coverage and RMSE, both bias/SE ratios, and ``extra`` (pandas named aggregations)."""
    import numpy as np

    rmse = lambda s: float(np.sqrt((s ** 2).mean()))  # noqa: E731
    table = frame.groupby(["design", "variant"], sort=False).agg(
        headline_rmse=("headline_error", rmse), headline_se=("headline_se", "mean"),
        headline_coverage=("headline_covered", "mean"), headline_bias=("headline_error", "mean"),
        bias=("error", "mean"), sd=("error", "std"), se=("se", "mean"),
        coverage=("covered", "mean"), rmse=("error", rmse), **extra)
    table["headline_bias_over_se"] = table["headline_bias"] / table["headline_se"]
    table["bias_over_se"] = table["bias"] / table["se"]
    return table


def variant_main(doc: str, one, default_variants: str, argv=None, **extra) -> int:
    """A variants script's command line: ``--variants`` (comma-separated, ``one``'s third argument),
    ``--rows`` (also write the per-replication rows to a CSV) and the zoo's arguments; prints
    :func:`variant_table` (with ``extra``)."""
    import pandas as pd

    parser = zoo_parser(doc, replications=30)
    parser.add_argument("--variants", default=default_variants)
    parser.add_argument("--rows", default=None, help="also write the per-replication rows to this CSV")
    args = parser.parse_args(argv)
    frame = pd.DataFrame(replication_rows(args, one, args.variants.split(",")))
    if args.rows:
        frame.to_csv(args.rows, index=False)
    pd.set_option("display.width", 250)
    print(variant_table(frame, **extra).round(3).to_string())
    return 0
