"""Asset `effect_estimates`: every estimator x feature set on marts.analysis_units, versioned."""


import dagster as dg
from dagster import AssetExecutionContext
import pandas as pd

from assets.dbt import WAREHOUSE_POOL
from assets.metadata import table_metadata
from assets.resources import StudyResource, WarehouseResource
from eocausal.estimate.effects import CODE_VERSION, analysis_version, estimate_study, estimates_markdown, overlap_report
from eocausal.lake import write_frame
from eocausal.survey import covariate_column
from eocausal.versioning import frame_version
from eocausal.warehouse import query


@dg.asset(
    group_name="estimates",
    kinds={"python", "sklearn", "parquet"},
    code_version=CODE_VERSION,
    deps=[dg.AssetKey(["marts", "analysis_units"])],
    # Reads the warehouse file: a reader also excludes the writer, so it shares the writers' pool.
    pool=WAREHOUSE_POOL,
    check_specs=[
        dg.AssetCheckSpec(
            "propensity_overlap",
            asset="effect_estimates",
            blocking=True,
            description="Cross-fitted propensities overlap: few clipped, weights' effective sample size adequate.",
        )
    ],
)
def effect_estimates(
    context: AssetExecutionContext, study: StudyResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    spec = study.load()
    survey_version = frame_version(pd.read_parquet(warehouse.lake / "survey.parquet"))
    units = query(warehouse.warehouse_path, "select * from marts.analysis_units order by unit_id")
    if units.empty:
        raise dg.Failure(description="marts.analysis_units is empty: no unit has a usable chip and embedding")
    embeddings_version = str(units["embedding_version"].iloc[0])
    version = analysis_version(spec.analysis, survey_version, embeddings_version)
    path = warehouse.lake / "effect_estimates" / f"{spec.name}-{version}.parquet"
    covariates = [covariate_column(c) for c in spec.survey.covariates]

    if path.exists():
        # Same inputs and spec: the version exists already; recompute nothing, add no rows.
        context.log.info(f"estimate version {version} exists; reusing {path.name}")
        table = pd.read_parquet(path)
        from_cache = True
    else:
        result = estimate_study(
            units, covariates, spec.analysis, study_name=spec.name,
            survey_version=survey_version, embeddings_version=embeddings_version,
        )
        table, from_cache = result.table, False
        write_frame(table, path)

    overlap = overlap_report(table)
    overlap_passed = all(v["ok"] for v in overlap.values())
    overlap_message = "; ".join(f"{fs}: {v['message']}" for fs, v in overlap.items()) or "no propensity model"
    return dg.MaterializeResult(
        metadata={
            **table_metadata(table, path),
            "estimate_version": version,
            "from_cache": from_cache,
            "n_units": len(units),
            "estimates": dg.MetadataValue.md(estimates_markdown(table)),
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(check_name="propensity_overlap", passed=overlap_passed, description=overlap_message)
        ],
    )
