"""Asset `image_embeddings`: random convolutional features of every usable chip of a tile (torch; CUDA when present).

Partitioned like `image_chips` (period x tile, assets/partitions.py): partition ``<period>|<tile>``
transforms the tile's usable chips (lake/image_chips/period=P/tile=T.parquet) with the period's
embedder (`image_embedder`, fitted once per period: no tile fits its own) and writes
lake/image_embeddings/period=P/tile=T.parquet, with the tile's PCA moments beside it
(tile=T.moments.npz), from which `image_components` fits the period's exact PCA.
"""

import json

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.partitions import by_period, partition_parts
from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.embeddings import (
    CODE_VERSION,
    FittedEmbedder,
    embed_chips,
    load_embedder,
)
from eocausal.embed.merge import write_tile
from eocausal.faults import crash_point
from eocausal.lake import embedder_path, tile_path


def build_image_embeddings(partitions: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The `image_embeddings` asset, partitioned by the study's imagery periods x tiles (as `image_chips`)."""

    # Keyed [study, "image_embeddings"] in a study's graph: its op is then <safe study>__image_embeddings
    # (assets.naming.scoped), one per study, as Dagster wants one op object per op name.
    key = dg.AssetKey([study, "image_embeddings"] if study else ["image_embeddings"])

    @dg.asset(
        key=key,
        group_name="imagery",
        kinds={"python", "torch", "parquet"},
        # The embeddings' own code version, and the lake table's: 3, one file per tile.
        code_version=f"{CODE_VERSION}.lake-3",
        deps=[
            # the same partition's chips
            dg.AssetKey([study, "image_chips"] if study else ["image_chips"]),
            # the period's embedder
            dg.AssetDep(dg.AssetKey([study, "image_embedder"] if study else ["image_embedder"]),
                        partition_mapping=by_period()),
        ],
        partitions_def=partitions,
    )
    def image_embeddings(context: AssetExecutionContext, study: StudyResource,
                         warehouse: WarehouseResource) -> dg.MaterializeResult:
        return _materialise_embeddings(*partition_parts(context.partition_key), study, warehouse)

    return image_embeddings


def _materialise_embeddings(period: str, tile: str, study: StudyResource,
                            warehouse: WarehouseResource) -> dg.MaterializeResult:
    spec = study.load()
    spec.imagery.check_period_name(period)
    chips_path = tile_path(warehouse.lake, "image_chips", period, tile)
    record = embedder_path(warehouse.lake, period)
    for path, asset, partition in ((chips_path, "image_chips", f"{period}|{tile}"),
                                   (record, "image_embedder", period)):
        if not path.is_file():
            raise dg.Failure(description=f"{asset} has not been materialised for {partition!r} ({path} is missing): "
                                         "materialise that partition first")
    version = json.loads(record.read_text(encoding="utf-8"))["embedder_version"]
    fitted = FittedEmbedder(load_embedder(warehouse.layout.embedding_cache, version), version, 0)
    index = pd.read_parquet(chips_path)
    emb = embed_chips(index, warehouse.layout.chip_cache, warehouse.layout.embedding_cache, fitted, spec.embedding)
    crash_point("embeddings.computed")  # fault tests: cached but not yet in the lake
    path = write_tile(warehouse.lake, period, tile, emb, version)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(emb.unit_ids)),
            "path": dg.MetadataValue.path(str(path)),
            "period": period,
            "tile": tile,
            "n_features": int(emb.features.shape[1]),
            "from_cache": emb.from_cache,
            "device": emb.device or "cached",
            "dtype": emb.dtype or "unknown",
            "embedder_version": version,
            "data_version": emb.version,
        },
        data_version=dg.DataVersion(emb.version),
    )
