"""Asset `published_warehouse`: the read-only copy SQL consumers query, swapped in after a refresh."""

from __future__ import annotations

import dagster as dg

from assets.dbt import WAREHOUSE_POOL
from assets.resources import WarehouseResource
from eocausal.warehouse import publish, query


@dg.asset(
    group_name="warehouse",
    kinds={"duckdb"},
    code_version="publish-1",
    deps=[dg.AssetKey(["marts", "effect_estimates"]), dg.AssetKey(["marts", "effect_estimates_latest"]),
          dg.AssetKey(["marts", "analysis_units"]), dg.AssetKey(["marts", "unit_exclusions"]),
          # the heterogeneity marts (assets/heterogeneity.py) are published with the rest
          dg.AssetKey(["marts", "cate_predictions"]), dg.AssetKey(["marts", "cate_evaluation"]),
          dg.AssetKey(["marts", "effect_clusters"]), dg.AssetKey(["marts", "transport_predictions"])],
    pool=WAREHOUSE_POOL,
)
def published_warehouse(warehouse: WarehouseResource) -> dg.MaterializeResult:
    path = publish(warehouse.warehouse_path, warehouse.published_path)
    counts = query(
        path,
        "select (select count(*) from marts.effect_estimates) as n_estimates,"
        " (select count(distinct estimate_version) from marts.effect_estimates) as n_versions,"
        " (select count(*) from marts.analysis_units) as n_analysis_units,"
        " (select count(*) from marts.unit_exclusions) as n_excluded_units",
    ).iloc[0]
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(path)), **{k: int(v) for k, v in counts.items()}}
    )
