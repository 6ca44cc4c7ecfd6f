"""Assets of the heterogeneity stages: `cate_estimates` -> `effect_clusters` -> `transport_predictions`,
`propensity_saliency` -> dbt (tag:heterogeneity: marts.cate_predictions, cate_evaluation,
effect_clusters, transport_predictions) -> published_warehouse -> `study_report`.

Thin wiring of eocausal.heterogeneity: each asset runs its stage, and reports version, cache use and
its key numbers (and figures) as metadata.
"""

from __future__ import annotations

import dagster as dg

from assets.dbt import WAREHOUSE_POOL
from assets.metadata import table_metadata
from assets.resources import StudyResource, WarehouseResource
from eocausal import heterogeneity as het
from eocausal.estimate.cate import CODE_VERSION as CATE_CODE_VERSION
from eocausal.estimate.effects import analysis_version
from eocausal.estimate.transport import CODE_VERSION as TRANSPORT_CODE_VERSION
from eocausal.interpret import CODE_VERSION as SALIENCY_CODE_VERSION
from eocausal.report import CODE_VERSION as REPORT_CODE_VERSION
from eocausal.report import png_markdown
from eocausal.survey import covariate_column
from eocausal.warehouse import query_units

GROUP = "heterogeneity"
# image_context: the context components the nuisance models adjust for, as the headline ATE's.
CATE_DEPS = [dg.AssetKey(["marts", "analysis_units"]), dg.AssetKey("image_context")]


def _workspace(warehouse: WarehouseResource) -> het.Workspace:
    return het.Workspace(warehouse.root_path)


def _stored(stage, asset: str):
    """A stage's stored output, or a failure naming the upstream asset to materialise first:
    a downstream asset loads its inputs and never recomputes them."""
    if stage is None:
        raise dg.Failure(description=f"{asset} has not been materialised for the current inputs: "
                                     f"materialise {asset} (and its upstream assets) first")
    return stage


def _cached_cate(spec, warehouse: WarehouseResource) -> het.CateStage:
    return _stored(het.load_cate(spec, _workspace(warehouse)), "cate_estimates")


@dg.multi_asset(
    specs=[
        dg.AssetSpec("cate_estimates", group_name=GROUP, kinds={"python", "sklearn", "parquet"},
                     code_version=CATE_CODE_VERSION, deps=CATE_DEPS,
                     description="DR-learner CATE per unit and feature set (held-out predictions, "
                                 "AIPW pseudo-outcomes)."),
        dg.AssetSpec("cate_evaluation", group_name=GROUP, kinds={"python", "parquet"},
                     code_version=CATE_CODE_VERSION, deps=CATE_DEPS,
                     description="RATE (AUTOC, Qini; bootstrap CIs) on held-out CATE, and PEHE when the "
                                 "truth is known."),
    ],
    pool=WAREHOUSE_POOL,  # reads the warehouse file, which excludes its writer
)
def cate_estimates(context, study: StudyResource, warehouse: WarehouseResource):
    spec = study.load()
    units = query_units(warehouse.warehouse_path, "select * from marts.analysis_units order by unit_id")
    covariates = [covariate_column(c) for c in spec.survey.covariates]
    stage = het.run_cate(spec, _workspace(warehouse), units, covariates)
    common = {"cate_version": stage.version, "from_cache": stage.from_cache, "enabled": stage.enabled}
    if stage.note:
        common["note"] = stage.note
    yield dg.MaterializeResult(
        asset_key=context.asset_key_for_output("cate_estimates"),  # [study, "cate_estimates"] in a deployment
        metadata={**table_metadata(stage.predictions, stage.paths["predictions"]), **common},
        data_version=dg.DataVersion(stage.version),
    )
    evaluation_meta = {**table_metadata(stage.evaluation, stage.paths["evaluation"]), **common}
    if len(stage.evaluation):
        evaluation_meta["evaluation"] = dg.MetadataValue.md(het.cate_markdown(stage.evaluation))
        for row in stage.evaluation.itertuples():
            if row.metric in ("rate_autoc", "pehe"):
                evaluation_meta[f"{row.metric}/{row.feature_set}"] = float(row.estimate)
    yield dg.MaterializeResult(
        asset_key=context.asset_key_for_output("cate_evaluation"), metadata=evaluation_meta,
        data_version=dg.DataVersion(stage.version),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"python", "torch", "parquet"},
    code_version=het.CLUSTERS_CODE_VERSION,
    deps=["cate_estimates", "cate_evaluation"],
    description="Image effect-cluster model (EM, torch): cluster posterior and image-predicted membership per unit.",
)
def effect_clusters(study: StudyResource, warehouse: WarehouseResource):
    spec = study.load()
    cate = _cached_cate(spec, warehouse)
    stage = het.run_clusters(spec, _workspace(warehouse), cate)
    meta = {
        **table_metadata(stage.table),
        "cluster_version": stage.version,
        "from_cache": stage.from_cache,
        "k": int(stage.summary.get("k", 0)),
        "clusters": dg.MetadataValue.md(het.clusters_markdown(stage.summary)),
    }
    for key in ("ari_posterior", "ari_membership"):
        if stage.summary.get(key) is not None:
            meta[key] = float(stage.summary[key])
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(stage.version))


@dg.asset(
    group_name=GROUP,
    kinds={"python", "torch", "rasterio", "parquet"},
    code_version=TRANSPORT_CODE_VERSION,
    deps=[effect_clusters, "image_chip_index", "image_components"],
    description="CATE (with SE) and cluster membership on a grid of cells over the transport region; "
                "GeoTIFF + PNG map.",
)
def transport_predictions(study: StudyResource, warehouse: WarehouseResource):
    from eocausal.imagery.sources import open_source

    spec = study.load()
    cate = _cached_cate(spec, warehouse)
    ws = _workspace(warehouse)
    clusters = _stored(het.load_clusters(spec, ws, cate), "effect_clusters")
    stage = het.run_transport(spec, ws, cate, clusters, open_source(spec))
    s = stage.summary
    meta = {
        **table_metadata(stage.table),
        "transport_version": stage.version,
        "from_cache": stage.from_cache,
        "n_cells": int(s.get("n_cells", 0)),
        "n_predicted": int(s.get("n_predicted", 0)),
    }
    if s.get("note"):
        meta["note"] = s["note"]
    if s.get("geotiff"):
        meta["geotiff"] = dg.MetadataValue.path(s["geotiff"])
        meta["map"] = dg.MetadataValue.md(png_markdown(s["png"], "transport map"))
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(stage.version))


@dg.asset(
    group_name=GROUP,
    kinds={"python", "torch"},
    code_version=SALIENCY_CODE_VERSION,
    deps=[effect_clusters],
    description="Gradient saliency of the treatment model and cluster membership, most and least likely treated units.",
)
def propensity_saliency(study: StudyResource, warehouse: WarehouseResource):
    spec = study.load()
    cate = _cached_cate(spec, warehouse)
    ws = _workspace(warehouse)
    clusters = _stored(het.load_clusters(spec, ws, cate), "effect_clusters")
    stage = het.run_saliency(spec, ws, cate, clusters)
    meta = {"saliency_version": stage.version, "from_cache": stage.from_cache,
            "units": dg.MetadataValue.json(stage.summary.get("units", {}))}
    if stage.summary.get("note"):
        meta["note"] = stage.summary["note"]
    for path in stage.summary.get("panels", []):
        meta[f"panel_{path.rsplit('/', 1)[-1].removesuffix('.png')}"] = dg.MetadataValue.path(path)
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(stage.version))


@dg.asset(
    group_name=GROUP,
    kinds={"python", "html"},
    code_version=REPORT_CODE_VERSION,
    deps=["published_warehouse", transport_predictions, propensity_saliency],
    description="The study report: one self-contained HTML file per study version (figures embedded).",
)
def study_report(study: StudyResource, warehouse: WarehouseResource):
    spec = study.load()
    ws = _workspace(warehouse)
    inputs = het.input_versions(ws.lake, spec)
    estimate_version = analysis_version(spec.analysis, inputs["survey"], inputs["embeddings"])
    cate = _cached_cate(spec, warehouse)
    clusters = _stored(het.load_clusters(spec, ws, cate), "effect_clusters")
    from eocausal.imagery.sources import open_source

    transport = _stored(het.load_transport(spec, ws, cate, clusters, open_source(spec)), "transport_predictions")
    saliency = _stored(het.load_saliency(spec, ws, cate, clusters), "propensity_saliency")
    report, version = het.run_report(spec, ws, warehouse.published_path, estimate_version, cate, clusters,
                                     transport, saliency)
    figures = "\n\n".join(png_markdown(report.figures[name], name) for name in report.key_figures)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(report.html_path)),
            "report_version": version,
            "figures": dg.MetadataValue.md(figures or "(no figures)"),
        },
        data_version=dg.DataVersion(version),
    )


HETEROGENEITY_ASSETS = [cate_estimates, effect_clusters, transport_predictions, propensity_saliency, study_report]
