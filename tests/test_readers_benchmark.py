"""A smoke test of benchmarks/readers.py (the concurrent-readers benchmark): two readers for a moment
on a tiny published warehouse, then the summary and the table. The benchmark itself, with its
refresh, is run by hand (benchmarks/results/readers.md)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("readers_benchmark", REPO / "benchmarks" / "readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published(path: Path) -> Path:
    with duckdb.connect(str(path)) as con:
        con.execute("create schema marts")
        con.execute("create table marts.effect_estimates as select 'v1' as estimate_version, 'ATE' as estimand, "
                    "e as estimator, 'none' as feature_set, 'measured' as outcome_source "
                    "from (values ('ipw'), ('aipw')) t(e)")
        con.execute("create view marts.effect_estimates_latest as select * from marts.effect_estimates")
        con.execute("create table marts.analysis_units as select range as unit_id from range(10)")
    return path


def test_readers_record_versions_and_latency_and_the_table_says_so(tmp_path):
    readers = _module()
    db = _published(tmp_path / "warehouse.duckdb")
    procs, stop = readers.run_readers(db, tmp_path / "readers", 2, max_seconds=30, think_ms=10)
    readers.wait_until_all_saw(procs, 1, 30)
    time.sleep(0.3)
    stop.write_text("stop")
    for proc, _ in procs:
        assert proc.wait(timeout=30) == 0
    import json

    summary = readers.summarise([json.loads(r.read_text()) for _, r in procs], rows_per_version=2)
    assert summary["readers"] == 2 and summary["errors"] == [] and summary["cycles"] >= 2
    assert summary["versions"]["v1"]["incomplete_reads"] == 0
    assert summary["latency_ms"]["history"]["p99"] >= summary["latency_ms"]["history"]["p50"] > 0
    table = readers.markdown(summary, {"machine": "test", "load_start": "0", "load_end": "0", "n_units": 10,
                                       "n_new": 0, "rows_per_version": 2, "think_ms": 10, "refresh_s": 0.0,
                                       "refresh_rc": 0, "readers_s": 1.0}, "python benchmarks/readers.py")
    assert "| errors | **0** |" in table and "version `v1` seen" in table and "all complete" in table
