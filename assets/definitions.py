"""The code location: Definitions for `dagster dev -w workspace.yaml` and for `eocausal run`."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from assets.chips import image_chips
from assets.dbt import DBT_EXECUTABLE, dbt_analysis_models, dbt_estimate_models, dbt_project
from assets.dbt import dbt_heterogeneity_models
from assets.embeddings import image_embeddings
from assets.estimates import effect_estimates
from assets.heterogeneity import HETEROGENEITY_ASSETS
from assets.imputation import imputed_outcomes
from assets.publish import published_warehouse
from assets.resources import StudyResource, WarehouseResource
from assets.sensitivity import effect_sensitivity
from assets.survey import survey
from eocausal.study import default_workdir
from sensors.run_failures import build_run_failure_sensor
from sensors.schedules import build_schedules
from sensors.survey_waves import build_survey_wave_sensor

STUDY_JOB = "study_job"
ALL_ASSETS = [survey, image_chips, image_embeddings, dbt_analysis_models, effect_estimates,
              dbt_estimate_models, published_warehouse, imputed_outcomes, effect_sensitivity,
              *HETEROGENEITY_ASSETS, dbt_heterogeneity_models]

# Without settings, the UI shows the demo study that `make demo` generates.
_DEFAULT_STUDY = Path("demo_run/study/study.yaml")


def build_definitions(study_path: str, workdir: str) -> dg.Definitions:
    """Definitions bound to one study file and one working folder."""
    study_job = dg.define_asset_job(STUDY_JOB, selection=dg.AssetSelection.all(),
                                    description="Survey + imagery -> embeddings -> warehouse -> effect estimates.")
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[study_job],
        schedules=build_schedules(study_job),
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
