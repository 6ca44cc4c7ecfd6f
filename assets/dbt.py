"""dbt models as assets: the analysis join (staging -> intermediate -> marts.analysis_units) and the
estimates history (marts.effect_estimates, marts.effect_estimates_latest).

Two @dbt_assets definitions, because the Python asset `effect_estimates` sits between them. Both
join the `duckdb_warehouse` pool: DuckDB admits one writing process and, while it writes, no reader.
A third, `dbt_heterogeneity_models` (tag:heterogeneity), loads the CATE, cluster and transport
tables after their Python assets, in the same pool.

Built per study (`build_dbt_assets(study)`: keys under the study's name, ops named
<safe study>__dbt_*) when Definitions are built; importing this module runs nothing (the manifest
is prepared by the build, `ensure_manifest`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import dagster as dg
from dagster import AssetExecutionContext
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from assets.naming import SEPARATOR, scoped
from assets.resources import StudyResource, WarehouseResource
from eocausal import progress
from eocausal.faults import crash_point

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"
WAREHOUSE_POOL = "duckdb_warehouse"
# The dbt installed beside this interpreter (the venv's), whether or not the venv is on PATH.
DBT_EXECUTABLE = str(Path(sys.executable).with_name("dbt"))

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def ensure_manifest(project: DbtProject = dbt_project) -> Path:
    """Run `dbt parse` when the manifest is missing or older than the project files.

    dagster-dbt prepares the project only under `dagster dev`; tests and `eocausal run` need it too.
    """
    manifest = project.manifest_path
    sources = [p for p in DBT_PROJECT_DIR.rglob("*") if p.suffix in (".sql", ".yml") and "target" not in p.parts]
    newest = max(p.stat().st_mtime for p in sources)
    if not manifest.exists() or manifest.stat().st_mtime < newest:
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
        subprocess.run(
            [DBT_EXECUTABLE, "parse", "--quiet",
             "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)],
            check=True, env=env, cwd=DBT_PROJECT_DIR,
        )
    return manifest


class EocausalDbtTranslator(DagsterDbtTranslator):
    """Models and sources keyed under the study's name ([study, "marts", "analysis_units"],
    [study, "survey"]) in a study's graph; every model in the `warehouse` group."""

    def __init__(self, study: str | None = None):
        super().__init__()
        self.study = study

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        key = super().get_asset_key(dbt_resource_props)
        return key.with_prefix(self.study) if self.study else key

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return "warehouse"


def dbt_vars(warehouse: WarehouseResource, study: StudyResource) -> dict:
    """dbt's --vars for one study's run: the lake and warehouse paths (profile and sources), the
    imagery period the analysis reads (image_chips / image_embeddings sources), and whether the
    outcome may be missing (the outcome's not-null tests). Per run, never through os.environ, so
    studies in one process do not race."""
    loaded = study.load()
    return {**warehouse.dbt_vars(), "analysis_period": loaded.imagery.analysis_period_name(),
            "outcome_may_be_missing": bool(loaded.analysis.outcome_imputation)}


def _step_name(op_name: str) -> str:
    """The stage's step name of a study's dbt op (<safe study>__dbt_analysis_models -> dbt_analysis_models)."""
    return op_name.rsplit(SEPARATOR, 1)[-1]


def _build(context: AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
           study: StudyResource):
    # Every dbt step passes the same vars, so dbt's parse (which renders the sources' locations)
    # stays the same between a study's runs.
    args = ["build", "--vars", json.dumps(dbt_vars(warehouse, study), sort_keys=True)]
    warehouse.root_path.mkdir(parents=True, exist_ok=True)
    # A target folder per study and step: dbt's partial-parse state (keyed to the study's profile
    # paths) survives between runs, so a warm run skips the full parse.
    step = _step_name(context.op_def.name)
    target = warehouse.layout.dbt_target(step)
    # progress: one step per model and per test (dbt tests are asset checks)
    label = step.removeprefix("dbt_").replace("_", " ")
    n_steps = len(context.selected_asset_keys) + len(context.selected_asset_check_keys)
    done = 0
    progress.report("dbt", done, n_steps, "models and tests", label)
    for event in dbt.cli(args, context=context, target_path=target).stream():
        yield event
        if isinstance(event, (dg.Output, dg.AssetMaterialization, dg.AssetCheckResult)):
            done = min(done + 1, n_steps)
            progress.report("dbt", done, n_steps, "models and tests", label)
        crash_point(f"dbt.{step}")  # fault tests: dbt is still building
    if done < n_steps:
        progress.report("dbt", n_steps, n_steps, "models and tests", label)


# The three dbt steps: op name (the stage's; <safe study>__<name> in a study's graph) and model selection.
DBT_STEPS = {
    "dbt_analysis_models": "tag:analysis",
    "dbt_estimate_models": "tag:estimates",
    # marts.cate_predictions, cate_evaluation, effect_clusters, transport_predictions (assets/heterogeneity.py)
    "dbt_heterogeneity_models": "tag:heterogeneity",
}


def build_dbt_assets(study: str | None = None) -> list[dg.AssetsDefinition]:
    """The study's three dbt steps, keyed under its name, with ops named <safe study>__<step>.

    Prepares the dbt manifest first (`dbt parse` when it is missing or stale): when Definitions are
    built, never at import."""
    ensure_manifest()
    translator = EocausalDbtTranslator(study)
    steps = []
    for name, select in DBT_STEPS.items():
        @dbt_assets(
            manifest=dbt_project.manifest_path,
            select=select,
            name=scoped(study, name) if study else name,
            pool=WAREHOUSE_POOL,
            dagster_dbt_translator=translator,
            project=dbt_project,
        )
        def models(context: AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource,
                   study: StudyResource):
            yield from _build(context, dbt, warehouse, study)

        steps.append(models)
    return steps
