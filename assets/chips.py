"""Asset `image_chips`: one chip per survey unit, cut from the study's imagery and cached by content.

Partitioned by imagery period x tile (assets/partitions.py): partition ``<period>|<tile>`` fetches
its period for the survey's units in that tile and writes
lake/image_chips/period=<period>/tile=<tile>.parquet, so tiles run side by side and a new period
or tile is its own materialisation. Its check judges the tile's records (every unit accounted
for, usable chips within the nodata limit); whether enough of the period's units are usable is
judged once the tiles are merged (`image_components`). The partitions definition comes from the
study, so the asset is built with Definitions (`build_image_chips`).
"""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.metadata import table_metadata
from assets.partitions import partition_parts
from assets.resources import StudyResource, WarehouseResource
from eocausal.faults import rendezvous
from eocausal.imagery.chips import extract_chips
from eocausal.imagery.sources import open_source
from eocausal.lake import tile_path, write_frame
from eocausal.quality import chip_usability
from eocausal.versioning import frame_version


def build_image_chips(partitions: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The `image_chips` asset, partitioned by the study's imagery periods x tiles."""

    # Keyed [study, "image_chips"] in a study's graph: its op is then <safe study>__image_chips
    # (assets.naming.scoped), one per study, as Dagster wants one op object per op name.
    key = dg.AssetKey([study, "image_chips"] if study else ["image_chips"])

    @dg.asset(
        key=key,
        group_name="imagery",
        kinds={"python", "rasterio", "parquet"},
        code_version="chips-4",  # 2: any source; cloud_share, detail columns; 3: a file per period; 4: per tile
        deps=[dg.AssetKey([study, "survey"] if study else ["survey"])],
        partitions_def=partitions,
        check_specs=[
            dg.AssetCheckSpec(
                "chip_usability",
                asset=key,
                blocking=True,
                description="Every unit of the tile has a chip record; usable chips meet the nodata limit.",
            )
        ],
    )
    def image_chips(context: AssetExecutionContext, study: StudyResource,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
        return _materialise_chips(*partition_parts(context.partition_key), study, warehouse)

    return image_chips


def _materialise_chips(period: str, tile: str, study: StudyResource,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    rendezvous("chips.start")  # the deployment test: runs meet here, proving two were alive at once
    spec = study.load()
    spec.imagery.check_period_name(period)  # a partition the study no longer names is an error
    units = pd.read_parquet(warehouse.lake / "survey.parquet", columns=["unit_id", "lat", "lon", "tile"])
    units = units[units["tile"] == tile]  # none: a tile of an earlier survey wave (an empty file)
    source = open_source(spec, period)  # the GeoTIFF files, or this period's Earth Engine composite
    extraction = extract_chips(
        units[["unit_id", "lat", "lon"]], source, spec.imagery.chip_size_px, warehouse.layout.chip_cache,
        spec.imagery.max_nodata_share,
    )
    index = extraction.index.assign(period=period, tile=tile)
    path = write_frame(index, tile_path(warehouse.lake, "image_chips", period, tile))
    usability = chip_usability(index, spec.imagery.max_nodata_share, spec.imagery.min_usable_share,
                               require_enough=False, rows_of=units.index.to_numpy())
    version = frame_version(index)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(index, path),
            "period": period,
            "tile": tile,
            "n_usable": usability.n_ok,
            "n_excluded": len(index) - usability.n_ok,
            "excluded_by_reason": dg.MetadataValue.json(usability.excluded),
            "n_chips_from_cache": extraction.n_cached,
            "n_chips_extracted": extraction.n_extracted,
            "n_chips_failed": extraction.n_failed,
            "imagery_fingerprint": source.fingerprint(),
            **({"imagery_provenance": dg.MetadataValue.json(source.provenance())}
               if hasattr(source, "provenance") else {}),
            "data_version": version,
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(
                check_name="chip_usability",
                passed=usability.passed,
                description=usability.message,
                metadata={"report": dg.MetadataValue.json(usability.report.to_metadata())},
            )
        ],
    )
