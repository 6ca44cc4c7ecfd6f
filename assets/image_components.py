"""Assets `image_chip_index` and `image_components`: a period's imagery merged from its tiles.

Partitioned by imagery period (assets/partitions.py); each depends on every tile of its period
(`image_chips`, `image_embeddings`). One step merges the tiles of the survey's units in survey
order (eocausal.embed.merge) into the tables the rest of the graph reads: `image_chip_index`,
lake/image_chips/period=P.parquet, and `image_components`, lake/image_embeddings/period=P.parquet
(embeddings and their scores on the stored PCA, which the marts hold), with the exact PCA fitted
from the tiles' moments beside it (period=P.pca.json). Two assets because each dbt source maps
to one. Their checks judge the period: enough usable units (`chip_usability`) and valid
embeddings (`embeddings_valid`).
"""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.metadata import table_metadata
from assets.naming import scoped
from assets.partitions import by_period
from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.embeddings import CODE_VERSION, component_scores, write_json_atomic
from eocausal.embed.merge import merge_period
from eocausal.lake import embeddings_table, period_path, write_frame, write_table_atomic
from eocausal.quality import chip_usability, validate_embeddings
from eocausal.versioning import frame_version


def build_image_components(periods: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The period merge (one step, partitioned by the study's imagery periods): two assets, the
    merged chip index `image_chip_index` and the merged embeddings with components `image_components`."""
    def key(name: str) -> dg.AssetKey:
        return dg.AssetKey([study, name] if study else [name])

    every_tile = by_period()
    chip_index, components = key("image_chip_index"), key("image_components")

    @dg.multi_asset(
        name=scoped(study, "image_components"),
        specs=[
            dg.AssetSpec(chip_index, group_name="imagery", kinds={"python", "parquet"},
                         code_version=f"{CODE_VERSION}.merge-1",
                         # the survey: its units and their tiles are what is merged
                         deps=[key("survey"), dg.AssetDep(key("image_chips"), partition_mapping=every_tile)],
                         description="The period's chip index (one record per survey unit), merged from its tiles."),
            dg.AssetSpec(components, group_name="imagery", kinds={"python", "parquet"},
                         code_version=f"{CODE_VERSION}.merge-1",
                         deps=[dg.AssetDep(key("image_embeddings"), partition_mapping=every_tile)],
                         description="The period's embeddings merged from its tiles, with the scores on the "
                                     "PCA fitted from the tiles' moments (image_components, what the marts hold)."),
        ],
        partitions_def=periods,
        check_specs=[
            dg.AssetCheckSpec("chip_usability", asset=chip_index, blocking=True,
                              description="Enough of the period's units have a usable chip."),
            dg.AssetCheckSpec("embeddings_valid", asset=components, blocking=True,
                              description="Embeddings are finite for every unit and not constant across units."),
        ],
    )
    def image_components(context: AssetExecutionContext, study: StudyResource, warehouse: WarehouseResource):
        yield from _materialise_components(context.partition_key, study, warehouse, chip_index, components)

    return image_components


def _materialise_components(period: str, study: StudyResource, warehouse: WarehouseResource,
                            chip_index: dg.AssetKey, components_key: dg.AssetKey):
    spec = study.load()
    spec.imagery.check_period_name(period)
    units = pd.read_parquet(warehouse.lake / "survey.parquet", columns=["unit_id", "tile"])
    merged = merge_period(warehouse.lake, period, units, spec.embedding)
    index = merged.chip_index
    usability = chip_usability(index, spec.imagery.max_nodata_share, spec.imagery.min_usable_share)
    chips_path = write_frame(index, period_path(warehouse.lake, "image_chips", period))
    components = component_scores(merged.features, merged.pca) if merged.pca is not None else None
    table = embeddings_table(merged.unit_ids, merged.features, components, embedding_version=merged.version,
                             embedding_method=merged.method, period=period)
    path = write_table_atomic(table, period_path(warehouse.lake, "image_embeddings", period))
    pca_meta = {}
    if merged.pca is not None:
        write_json_atomic({"embedding_version": merged.version, "pca": merged.pca.to_dict()},
                          period_path(warehouse.lake, "image_embeddings", period, suffix=".pca.json"))
        pca_meta = {"pca_components": merged.pca.n_components_,
                    "pca_explained_variance": float(merged.pca.explained_variance_ratio_.sum())}
    report = validate_embeddings(merged.features, merged.unit_ids)
    n_components = merged.pca.n_components_ if merged.pca else 0
    yield dg.MaterializeResult(
        asset_key=chip_index,
        metadata={
            **table_metadata(index, chips_path),
            "period": period,
            "n_tiles": len(merged.tiles),
            "n_usable": usability.n_ok,
            "n_excluded": len(index) - usability.n_ok,
            "excluded_by_reason": dg.MetadataValue.json(usability.excluded),
        },
        data_version=dg.DataVersion(frame_version(index)),
        check_results=[
            dg.AssetCheckResult(asset_key=chip_index, check_name="chip_usability", passed=usability.passed,
                                description=usability.message,
                                metadata={"report": dg.MetadataValue.json(usability.report.to_metadata())}),
        ],
    )
    yield dg.MaterializeResult(
        asset_key=components_key,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(merged.unit_ids)),
            "dagster/column_schema": dg.TableSchema(columns=[
                dg.TableColumn("unit_id", "string"),
                dg.TableColumn("embedding", f"list<float32>[{merged.features.shape[1]}]"),
                dg.TableColumn("image_components", f"list<float32>[{n_components}]"),
                dg.TableColumn("embedding_version", "string"),
                dg.TableColumn("embedding_method", "string"),
                dg.TableColumn("period", "string"),
            ]),
            "path": dg.MetadataValue.path(str(path)),
            "period": period,
            "n_tiles": len(merged.tiles),
            "n_features": int(merged.features.shape[1]),
            "embedder_version": merged.embedder_version,
            "data_version": merged.version,
            **pca_meta,
        },
        data_version=dg.DataVersion(merged.version),
        check_results=[
            dg.AssetCheckResult(asset_key=components_key, check_name="embeddings_valid", passed=report.success,
                                description=report.message(),
                                metadata={"report": dg.MetadataValue.json(report.to_metadata())}),
        ],
    )
