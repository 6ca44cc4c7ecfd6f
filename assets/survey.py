"""Asset `survey`: the study's survey table, validated by the GX suite, as canonical Parquet."""


import dagster as dg
from dagster import AssetExecutionContext

from assets.metadata import table_metadata
from assets.partitions import register_tiles
from assets.resources import StudyResource, WarehouseResource
from eocausal.lake import write_frame
from eocausal.quality import DataQualityError
from eocausal.survey import SurveyError, load_survey
from eocausal.versioning import frame_version


@dg.asset(
    group_name="ingest",
    kinds={"python", "parquet"},
    code_version="survey-2",  # 2: the unit's spatial tile (eocausal.tiles)
    check_specs=[
        dg.AssetCheckSpec(
            "survey_suite",
            asset="survey",
            blocking=True,
            description="GX suite: required columns, types, lat/lon ranges, unique ids, binary treatment, "
                        "finite outcome.",
        )
    ],
)
def survey(context: AssetExecutionContext, study: StudyResource,
           warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Read the survey (CSV/Parquet), map the user's columns, validate, write lake/survey.parquet,
    and add its units' tiles to the study's tile partitions (assets/partitions.py).

    Invalid input fails the step *before* anything is written, so the lake and the warehouse keep
    what they had.
    """
    spec = study.load()
    try:
        df, report = load_survey(spec.survey_path, spec.survey,
                                 outcome_may_be_missing=spec.analysis.outcome_imputation,
                                 max_units_per_tile=spec.imagery.max_units_per_tile)
    except DataQualityError as exc:
        raise dg.Failure(
            description=f"survey rejected: {exc}",
            metadata={"quality": dg.MetadataValue.json(exc.report.to_metadata())},
        ) from exc
    except SurveyError as exc:
        # A file that cannot be read as a table (empty, not UTF-8, unparseable): say so plainly.
        raise dg.Failure(description=f"survey rejected: {exc}") from exc
    path = write_frame(df, warehouse.lake / "survey.parquet")
    key = context.asset_key
    new_tiles = register_tiles(context.instance, key.path[0] if len(key.path) > 1 else None, df["tile"])
    version = frame_version(df)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, path),
            "n_treated": int(df["treatment"].sum()),
            "n_control": int((df["treatment"] == 0).sum()),
            "n_tiles": int(df["tile"].nunique()),
            "n_new_tiles": len(new_tiles),
            "data_version": version,
            # With outcome imputation on, a missing outcome is allowed: say how many there are.
            **({"n_outcome_missing": int(df["outcome"].isna().sum())} if spec.analysis.outcome_imputation else {}),
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(
                check_name="survey_suite",
                passed=True,
                metadata={"report": dg.MetadataValue.json(report.to_metadata())},
            )
        ],
    )
