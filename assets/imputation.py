"""Asset `imputed_outcomes`: image (+ tabular) predictions of the outcome for every analysis unit,
and the corrected pseudo-outcomes that `effect_estimates` runs on (studies with
`analysis.outcome_imputation`; otherwise it records that imputation is off)."""

import json

import dagster as dg
import pandas as pd
import pyarrow as pa
from dagster import AssetExecutionContext

from assets.dbt import WAREHOUSE_POOL
from assets.metadata import table_metadata
from assets.resources import StudyResource, WarehouseResource
from eocausal.estimate.effects import CODE_VERSION, analysis_version, impute_study_outcomes
from eocausal.lake import stored_pca, write_table_atomic
from eocausal.quality import MIN_MEASURED_OUTCOMES_PER_ARM
from eocausal.survey import covariate_column
from eocausal.versioning import frame_version
from eocausal.warehouse import query_units

# Parquet schema-metadata key holding the imputation diagnostics (so a cached file keeps them).
DIAGNOSTICS_KEY = b"eocausal_imputation_diagnostics"


def imputed_outcomes_path(warehouse: WarehouseResource, study_name: str, version: str):
    """One file per estimate version: the estimates of that version were computed from it."""
    return warehouse.lake / "imputed_outcomes" / f"{study_name}-{version}.parquet"


def read_imputed(path) -> tuple[pd.DataFrame, dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(DIAGNOSTICS_KEY)
    return table.to_pandas(), (json.loads(raw) if raw else {})


@dg.asset(
    group_name="estimates",
    kinds={"python", "sklearn", "parquet"},
    code_version=CODE_VERSION,
    deps=[dg.AssetKey(["marts", "analysis_units"])],
    pool=WAREHOUSE_POOL,  # reads the warehouse file
    check_specs=[
        dg.AssetCheckSpec(
            "measured_outcomes_per_arm",
            asset="imputed_outcomes",
            blocking=True,
            description=f"With outcome imputation: at least {MIN_MEASURED_OUTCOMES_PER_ARM} analysis units "
                        "per treatment arm have a measured outcome to learn from.",
        ),
        dg.AssetCheckSpec(
            "imputation_model_fit",
            asset="imputed_outcomes",
            blocking=False,
            description="The image outcome model predicts measured outcomes out of fold (R² > 0 in each arm). "
                        "If not, the corrected estimates stay valid but gain nothing over the measured units alone.",
        ),
    ],
)
def imputed_outcomes(
    context: AssetExecutionContext, study: StudyResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    spec = study.load()
    if not spec.analysis.outcome_imputation:
        off = "outcome imputation is off (analysis.outcome_imputation: false): every outcome is measured"
        return dg.MaterializeResult(
            metadata={"outcome_imputation": False, "note": off},
            check_results=[
                dg.AssetCheckResult(check_name="measured_outcomes_per_arm", passed=True, description=off),
                dg.AssetCheckResult(check_name="imputation_model_fit", passed=True, description=off),
            ],
        )

    units = query_units(warehouse.warehouse_path, "select * from marts.analysis_units order by unit_id")
    if units.empty:
        raise dg.Failure(description="marts.analysis_units is empty: no unit has a usable chip and embedding")
    measured = units["outcome"].notna()
    counts = {name: int((measured & (units["treatment"] == arm)).sum())
              for arm, name in ((1, "treated"), (0, "control"))}
    short = {name: c for name, c in counts.items() if c < MIN_MEASURED_OUTCOMES_PER_ARM}
    if short:
        message = (f"too few analysis units with a measured outcome to impute from: {short} "
                   f"(need {MIN_MEASURED_OUTCOMES_PER_ARM} per arm)")
        return dg.MaterializeResult(
            metadata={"outcome_imputation": True, "n_measured_by_arm": counts},
            check_results=[
                dg.AssetCheckResult(check_name="measured_outcomes_per_arm", passed=False, description=message),
                dg.AssetCheckResult(check_name="imputation_model_fit", passed=False,
                                    description="not fitted: " + message),
            ],
        )

    survey_version = frame_version(pd.read_parquet(warehouse.lake / "survey.parquet"))
    embeddings_version = str(units["embedding_version"].iloc[0])
    version = analysis_version(spec.analysis, survey_version, embeddings_version)
    path = imputed_outcomes_path(warehouse, spec.name, version)
    if path.exists():
        context.log.info(f"imputed outcomes for version {version} exist; reusing {path.name}")
        frame, diagnostics = read_imputed(path)
        from_cache = True
    else:
        covariates = [covariate_column(c) for c in spec.survey.covariates]
        pca = stored_pca(warehouse.lake, spec.imagery.analysis_period_name(), embeddings_version)
        imputed = impute_study_outcomes(units, covariates, spec.analysis, pca)
        frame, diagnostics = imputed.to_frame(units["unit_id"]), imputed.diagnostics
        frame.insert(0, "estimate_version", version)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               DIAGNOSTICS_KEY: json.dumps(diagnostics).encode()})
        write_table_atomic(table, path)
        from_cache = False

    r2 = diagnostics.get("imputation_r2", {})
    fit_ok = all(v is not None and v > 0 for v in r2.values())
    fit_text = ", ".join(f"{arm} {v:.3f}" if v is not None else f"{arm} n/a" for arm, v in r2.items())
    power = diagnostics.get("power", {})
    return dg.MaterializeResult(
        metadata={
            **table_metadata(frame, path),
            "outcome_imputation": True,
            "estimate_version": version,
            "from_cache": from_cache,
            "n_units": int(diagnostics.get("n", len(frame))),
            "n_measured": int(diagnostics.get("n_labelled", int(measured.sum()))),
            "n_missing": int(diagnostics.get("n_missing", int((~measured).sum()))),
            "share_missing": float(diagnostics.get("share_missing", float((~measured).mean()))),
            "labelling": str(diagnostics.get("labelling", spec.analysis.outcome_labelling)),
            "out_of_fold_r2": dg.MetadataValue.json(r2),
            "power_tuning_lambda": dg.MetadataValue.json(power),
            "diagnostics": dg.MetadataValue.json(diagnostics),
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(
                check_name="measured_outcomes_per_arm", passed=True,
                description=f"measured outcomes per arm: {counts}",
            ),
            dg.AssetCheckResult(
                check_name="imputation_model_fit", passed=fit_ok,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"out-of-fold R² of the outcome model on measured units: {fit_text}; "
                            f"power tuning lambda: {power}",
            ),
        ],
    )
