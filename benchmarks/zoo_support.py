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
