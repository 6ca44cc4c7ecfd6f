"""A SQL consumer of the published warehouse, run as its own process by the fault tests.

It reads in a loop until the stop file appears, each time opening the published copy read-only
(a fresh, short connection, as a BI tool would), and records every error and every version it
saw with its row count. Usage: python read_loop.py PUBLISHED_DB STOP_FILE RESULT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb

HISTORY = """
    select estimate_version, count(*) as n_rows,
           count(distinct estimand || '/' || estimator || '/' || feature_set) as n_keys
    from marts.effect_estimates group by 1
"""
LATEST = "select estimate_version, count(*) from marts.effect_estimates_latest group by 1"
UNITS = "select count(*) from marts.analysis_units"


def main(db: str, stop_file: str, result_file: str) -> None:
    reads, errors = 0, []
    shapes: Counter[str] = Counter()  # "version:n_rows:n_keys" -> reads that saw it
    latest: Counter[str] = Counter()
    sequence: list[list[str]] = []  # the distinct sets of versions, in the order first seen
    while not Path(stop_file).exists():
        try:
            with duckdb.connect(db, read_only=True) as con:
                history = con.execute(HISTORY).fetchall()
                newest = con.execute(LATEST).fetchall()
                con.execute(UNITS).fetchone()
        except Exception as exc:  # every failure counts: the consumer must never see one
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            for version, n_rows, n_keys in history:
                shapes[f"{version}:{n_rows}:{n_keys}"] += 1
            for version, n_rows in newest:
                latest[f"{version}:{n_rows}"] += 1
            versions = sorted(v for v, _, _ in history)
            if not sequence or sequence[-1] != versions:
                sequence.append(versions)
                progress = Path(result_file + ".progress")
                progress.with_suffix(".tmp").write_text(json.dumps(versions))
                progress.with_suffix(".tmp").replace(progress)
        reads += 1
        time.sleep(0.02)
    Path(result_file).write_text(json.dumps(
        {"reads": reads, "errors": errors, "shapes": shapes, "latest": latest, "sequence": sequence}, indent=2
    ))


if __name__ == "__main__":
    main(*sys.argv[1:4])
