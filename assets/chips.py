"""Asset `image_chips`: one chip per survey unit, cut from the study's imagery and cached by content.

Partitioned by imagery period (the study's `imagery.periods`; a GeoTIFF study has the one period
`geotiff`): each partition fetches its own period and writes lake/image_chips/period=<name>.parquet,
so a new period is one materialisation and the others' files are untouched. The partitions
definition comes from the study, so the asset is built with Definitions (`build_image_chips`).
"""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.metadata import table_metadata
from assets.resources import StudyResource, WarehouseResource
from eocausal.faults import rendezvous
from eocausal.imagery.chips import extract_chips
from eocausal.imagery.sources import open_source
from eocausal.lake import period_path, write_frame
from eocausal.quality import too_few_usable_units, validate_chip_index
from eocausal.versioning import frame_version


def build_image_chips(periods: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The `image_chips` asset, partitioned by the study's imagery periods."""

    # Keyed [study, "image_chips"] in a study's graph: its op is then <safe study>__image_chips
    # (assets.naming.scoped), one per study, as Dagster wants one op object per op name.
    key = dg.AssetKey([study, "image_chips"] if study else ["image_chips"])

    @dg.asset(
        key=key,
        group_name="imagery",
        kinds={"python", "rasterio", "parquet"},
        code_version="chips-3",  # 2: any imagery source; cloud_share and detail columns; 3: one file per period
        deps=[dg.AssetKey([study, "survey"] if study else ["survey"])],
        partitions_def=periods,
        check_specs=[
            dg.AssetCheckSpec(
                "chip_usability",
                asset=key,
                blocking=True,
                description="Every unit has a chip record; usable chips meet the nodata limit; "
                            "enough units are usable.",
            )
        ],
    )
    def image_chips(context: AssetExecutionContext, study: StudyResource,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
        return _materialise_chips(context.partition_key, study, warehouse)

    return image_chips


def _materialise_chips(period: str, study: StudyResource, warehouse: WarehouseResource) -> dg.MaterializeResult:
    rendezvous("chips.start")  # the deployment test: runs meet here, proving two were alive at once
    spec = study.load()
    spec.imagery.check_period_name(period)  # a partition the study no longer names is an error
    units = pd.read_parquet(warehouse.lake / "survey.parquet", columns=["unit_id", "lat", "lon"])
    source = open_source(spec, period)  # the GeoTIFF files, or this period's Earth Engine composite
    extraction = extract_chips(
        units, source, spec.imagery.chip_size_px, warehouse.layout.chip_cache, spec.imagery.max_nodata_share
    )
    index = extraction.index.assign(period=period)
    path = write_frame(index, period_path(warehouse.lake, "image_chips", period))

    report = validate_chip_index(index, spec.imagery.max_nodata_share)
    n_ok = int((index["status"] == "ok").sum())
    usable_share = n_ok / max(len(index), 1)
    excluded = index.loc[index["status"] != "ok", "reason"].value_counts().to_dict()
    enough = usable_share >= spec.imagery.min_usable_share and n_ok >= 10
    message = (
        f"{n_ok} of {len(index)} units usable ({usable_share:.1%}); excluded by reason: {excluded or 'none'}"
    )
    if not enough:
        message += f"; below the minimum usable share {spec.imagery.min_usable_share:.0%} (or under 10 units)"
        # Name the excluded units (and, if none is inside the imagery, the likely cause).
        shortfall = too_few_usable_units(index, spec.imagery.min_usable_share)
        if shortfall is not None:
            report.failures.append(shortfall)
    if not report.success:
        message += "\n" + report.message()
    version = frame_version(index)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(index, path),
            "period": period,
            "n_usable": n_ok,
            "n_excluded": len(index) - n_ok,
            "excluded_by_reason": dg.MetadataValue.json({str(k): int(v) for k, v in excluded.items()}),
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
                passed=bool(report.success and enough),
                description=message,
                metadata={"report": dg.MetadataValue.json(report.to_metadata())},
            )
        ],
    )
