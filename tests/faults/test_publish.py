"""The published copy is complete on its own, and a killed publish leaves nothing a consumer sees."""

from __future__ import annotations

import os

import duckdb
import pandas as pd

from eocausal.warehouse import publish, query


def _warehouse(tmp_path):
    lake = tmp_path / "lake"
    lake.mkdir()
    pd.DataFrame({"unit_id": ["a", "b"], "x": [1.0, 2.0]}).to_parquet(lake / "survey.parquet")
    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("create schema staging; create schema marts")
        con.execute(f"create view staging.stg_survey as select * from '{lake / 'survey.parquet'}'")
        con.execute("create table marts.units as select * from staging.stg_survey")
        con.execute("create view marts.units_latest as select * from marts.units where x > 1")
    return db, lake


def test_published_copy_holds_the_marts_and_reads_nothing_live(tmp_path):
    db, lake = _warehouse(tmp_path)
    published = publish(db, tmp_path / "published" / "warehouse.duckdb")
    schemas = set(query(published, "select schema_name from duckdb_schemas() where not internal")["schema_name"])
    assert schemas == {"marts"}
    # the lake changes (a refresh in progress) or goes away: the copy shows what was published
    pd.DataFrame({"unit_id": ["z"], "x": [9.0]}).to_parquet(lake / "survey.parquet")
    assert query(published, "select unit_id from marts.units order by 1")["unit_id"].tolist() == ["a", "b"]
    (lake / "survey.parquet").unlink()
    assert query(published, "select unit_id from marts.units_latest")["unit_id"].tolist() == ["b"]
    # the writer's own warehouse keeps its staging models
    assert "staging" in set(query(db, "select schema_name from duckdb_schemas()")["schema_name"])
    assert sorted(os.listdir(published.parent)) == ["warehouse.duckdb"]


def test_copy_left_by_a_killed_publish_is_removed_by_the_next(tmp_path):
    db, _ = _warehouse(tmp_path)
    folder = tmp_path / "published"
    folder.mkdir()
    dead = folder / ".publish.999999999.abcd.duckdb"  # no such pid
    live = folder / f".publish.{os.getppid()}.efgh.duckdb"  # a live process: maybe still copying
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    publish(db, folder / "warehouse.duckdb")
    assert not dead.exists() and live.exists()


def test_a_disk_that_fills_during_publish_leaves_the_published_copy_as_it_was(tmp_path, monkeypatch):
    import errno

    import pytest

    from eocausal import faults
    from eocausal.workdir import disk_problem

    db, _ = _warehouse(tmp_path)
    published = publish(db, tmp_path / "published" / "warehouse.duckdb")
    before = published.read_bytes()
    with duckdb.connect(str(db)) as con:
        con.execute("insert into marts.units values ('c', 3.0)")
    monkeypatch.setenv(faults.FS_FAULT_ENV, "ENOSPC")
    monkeypatch.setenv(faults.FS_FAULT_PATH_ENV, "published")
    with pytest.raises(OSError) as caught:
        publish(db, published)
    assert caught.value.errno == errno.ENOSPC
    assert "is out of space: writing" in disk_problem(tmp_path, caught.value)
    assert published.read_bytes() == before
    assert sorted(os.listdir(published.parent)) == ["warehouse.duckdb"]  # no partial copy left
