"""Sensor `refresh_waves`: carries a refresh of the study through its waves of runs.

A refresh starts with its first wave: per imagery period, a run of the study's refresh job (the
survey and the period's embedder; assets/partitions.py), requested by the monthly schedule or a
survey wave, or started by a backfill of the refresh job over the periods (`dagster job backfill`,
deploy/slurm/). This sensor requests the next waves as the previous succeed, from the runs on the
instance (no state of its own; run keys keep each request to one run):

- a period whose first-wave run succeeded gets one run per tile of the survey (the tiles job:
  chips and embeddings of ``<period>|<tile>``), which the run queue launches side by side;
- a period whose tiles' runs all succeeded gets its merge run (study job: `image_chip_index`,
  `image_components`), the analysis period's with the rest of the graph.

A refresh is named by its first wave's ``eocausal/refresh`` tag (the schedule's and the survey
wave's run key), else by its backfill. A failed run stops its period's refresh there (the
run-failure sensor records it); re-executing the failed run carries it on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.naming import scoped
from assets.partitions import PERIOD_TAG, REFRESH_TAG, WAVE_TAG, merge_request, partition_parts, tile_requests
from eocausal.layout import Layout
from eocausal.study import load_study

REFRESH_SENSOR = "refresh_waves"
BACKFILL_TAG = "dagster/backfill"  # Dagster's tag on every run of a backfill
# The study's most recent runs the sensor looks at (a refresh is a few runs per tile and period).
RECENT_RUNS = 1000


# A refresh's own tags, carried from its first wave to the next ones (not the job's: the study
# tag would put a tile's run under the one-run-per-study cap).
_REFRESH_TAG_KEYS = frozenset({"eocausal/trigger", "eocausal/refresh_month", "eocausal/survey_wave",
                               "eocausal/survey_wave_sha256"})


def _carried_tags(run: dg.DagsterRun) -> dict[str, str]:
    return {k: v for k, v in run.tags.items() if k in _REFRESH_TAG_KEYS}


def _refresh_of(run: dg.DagsterRun) -> str | None:
    return run.tags.get(REFRESH_TAG) or run.tags.get(BACKFILL_TAG)


def next_wave_requests(instance: dg.DagsterInstance, jobs: RefreshJobs, tiles: list[str], analysis_period: str,
                       study: str | None) -> list[dg.RunRequest]:
    """The run requests that carry each recent refresh one wave on (see the module docstring)."""
    waves: dict = defaultdict(lambda: defaultdict(list))  # (refresh, period) -> wave -> runs
    for job, wave in ((jobs.refresh, "prepare"), (jobs.tiles, "tile"), (jobs.study, "merge")):
        for run in instance.get_runs(filters=dg.RunsFilter(job_name=job), limit=RECENT_RUNS):
            refresh = _refresh_of(run)
            if refresh and run.tags.get(WAVE_TAG, wave) == wave:
                period, _ = partition_parts(run.tags.get(PERIOD_TAG) or run.tags.get("dagster/partition", ""))
                waves[(refresh, period)][wave].append(run)
    requests: list[dg.RunRequest] = []
    for (refresh, period), runs in waves.items():
        prepared = [r for r in runs["prepare"] if r.status == dg.DagsterRunStatus.SUCCESS]
        if runs["merge"] or not prepared:
            continue  # finished (or merging), or its first wave has not succeeded (yet)
        tags = _carried_tags(prepared[0])
        tried = {partition_parts(r.tags.get("dagster/partition", ""))[1]: r.status for r in runs["tile"]}
        if all(tried.get(t) == dg.DagsterRunStatus.SUCCESS for t in tiles):
            requests.append(merge_request(refresh, period, analysis_period, tags, jobs.study, study=study))
        elif not tried:
            requests += tile_requests(refresh, period, tiles, tags, jobs.tiles, study=study)
    return requests


@dataclass(frozen=True)
class RefreshJobs:
    """The names of a study's three jobs: its refresh job (first wave), tiles job and study job."""

    refresh: str
    tiles: str
    study: str


def build_refresh_sensor(study_job, tiles_job, refresh_job, workdir: str, study_path: str,
                         study: str | None = None) -> dg.SensorDefinition:
    """The study's sensor, named <safe study>__refresh_waves (assets.naming.scoped)."""
    survey_path = Layout(Path(workdir)).lake / "survey.parquet"

    @dg.sensor(
        name=scoped(study, REFRESH_SENSOR),
        jobs=[study_job, tiles_job],
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Carries each refresh of the study through its waves: after a period's survey and embedder "
                    "run, one run per tile (chips, embeddings); after every tile, the period's merge and "
                    "(analysis period) the rest of the graph.",
    )
    def refresh_waves(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        if not survey_path.exists():
            return dg.SensorResult(skip_reason=f"no survey yet ({survey_path})")
        tiles = sorted(set(pd.read_parquet(survey_path, columns=["tile"])["tile"].astype(str)))
        analysis_period = load_study(study_path).imagery.analysis_period_name()
        jobs = RefreshJobs(refresh_job.name, tiles_job.name, study_job.name)
        requests = next_wave_requests(context.instance, jobs, tiles, analysis_period, study)
        if not requests:
            return dg.SensorResult(skip_reason="no refresh waiting for its next wave")
        return dg.SensorResult(run_requests=requests)

    return refresh_waves
