"""Readers of the deployment catalog during refreshes (eocausal.catalog): only complete versions."""

import subprocess
import sys
import textwrap

import pytest

from eocausal.catalog import build_catalog
from tests.catalog_support import published

pytestmark = pytest.mark.slow

READER = textwrap.dedent("""
    import sys, time, duckdb
    catalog, rounds = sys.argv[1], int(sys.argv[2])
    seen, errors = set(), 0
    for _ in range(rounds):
        try:
            with duckdb.connect(catalog, read_only=True) as con:
                rows = con.execute("select study, estimate_version, count(*) from marts.effect_estimates "
                                   "group by 1, 2 order by 1, 2").fetchall()
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors += 1
            print("ERROR", exc, file=sys.stderr)
            continue
        seen.add(tuple(rows))
        time.sleep(0.005)
    print(errors)
    for snapshot in sorted(seen):
        print(repr(snapshot))
""")


def test_readers_see_only_complete_catalogs_during_refreshes(tmp_path):
    """A separate process queries the catalog in a loop while one study is refreshed again and
    again: every snapshot it sees holds both studies, each at one complete version."""
    beta = published(tmp_path / "b.duckdb", "beta", "b1", 4, "cov_road")
    alpha_path = tmp_path / "a.duckdb"
    published(alpha_path, "alpha", "v0", 10, "cov_rain")
    catalog = build_catalog({"alpha": alpha_path, "beta": beta}, tmp_path / "catalog.duckdb")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(catalog), "150"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    for version in range(1, 9):  # each refresh: alpha's new version has 10 + version rows
        fresh = tmp_path / f"a{version}.duckdb"
        published(fresh, "alpha", f"v{version}", 10 + version, "cov_rain")
        fresh.replace(alpha_path)  # what eocausal.warehouse.publish does
        build_catalog({"alpha": alpha_path, "beta": beta}, catalog)
    out, err = reader.communicate(timeout=300)
    lines = out.splitlines()
    assert lines[0] == "0", err
    snapshots = [eval(line) for line in lines[1:]]  # noqa: S307 - our own repr output
    assert len(snapshots) >= 2  # the reader overlapped refreshes
    for snapshot in snapshots:
        by_study = {}
        for study, version, n in snapshot:
            by_study.setdefault(study, []).append((version, n))
        assert set(by_study) == {"alpha", "beta"}
        assert by_study["beta"] == [("b1", 4)]
        [(version, n)] = by_study["alpha"]
        assert n == 10 + int(version[1:])  # a complete version, never a mix
