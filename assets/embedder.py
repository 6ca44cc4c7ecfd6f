"""Asset `image_embedder`: the period's embedder, fitted once on a seeded sample of the survey's units.

Partitioned by imagery period (assets/partitions.py). The sample (every unit up to
eocausal.embed.embeddings.FIT_CHIPS, else a seeded draw in survey order) does not depend on how
the units are tiled: the partition cuts the sample's chips (into the shared, content-keyed chip
store, where the tiles' runs find them again), fits the embedder on the usable ones, stores it in
the embedding cache under its version and records which in lake/image_embedder/period=<p>.json.
Every tile of the period then only transforms (`image_embeddings`).

Its check, `chip_usability`, judges the sample as `image_chips` judges a tile, and whether enough of
the sample's units are usable: a study whose units are all outside the imagery stops here, before
any tile runs, naming the rule and the units.
"""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext

from assets.resources import StudyResource, WarehouseResource
from eocausal.embed.embeddings import CODE_VERSION, fit_embedder, fit_sample, write_json_atomic
from eocausal.imagery.chips import extract_chips
from eocausal.imagery.sources import open_source
from eocausal.lake import embedder_path
from eocausal.quality import chip_usability


def build_image_embedder(periods: dg.PartitionsDefinition, study: str | None = None) -> dg.AssetsDefinition:
    """The `image_embedder` asset, partitioned by the study's imagery periods."""
    key = dg.AssetKey([study, "image_embedder"] if study else ["image_embedder"])

    @dg.asset(
        key=key,
        group_name="imagery",
        kinds={"python", "torch"},
        code_version=f"{CODE_VERSION}.embedder-1",
        deps=[dg.AssetKey([study, "survey"] if study else ["survey"])],
        partitions_def=periods,
        check_specs=[
            dg.AssetCheckSpec(
                "chip_usability",
                asset=key,
                blocking=True,
                description="The embedder's sample: every unit has a chip record; usable chips meet the nodata "
                            "limit; enough units are usable.",
            )
        ],
    )
    def image_embedder(context: AssetExecutionContext, study: StudyResource,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
        return _materialise_embedder(context.partition_key, study, warehouse)

    return image_embedder


def _materialise_embedder(period: str, study: StudyResource, warehouse: WarehouseResource) -> dg.MaterializeResult:
    spec = study.load()
    spec.imagery.check_period_name(period)
    units = pd.read_parquet(warehouse.lake / "survey.parquet", columns=["unit_id", "lat", "lon"])
    sample = fit_sample(units, spec.embedding.seed)
    source = open_source(spec, period)
    extraction = extract_chips(sample, source, spec.imagery.chip_size_px, warehouse.layout.chip_cache,
                               spec.imagery.max_nodata_share)
    usability = chip_usability(extraction.index, spec.imagery.max_nodata_share, spec.imagery.min_usable_share,
                               rows_of=sample.index.to_numpy(), what="units of the embedder's sample")
    check = dg.AssetCheckResult(check_name="chip_usability", passed=usability.passed, description=usability.message,
                                metadata={"report": dg.MetadataValue.json(usability.report.to_metadata())})
    meta = {"period": period, "n_sample": len(sample), "n_usable": usability.n_ok}
    if not usability.passed:  # the blocking check stops the run; nothing is fitted or recorded
        return dg.MaterializeResult(metadata=meta, check_results=[check])
    weights = spec.resolve(spec.embedding.weights) if spec.embedding.weights else None
    fitted = fit_embedder(extraction.index, warehouse.layout.chip_cache, warehouse.layout.embedding_cache,
                          spec.embedding, weights_path=weights)
    path = write_json_atomic({"embedder_version": fitted.version, "method": spec.embedding.method,
                              "n_fit": fitted.n_fit, "n_sample": len(sample)},
                             embedder_path(warehouse.lake, period))
    return dg.MaterializeResult(
        metadata={**meta, "n_fit": fitted.n_fit, "embedder_version": fitted.version,
                  "path": dg.MetadataValue.path(str(path)), "data_version": fitted.version},
        data_version=dg.DataVersion(fitted.version),
        check_results=[check],
    )
