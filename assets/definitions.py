"""The code location: Definitions for `dagster dev -w workspace.yaml` and for `eocausal run`.

`image_chips` and `image_embeddings` are partitioned by the study's imagery periods (a
StaticPartitionsDefinition of the period names; a GeoTIFF study has the one period `geotiff`),
so Definitions are built for one study. Everything downstream is unpartitioned and consumes the
analysis period's partition only (a SpecificPartitionsPartitionMapping on each dependency on the
two imagery assets, dbt models' included). The study job has the periods' partitions: a run for
the analysis period materialises the whole graph; a run for another period selects the two
imagery assets (assets/partitions.py; used by assets/runner.py and sensors/).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.chips import build_image_chips
from assets.dbt import DBT_EXECUTABLE, dbt_analysis_models, dbt_estimate_models, dbt_heterogeneity_models, dbt_project
from assets.embeddings import build_image_embeddings
from assets.estimates import effect_estimates
from assets.heterogeneity import HETEROGENEITY_ASSETS
from assets.imputation import imputed_outcomes
from assets.partitions import consume_analysis_period, imagery_periods
from assets.publish import published_warehouse
from assets.resources import StudyResource, WarehouseResource
from assets.sensitivity import effect_sensitivity
from assets.survey import survey
from eocausal.study import default_workdir
from sensors.run_failures import build_run_failure_sensor
from sensors.schedules import build_schedules
from sensors.survey_waves import build_survey_wave_sensor

STUDY_JOB = "study_job"
# Everything but image_chips and image_embeddings, which are partitioned by imagery period.
UNPARTITIONED_ASSETS = [survey, dbt_analysis_models, effect_estimates, dbt_estimate_models, published_warehouse,
                        imputed_outcomes, effect_sensitivity, *HETEROGENEITY_ASSETS, dbt_heterogeneity_models]

# Without settings, the UI shows the demo study that `make demo` generates.
_DEFAULT_STUDY = Path("demo_run/study/study.yaml")


def build_assets(periods: list[str], analysis_period: str) -> list[dg.AssetsDefinition]:
    """The asset graph for a study with these imagery periods."""
    partitions = dg.StaticPartitionsDefinition(periods)
    return [build_image_chips(partitions), build_image_embeddings(partitions),
            *(consume_analysis_period(a, analysis_period) for a in UNPARTITIONED_ASSETS)]


def build_definitions(study_path: str, workdir: str) -> dg.Definitions:
    """Definitions bound to one study file (its imagery periods are the partitions) and one working folder."""
    periods, analysis_period = imagery_periods(study_path)
    # One process per run (in_process executor): the run holds its working folder from its first
    # step to its last (WarehouseResource), whether the CLI, the UI, a schedule or a sensor started it.
    study_job = dg.define_asset_job(STUDY_JOB, selection=dg.AssetSelection.all(), executor_def=dg.in_process_executor,
                                    description="Survey + imagery -> embeddings -> warehouse -> effect estimates. "
                                                "Partitioned by imagery period; the analysis uses "
                                                f"{analysis_period!r}.")
    return dg.Definitions(
        assets=build_assets(periods, analysis_period),
        jobs=[study_job],
        schedules=build_schedules(study_job, periods, analysis_period),
        sensors=[build_survey_wave_sensor(study_job, study_path), build_run_failure_sensor(study_job, workdir)],
        resources={
            "study": StudyResource(study_path=study_path),
            "warehouse": WarehouseResource(root=workdir),
            "dbt": DbtCliResource(project_dir=dbt_project, profiles_dir=str(dbt_project.profiles_dir),
                                  dbt_executable=DBT_EXECUTABLE),
        },
    )


def _default_study() -> str:
    return os.environ.get("EOCAUSAL_STUDY", str(_DEFAULT_STUDY))


def _default_workdir() -> str:
    return os.environ.get("EOCAUSAL_WORKDIR", str(default_workdir(_default_study())))


defs = build_definitions(_default_study(), _default_workdir())
