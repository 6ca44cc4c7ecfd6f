"""Asset `effect_estimates`: every estimator x feature set on marts.analysis_units, versioned."""


import json

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.dbt import WAREHOUSE_POOL
from assets.imputation import imputed_outcomes_path, read_imputed
from assets.metadata import table_metadata
from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.context import study_context
from eocausal.estimate.effects import (
    CODE_VERSION,
    analysis_version,
    estimate_study,
    estimates_markdown,
    fragility_summary,
    overlap_report,
)
from eocausal.estimate.imputation import ImputedOutcomes
from eocausal.faults import crash_point
from eocausal.lake import CURRENT_ESTIMATE_FILE, current_estimate_frame, stored_pca, write_frame
from eocausal.survey import covariate_column
from eocausal.versioning import frame_version
from eocausal.warehouse import query_units


@dg.asset(
    group_name="estimates",
    kinds={"python", "sklearn", "parquet"},
    code_version=CODE_VERSION,
    # imputed_outcomes: the corrected outcomes, when the study imputes missing ones.
    # image_context: the context windows' components the image feature sets adjust for.
    deps=[dg.AssetKey(["marts", "analysis_units"]), dg.AssetKey("imputed_outcomes"), dg.AssetKey("image_context")],
    # Reads the warehouse file: a reader also excludes the writer, so it shares the writers' pool.
    pool=WAREHOUSE_POOL,
    check_specs=[
        dg.AssetCheckSpec(
            "propensity_overlap",
            asset="effect_estimates",
            blocking=True,
            description="Cross-fitted propensities overlap: few clipped, weights' effective sample size adequate.",
        ),
        dg.AssetCheckSpec(
            "specification_agreement",
            asset="effect_estimates",
            description="Image-adjusted specifications (image only, another component count) agree with the "
                        "headline within their SEs (eocausal.estimate.fragility). Warns; does not block.",
        ),
        dg.AssetCheckSpec(
            "chip_scale",
            asset="effect_estimates",
            description="The headline with and without a context window twice the chip's side (by default the "
                        "headline adjusts for it) agree within their SEs; else the confounder extends beyond the "
                        "chip. Warns; does not block.",
        ),
    ],
)
def effect_estimates(
    context: AssetExecutionContext, study: StudyResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    spec = study.load()
    survey_version = frame_version(pd.read_parquet(warehouse.lake / "survey.parquet"))
    units = query_units(warehouse.warehouse_path, "select * from marts.analysis_units order by unit_id")
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
        imputed = None
        imputed_path = imputed_outcomes_path(warehouse, spec.name, version)
        if spec.analysis.outcome_imputation and imputed_path.exists():
            frame, imputation_diagnostics = read_imputed(imputed_path)
            imputed = ImputedOutcomes.from_frame(frame, units["unit_id"], imputation_diagnostics)
        # The PCA fitted once by the embedding stage, under these embeddings' version.
        pca = stored_pca(warehouse.lake, spec.imagery.analysis_period_name(), embeddings_version)
        # The image_context asset's components (computed here if it has not run).
        context_rows, _ = study_context(units, spec, warehouse.lake, warehouse.layout.chip_cache,
                                        survey_version, embeddings_version)
        result = estimate_study(
            units, covariates, spec.analysis, study_name=spec.name,
            survey_version=survey_version, embeddings_version=embeddings_version, imputed=imputed, pca=pca,
            context=context_rows,
        )
        table, from_cache = result.table, False
        crash_point("estimates.computed")  # fault tests: computed, not yet written
        write_frame(table, path)

    # The version this run selected is the study's current one (marts.current_estimate ->
    # effect_estimates_latest), whether computed now or reused.
    write_frame(current_estimate_frame(warehouse.lake / CURRENT_ESTIMATE_FILE, spec.name, version),
                warehouse.lake / CURRENT_ESTIMATE_FILE)
    overlap = overlap_report(table)
    overlap_passed = all(v["ok"] for v in overlap.values())
    overlap_message = "; ".join(f"{fs}: {v['message']}" for fs, v in overlap.items()) or "no propensity model"
    return dg.MaterializeResult(
        metadata={
            **table_metadata(table, path),
            "estimate_version": version,
            # Lineage: the input versions (and code version) the estimate version hashes (DESIGN §9).
            "code_version": CODE_VERSION,
            "survey_version": survey_version,
            "embeddings_version": embeddings_version,
            "from_cache": from_cache,
            "n_units": len(units),
            **({"n_outcome_missing": int(units["outcome"].isna().sum())} if spec.analysis.outcome_imputation else {}),
            "estimates": dg.MetadataValue.md(estimates_markdown(table)),
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(check_name="propensity_overlap", passed=overlap_passed, description=overlap_message),
            *fragility_check_results(table),
        ],
    )


def fragility_check_results(table: pd.DataFrame) -> list[dg.AssetCheckResult]:
    """The two fragility checks as warnings (a failed check, severity WARN: nothing is blocked)."""
    out = []
    for check, column in (("specification_agreement", "specification_warning"), ("chip_scale", "chip_scale_warning")):
        warning, detail = fragility_summary(table, column)
        out.append(dg.AssetCheckResult(
            check_name=check, passed=warning is None, severity=dg.AssetCheckSeverity.WARN,
            description=warning or detail, metadata={"detail": dg.MetadataValue.json(fragility_detail(table))},
        ))
    return out


def fragility_detail(table: pd.DataFrame) -> dict:
    if "fragility" not in table or table["fragility"].isna().all():
        return {}
    return json.loads(table["fragility"].dropna().iloc[0])
