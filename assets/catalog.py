"""The deployment's catalog: every study's published marts in one DuckDB file (eocausal.catalog).

Asset `catalog` (deployment-level, not under any study) depends on every study's
`published_warehouse`; the sensor `catalog_refresh_sensor` requests the catalog job after each
successful run of a study job (however launched: UI, schedule, sensor, `eocausal run` into the
same instance), so SQL consumers open one file that holds every study's current versions.
Where it lives: EOCAUSAL_CATALOG, else <project root>/eocausal_catalog/catalog.duckdb.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from eocausal.catalog import build_catalog
from eocausal.layout import Layout

CATALOG_KEY = dg.AssetKey("catalog")
CATALOG_JOB = "catalog_job"
CATALOG_SENSOR = "catalog_refresh_sensor"
CATALOG_ENV = "EOCAUSAL_CATALOG"


def default_catalog_path(project_root: Path) -> Path:
    return Path(os.environ.get(CATALOG_ENV) or Path(project_root) / "eocausal_catalog" / "catalog.duckdb")


class CatalogResource(dg.ConfigurableResource):
    """Where the catalog is written, and each study's published warehouse."""

    path: str
    published: dict[str, str]


def build_catalog_definitions(studies: dict[str, str], study_jobs: list, catalog_path: Path) -> dg.Definitions:
    """The catalog asset, its job and the sensor that refreshes it; ``studies``: study -> working folder."""
    published = {name: str(Layout(workdir).published) for name, workdir in studies.items()}

    @dg.asset(
        key=CATALOG_KEY, group_name="catalog", kinds={"duckdb"}, code_version="catalog-1",
        deps=[dg.AssetKey([name, "published_warehouse"]) for name in sorted(studies)],
        description="Every study's published marts in one DuckDB file (schema marts, a study column; "
                    "marts.studies lists the studies), swapped in atomically after each refresh.",
    )
    def catalog(catalog: CatalogResource) -> dg.MaterializeResult:
        path = build_catalog({k: Path(v) for k, v in catalog.published.items()}, Path(catalog.path))
        present = sorted(name for name, p in catalog.published.items() if Path(p).exists())
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "studies": ", ".join(present) or "none published yet",
            "n_studies": len(present),
        })

    job = dg.define_asset_job(CATALOG_JOB, selection=[CATALOG_KEY], executor_def=dg.in_process_executor,
                              description="Rebuild the deployment's catalog from every study's published warehouse.")

    @dg.run_status_sensor(
        name=CATALOG_SENSOR, run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=study_jobs, request_job=job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="After each successful study run, rebuild the catalog so it holds that study's new version.",
    )
    def catalog_refresh_sensor(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        return dg.RunRequest(run_key=f"catalog:{run.run_id}", tags={"eocausal/after_run": run.run_id})

    return dg.Definitions(
        assets=[catalog], jobs=[job], sensors=[catalog_refresh_sensor],
        resources={"catalog": CatalogResource(path=str(catalog_path), published=published)},
    )
