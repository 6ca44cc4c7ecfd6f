"""Asset `image_context`: the components of a window twice the chip's side around each analysis unit.

The image feature sets of `effect_estimates` and the nuisance models of `cate_estimates` adjust for
them (``analysis.context_components``; eocausal.embed.context); with the context off, the chip-scale
check reads a sample of them. Computed once per version here, so both stages read the same
components (lake/image_context/period=P.parquet).
"""

import dagster as dg
import pandas as pd

from assets.dbt import WAREHOUSE_POOL
from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.context import CODE_VERSION, context_version, study_context
from eocausal.versioning import frame_version
from eocausal.warehouse import query_units


@dg.asset(
    group_name="estimates",
    kinds={"python", "parquet"},
    code_version=CODE_VERSION,
    deps=[dg.AssetKey(["marts", "analysis_units"])],
    # Reads the warehouse file: a reader also excludes the writer, so it shares the writers' pool.
    pool=WAREHOUSE_POOL,
    description="Image components of a context window twice the chip's side around each analysis unit "
                "(read from the imagery at half resolution, embedded, reduced by its own PCA), which the "
                "estimates adjust for (analysis.context_components).",
)
def image_context(study: StudyResource, warehouse: WarehouseResource) -> dg.MaterializeResult:
    spec = study.load()
    survey_version = frame_version(pd.read_parquet(warehouse.lake / "survey.parquet"))
    units = query_units(warehouse.warehouse_path,
                        "select unit_id, lat, lon, embedding_version from marts.analysis_units order by unit_id")
    embeddings_version = str(units["embedding_version"].iloc[0]) if len(units) else ""
    version = context_version(spec, survey_version, embeddings_version)
    if version is None or units.empty:
        return dg.MaterializeResult(metadata={"context": "not used: the analysis has no image feature set"
                                              if version is None else "no analysis units"})
    components, reused = study_context(units, spec, warehouse.lake, warehouse.layout.chip_cache,
                                       survey_version, embeddings_version)
    assert components is not None
    usable = int(pd.notna(components).all(axis=1).sum())
    return dg.MaterializeResult(
        metadata={"context_version": version, "from_cache": reused, "n_units": len(units),
                  "n_usable": usable, "n_components": int(components.shape[1])},
        data_version=dg.DataVersion(version),
    )
