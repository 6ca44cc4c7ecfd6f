"""The refresh sensor: a refresh's first wave, then one run per tile, then the period's merge.

Real runs on an ephemeral instance (the first wave and the tiles executed in-process with the
tags the requests carry), the sensor evaluated with Dagster's own sensor context between them.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from assets.naming import STUDY_TAG, TILE_STUDY_TAG, scoped
from assets.partitions import REFRESH_TAG, WAVE_TAG, prepare_requests, refresh_job_name, tiles_job_name
from assets.studies import build_definitions, study_job_name
from eocausal.study import load_study
from sensors.refresh import REFRESH_SENSOR
from tests.assets.conftest import small_study


@pytest.fixture(scope="module")
def tiled_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("refresh")
    study_path = small_study(root, n_units=60, seed=4, imagery={"max_units_per_tile": 25},
                             heterogeneity={"enabled": False})
    name = load_study(study_path).name
    return study_path, root / "work", name, build_definitions(str(study_path), str(root / "work"))


def _evaluate(defs, name, instance) -> list[dg.RunRequest]:
    sensor = defs.resolve_sensor_def(scoped(name, REFRESH_SENSOR))
    result = sensor(dg.build_sensor_context(instance=instance))
    return list(result.run_requests or [])


def test_a_refresh_goes_from_its_first_wave_to_its_tiles_to_its_merge(tiled_study):
    study_path, workdir, name, defs = tiled_study
    with dg.DagsterInstance.ephemeral() as instance:
        assert _evaluate(defs, name, instance) == []  # no survey yet, nothing to carry on
        [first] = prepare_requests("survey-wave:w1.csv:1", ["geotiff"], {"eocausal/trigger": "survey_wave"})
        refresh_job = defs.resolve_job_def(refresh_job_name(name))
        assert refresh_job.execute_in_process(instance=instance, partition_key=first.partition_key,
                                              tags=first.tags).success
        tiles = sorted(set(pd.read_parquet(workdir / "lake" / "survey.parquet")["tile"]))
        assert len(tiles) >= 3

        # the first wave succeeded: one run per tile, in the tiles job, outside the study's run cap
        requests = _evaluate(defs, name, instance)
        assert [r.partition_key for r in requests] == [f"geotiff|{t}" for t in tiles]
        assert {r.job_name for r in requests} == {tiles_job_name(name)}
        for r in requests:
            assert r.run_key == f"survey-wave:w1.csv:1:{r.partition_key}"
            assert r.tags[REFRESH_TAG] == "survey-wave:w1.csv:1" and r.tags[WAVE_TAG] == "tile"
            assert r.tags["eocausal/trigger"] == "survey_wave" and STUDY_TAG not in r.tags
        tiles_job = defs.resolve_job_def(tiles_job_name(name))
        first_tile, *rest = requests
        run = tiles_job.execute_in_process(instance=instance, partition_key=first_tile.partition_key,
                                           tags=first_tile.tags)
        assert run.success and run.dagster_run.tags[TILE_STUDY_TAG] == name
        assert _evaluate(defs, name, instance) == []  # its tiles are under way: nothing new

        for r in rest:
            assert tiles_job.execute_in_process(instance=instance, partition_key=r.partition_key, tags=r.tags).success
        # every tile succeeded: the merge, with the rest of the graph (the analysis period)
        [merge] = _evaluate(defs, name, instance)
        assert merge.job_name == study_job_name(name) and merge.partition_key == "geotiff"
        assert merge.asset_selection is None and merge.run_key == "survey-wave:w1.csv:1:geotiff"
        assert merge.tags[WAVE_TAG] == "merge" and merge.tags["eocausal/trigger"] == "survey_wave"


def test_a_backfill_of_the_refresh_job_is_a_refresh(tiled_study):
    """`dagster job backfill` of the refresh job (deploy/slurm/): its runs carry the backfill's id,
    which names the refresh its tiles' and merges' runs carry on."""
    _, workdir, name, defs = tiled_study
    with dg.DagsterInstance.ephemeral() as instance:
        refresh_job = defs.resolve_job_def(refresh_job_name(name))
        assert refresh_job.execute_in_process(instance=instance, partition_key="geotiff",
                                              tags={"dagster/backfill": "bf1"}).success
        requests = _evaluate(defs, name, instance)
        assert requests and all(r.tags[REFRESH_TAG] == "bf1" and r.run_key.startswith("bf1:geotiff|")
                                for r in requests)
