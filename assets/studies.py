"""One study's graph, and a deployment of many: what the `StudyComponent` (assets/components.py),
`dagster dev` (assets/definitions.py) and `eocausal run` (assets/runner.py) build.

A study's graph: every asset keyed under the study's name ([study, "survey"], [study, "marts",
"analysis_units"], ...), its job ``<safe study>__study_job`` (tagged ``eocausal/study=<study>``, and
``eocausal/earthengine``/``eocausal/gpu`` where its study fetches from Earth Engine or embeds on a
GPU: assets/run_tags.py), its schedule and sensors (names scoped the same way). `image_chips` and
`image_embeddings` are partitioned by imagery period x tile, in the study's tiles job
``<safe study>__tiles_job`` (Dagster runs one partitions definition per job); `image_embedder`
and `image_components` by period, in the study job with everything downstream, which is
unpartitioned and consumes the analysis period's `image_components` only (assets/partitions.py,
with the waves of runs a refresh is made of; used by assets/runner.py and sensors/).

The graph carries no resources: the deployment binds ONE `study` and ONE `warehouse` resource that
hold every study's file and working folder (assets/resources.py; Dagster refuses two resource
objects under one key), and each run resolves its own study (assets/naming.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.chips import build_image_chips
from assets.dbt import DBT_EXECUTABLE, build_dbt_assets, dbt_project
from assets.embedder import build_image_embedder
from assets.embeddings import build_image_embeddings
from assets.estimates import effect_estimates
from assets.heterogeneity import HETEROGENEITY_ASSETS
from assets.image_components import build_image_components
from assets.image_context import image_context
from assets.imputation import imputed_outcomes
from assets.naming import STUDY_JOB, STUDY_TAG, TILE_STUDY_TAG, check_unique_names, scoped
from assets.partitions import (
    PREPARE_KEYS,
    consume_analysis_period,
    imagery_periods,
    keyed,
    refresh_job_name,
    tile_keys,
    tile_partitions,
    tiles_job_name,
)
from assets.publish import published_warehouse
from assets.resources import StudyResource, WarehouseResource
from assets.run_tags import study_run_tags
from assets.sensitivity import effect_sensitivity
from assets.survey import survey
from eocausal.study import load_study
from sensors.refresh import build_refresh_sensor
from sensors.run_failures import build_run_failure_sensor
from sensors.schedules import build_schedules
from sensors.survey_waves import build_survey_wave_sensor

# The assets defined once at module level (one op each, shared by every study's graph, each study's
# copy keyed under its name). The imagery assets and the dbt steps are built per study.
SHARED_ASSETS = [survey, image_context, effect_estimates, published_warehouse, imputed_outcomes, effect_sensitivity,
                 *HETEROGENEITY_ASSETS]
# Definitions-level metadata naming each study of a deployment: "eocausal/study/<name>" -> {study, workdir}.
STUDY_METADATA_PREFIX = "eocausal/study/"


@dataclass(frozen=True)
class StudyEntry:
    name: str  # the study's name: its asset-key prefix and its run tag
    study_path: str  # absolute
    workdir: str  # absolute


def study_name(study_path: str | Path, fallback: str | None = None) -> str:
    """The study's name (study.yaml `name`); `fallback` for a study file not written yet (the demo's
    before `make demo`)."""
    if Path(study_path).exists() or fallback is None:
        return load_study(study_path).name
    return fallback


def prefixed(assets_def: dg.AssetsDefinition, study: str) -> dg.AssetsDefinition:
    """The asset(s) with every key, dependency and check keyed under the study's name (same op)."""
    keys = (set(assets_def.keys) | {dep.asset_key for spec in assets_def.specs for dep in spec.deps}
            | {check.asset_key for check in assets_def.check_keys})
    return assets_def.with_attributes(asset_key_replacements={key: key.with_prefix(study) for key in keys})


def study_job_name(study: str) -> str:
    return scoped(study, STUDY_JOB)


def build_study_assets(study: str, periods: list[str], analysis_period: str) -> list[dg.AssetsDefinition]:
    """The study's asset graph, keyed under its name, for these imagery periods."""
    by_period = dg.StaticPartitionsDefinition(periods)
    by_tile = tile_partitions(periods, study)
    unpartitioned = [*(prefixed(a, study) for a in SHARED_ASSETS), *build_dbt_assets(study)]
    return [build_image_embedder(by_period, study), build_image_chips(by_tile, study),
            build_image_embeddings(by_tile, study), build_image_components(by_period, study),
            *(consume_analysis_period(a, analysis_period, study) for a in unpartitioned)]


def study_definitions(entry: StudyEntry) -> dg.Definitions:
    """One study's assets, job, schedule and sensors, without resources (see :func:`with_resources`)."""
    periods, analysis_period = imagery_periods(entry.study_path)
    # One process per run (in_process executor): the run holds its working folder from its first
    # step to its last (WarehouseResource), whether the CLI, the UI, a schedule or a sensor started it.
    # The study tag travels with every run of the job (schedules, sensors, backfills): the
    # deployment's resources resolve the run's study from it. So do the tags that cap Earth Engine
    # and GPU runs across the instance (assets/run_tags.py).
    tiles = dg.AssetSelection.assets(*tile_keys(entry.name))
    cap_tags = study_run_tags(entry.study_path)
    study_job = dg.define_asset_job(
        study_job_name(entry.name), selection=dg.AssetSelection.key_prefixes(entry.name) - tiles,
        executor_def=dg.in_process_executor, tags={STUDY_TAG: entry.name, **cap_tags},
        description=f"Study {entry.name}: survey + embedder -> (tiles job) -> merged imagery -> warehouse -> "
                    f"effect estimates. Partitioned by imagery period; the analysis uses {analysis_period!r}.")
    # A tile's run holds the study's working folder shared with the other tiles' runs (the study
    # job's runs exclusively), so it carries its own tag, not the study tag the one-run-per-study
    # cap counts; the Earth Engine and GPU caps count it (assets/run_tags.py).
    tiles_job = dg.define_asset_job(
        tiles_job_name(entry.name), selection=tiles, executor_def=dg.in_process_executor,
        tags={TILE_STUDY_TAG: entry.name, **cap_tags},
        description=f"Study {entry.name}: one tile's chips and embeddings for one imagery period "
                    "(partition <period>|<tile>).")
    # A refresh's first wave, per period: the survey and the period's embedder (assets/partitions.py).
    refresh_job = dg.define_asset_job(
        refresh_job_name(entry.name), selection=dg.AssetSelection.assets(*keyed(entry.name, PREPARE_KEYS)),
        executor_def=dg.in_process_executor, tags={STUDY_TAG: entry.name, **cap_tags},
        description=f"Study {entry.name}: a refresh's first wave, the survey and the period's embedder; the "
                    "study's refresh sensor then requests the tiles' runs and the merges.")
    jobs = [study_job, tiles_job, refresh_job]
    return dg.Definitions(
        assets=build_study_assets(entry.name, periods, analysis_period),
        jobs=jobs,
        schedules=build_schedules(refresh_job, periods, entry.name),
        sensors=[build_survey_wave_sensor(refresh_job, entry.study_path, study=entry.name),
                 build_refresh_sensor(study_job, tiles_job, refresh_job, entry.workdir, entry.study_path,
                                      study=entry.name),
                 build_run_failure_sensor(jobs, entry.workdir, study=entry.name)],
        metadata={f"{STUDY_METADATA_PREFIX}{entry.name}": {"study": entry.study_path, "workdir": entry.workdir}},
    )


def studies_of(defs: dg.Definitions) -> list[StudyEntry]:
    """The studies whose graphs these Definitions hold (from their metadata), in name order."""
    entries = []
    for key, value in (defs.metadata or {}).items():
        if key.startswith(STUDY_METADATA_PREFIX):
            data = getattr(value, "data", value)
            entries.append(StudyEntry(key.removeprefix(STUDY_METADATA_PREFIX), data["study"], data["workdir"]))
    return sorted(entries, key=lambda e: e.name)


def deployment_resources(entries: list[StudyEntry]) -> dict:
    """ONE study and ONE warehouse resource for every study (each run resolves its own), and dbt."""
    return {
        "study": StudyResource(studies={e.name: e.study_path for e in entries}),
        "warehouse": WarehouseResource(roots={e.name: e.workdir for e in entries}),
        "dbt": DbtCliResource(project_dir=dbt_project, profiles_dir=str(dbt_project.profiles_dir),
                              dbt_executable=DBT_EXECUTABLE),
    }


def with_resources(defs: dg.Definitions) -> dg.Definitions:
    """The studies' Definitions with the deployment's resources bound (studies read from their metadata)."""
    entries = studies_of(defs)
    check_unique_names([e.name for e in entries])
    return dg.Definitions.merge(defs, dg.Definitions(resources=deployment_resources(entries)))


def build_definitions(study_path: str | Path, workdir: str | Path, name: str | None = None) -> dg.Definitions:
    """Definitions of one study (a deployment of one): what `eocausal run` executes, with the same
    asset keys and job name as the study has in a deployment."""
    study_path, workdir = str(Path(study_path).resolve()), str(Path(workdir).resolve())
    entry = StudyEntry(study_name(study_path, name), study_path, workdir)
    return with_resources(study_definitions(entry))
