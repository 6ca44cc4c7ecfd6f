"""`eocausal run` runs a wave's tiles in worker processes where the machine has room (assets/runner.py)."""

from __future__ import annotations

import dagster as dg
import pytest

from assets import runner
from assets.partitions import tiles_job_name
from assets.runner import LOCAL_TILE_WORKERS_ENV, local_tile_workers, run_study
from eocausal.faults import RENDEZVOUS_COUNT_ENV, RENDEZVOUS_DIR_ENV
from eocausal.layout import Layout
from eocausal.study import load_study
from tests.assets.conftest import small_study

GB = 1 << 30


def test_one_worker_per_two_cores_and_two_gigabytes_at_most_the_tiles(monkeypatch):
    monkeypatch.delenv(LOCAL_TILE_WORKERS_ENV, raising=False)
    assert local_tile_workers(6, cores=2, memory=24 * GB) == 1  # 2 cores: in-process, both in the kernel
    assert local_tile_workers(6, cores=16, memory=64 * GB) == 6  # at most the tiles
    assert local_tile_workers(40, cores=64, memory=512 * GB) == runner.MAX_LOCAL_TILE_WORKERS
    assert local_tile_workers(6, cores=16, memory=5 * GB) == 2  # memory caps it
    assert local_tile_workers(0, cores=16, memory=64 * GB) == 1
    monkeypatch.setenv(LOCAL_TILE_WORKERS_ENV, "3")
    assert local_tile_workers(6, cores=2, memory=GB) == 3 and local_tile_workers(2) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(LOCAL_TILE_WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=LOCAL_TILE_WORKERS_ENV):
            local_tile_workers(6)


def test_a_malformed_worker_count_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCAL_TILE_WORKERS_ENV, "many")
    outcome = run_study(small_study(tmp_path, n_units=40), tmp_path / "work")
    assert not outcome.success and outcome.errors == [
        f"{LOCAL_TILE_WORKERS_ENV} must be a whole number >= 1, got 'many'"]
    assert not (tmp_path / "work").exists()


def test_tiles_in_two_workers_meet_and_write_what_one_process_writes(tmp_path, monkeypatch):
    # (in `make test`, not slow: CI's 2-core machines never pick workers on their own.) The inputs
    # only: survey, embedder, tiles and merge, every lake file of which must be the same bytes.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    study_path = small_study(tmp_path, n_units=60, imagery={"max_units_per_tile": 25})
    monkeypatch.setenv(LOCAL_TILE_WORKERS_ENV, "1")
    alone = run_study(study_path, tmp_path / "alone", inputs_only=True)
    assert alone.success, alone.errors
    # Two workers: the first two tile runs wait for each other at the start of the chip stage, so
    # the run succeeds only if two were alive at once (ordering, not timing).
    monkeypatch.setenv(LOCAL_TILE_WORKERS_ENV, "2")
    monkeypatch.setenv(RENDEZVOUS_DIR_ENV, str(tmp_path / "meet"))
    monkeypatch.setenv(RENDEZVOUS_COUNT_ENV, "2")
    (tmp_path / "meet").mkdir()
    together = run_study(study_path, tmp_path / "together", inputs_only=True)
    assert together.success, together.errors
    assert len(list((tmp_path / "meet").glob("chips.start.*"))) >= 2

    tiles = together.metadata["image_chips"]["n_tiles"]
    assert tiles >= 3 and tiles == alone.metadata["image_chips"]["n_tiles"]
    lake_a, lake_b = Layout(tmp_path / "alone").lake, Layout(tmp_path / "together").lake
    files = sorted(p.relative_to(lake_a) for p in lake_a.rglob("*")
                   if p.is_file() and p.parts[len(lake_a.parts)] in ("image_chips", "image_embeddings"))
    assert any("tile=" in str(f) for f in files) and any(f.name.startswith("period=") for f in files)
    for f in files:
        assert (lake_b / f).read_bytes() == (lake_a / f).read_bytes(), f
    # every tile run is on the study's instance, successful, as an in-process run's would be
    with runner.open_instance(together.dagster_home) as instance:
        tile_runs = instance.get_runs(filters=dg.RunsFilter(job_name=tiles_job_name(load_study(study_path).name)))
        assert len(tile_runs) == tiles and all(r.status == dg.DagsterRunStatus.SUCCESS for r in tile_runs)
