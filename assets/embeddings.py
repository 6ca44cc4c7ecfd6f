"""Asset `image_embeddings`: random convolutional features of every usable chip (torch; CUDA when present).

Partitioned like `image_chips` (one partition per imagery period, built with Definitions by
`build_image_embeddings`): partition P embeds lake/image_chips/period=P.parquet and writes
lake/image_embeddings/period=P.parquet (and the PCA beside it, period=P.pca.json).
"""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.embeddings import CODE_VERSION, component_scores, compute_embeddings, write_json_atomic
from eocausal.faults import crash_point
from eocausal.lake import embeddings_table, period_path, write_table_atomic
from eocausal.quality import validate_embeddings


def build_image_embeddings(periods: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The `image_embeddings` asset, partitioned by the study's imagery periods (as `image_chips`)."""

    # Keyed [study, "image_embeddings"] in a study's graph: its op is then <safe study>__image_embeddings
    # (assets.naming.scoped), one per study, as Dagster wants one op object per op name.
    key = dg.AssetKey([study, "image_embeddings"] if study else ["image_embeddings"])

    @dg.asset(
        key=key,
        group_name="imagery",
        kinds={"python", "torch", "parquet"},
        # The embeddings' own code version, and the lake table's: 2 adds image_components.
        code_version=f"{CODE_VERSION}.lake-2",
        # same partitions: period P's embeddings read period P's chips
        deps=[dg.AssetKey([study, "image_chips"] if study else ["image_chips"])],
        partitions_def=periods,
        check_specs=[
            dg.AssetCheckSpec(
                "embeddings_valid",
                asset=key,
                blocking=True,
                description="Embeddings are finite for every unit and not constant across units.",
            )
        ],
    )
    def image_embeddings(context: AssetExecutionContext, study: StudyResource,
                         warehouse: WarehouseResource) -> dg.MaterializeResult:
        return _materialise_embeddings(context.partition_key, study, warehouse)

    return image_embeddings


def _materialise_embeddings(period: str, study: StudyResource, warehouse: WarehouseResource) -> dg.MaterializeResult:
    spec = study.load()
    spec.imagery.check_period_name(period)
    chips_path = period_path(warehouse.lake, "image_chips", period)
    if not chips_path.is_file():
        raise dg.Failure(description=f"image_chips has not been materialised for period {period!r} "
                                     f"({chips_path} is missing): materialise that partition first")
    index = pd.read_parquet(chips_path)
    weights = spec.resolve(spec.embedding.weights) if spec.embedding.weights else None
    emb = compute_embeddings(
        index, warehouse.layout.chip_cache, warehouse.layout.embedding_cache, spec.embedding, weights_path=weights
    )
    crash_point("embeddings.computed")  # fault tests: cached but not yet in the lake
    # The marts hold these scores on the stored PCA (embedding.pca_components), not the features.
    components = component_scores(emb.features, emb.pca) if emb.pca is not None else None
    table = embeddings_table(
        emb.unit_ids, emb.features, components,
        embedding_version=emb.version, embedding_method=emb.method, period=period,
    )
    path = write_table_atomic(table, period_path(warehouse.lake, "image_embeddings", period))
    # The PCA fitted once on these embeddings, under their version, for estimators that want it.
    pca_meta = {}
    if emb.pca is not None:
        write_json_atomic({"embedding_version": emb.version, "pca": emb.pca.to_dict()},
                          period_path(warehouse.lake, "image_embeddings", period, suffix=".pca.json"))
        pca_meta = {
            "pca_components": emb.pca.n_components_,
            "pca_explained_variance": float(emb.pca.explained_variance_ratio_.sum()),
        }
    report = validate_embeddings(emb.features, emb.unit_ids)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(emb.unit_ids)),
            "dagster/column_schema": dg.TableSchema(columns=[
                dg.TableColumn("unit_id", "string"),
                dg.TableColumn("embedding", f"list<float32>[{emb.features.shape[1]}]"),
                dg.TableColumn("image_components", f"list<float32>[{emb.pca.n_components_ if emb.pca else 0}]"),
                dg.TableColumn("embedding_version", "string"),
                dg.TableColumn("embedding_method", "string"),
                dg.TableColumn("period", "string"),
            ]),
            "path": dg.MetadataValue.path(str(path)),
            "period": period,
            "n_features": int(emb.features.shape[1]),
            "from_cache": emb.from_cache,
            "device": emb.device or "cached",
            "dtype": emb.dtype or "unknown",
            "data_version": emb.version,
            **pca_meta,
        },
        data_version=dg.DataVersion(emb.version),
        check_results=[
            dg.AssetCheckResult(
                check_name="embeddings_valid",
                passed=report.success,
                description=report.message(),
                metadata={"report": dg.MetadataValue.json(report.to_metadata())},
            )
        ],
    )
