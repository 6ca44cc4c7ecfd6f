"""Imagery-period partitions: which assets carry them, how the rest consume them, and run requests.

`image_chips` and `image_embeddings` have one partition per imagery period of the study
(`imagery.periods`; a GeoTIFF study has the one period `geotiff`), each with its own lake file.
The rest of the graph is unpartitioned and reads the analysis period only. A refresh (the
schedule, a survey wave, `eocausal run`) is one run per period: the analysis period's run covers
the whole graph, every other period's run the survey and its two imagery assets.

In a deployment every study's keys carry its name as prefix ([study, "image_chips"]): the
functions below take the study's keys (:func:`imagery_keys`, :func:`period_run_keys`); the
constants are the unprefixed stage keys.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from eocausal.study import GEOTIFF_PERIOD, load_study

# The assets partitioned by imagery period.
IMAGERY_ASSET_KEYS = (dg.AssetKey("image_chips"), dg.AssetKey("image_embeddings"))
# What a run for a period other than the analysis period materialises: the survey too (cheap),
# because its units are the chips' units, and a run must not read a survey that another run of the
# same refresh (a new survey wave) is replacing, nor find none in a new working folder.
PERIOD_RUN_KEYS = (dg.AssetKey("survey"), *IMAGERY_ASSET_KEYS)


def imagery_keys(study: str | None) -> tuple[dg.AssetKey, ...]:
    """The study's imagery asset keys (unprefixed for None)."""
    return tuple(k.with_prefix(study) for k in IMAGERY_ASSET_KEYS) if study else IMAGERY_ASSET_KEYS


def period_run_keys(study: str | None) -> tuple[dg.AssetKey, ...]:
    """What a run for a period other than the analysis period selects, under the study's prefix."""
    return tuple(k.with_prefix(study) for k in PERIOD_RUN_KEYS) if study else PERIOD_RUN_KEYS


def imagery_periods(study_path: str | Path) -> tuple[list[str], str]:
    """(the study's imagery periods in study order, its analysis period).

    A study file that does not exist yet (the default demo location before `make demo`) reads as
    the demo's kind, a GeoTIFF study; a file that exists must be a valid study.
    """
    if not Path(study_path).exists():
        return [GEOTIFF_PERIOD], GEOTIFF_PERIOD
    imagery = load_study(study_path).imagery
    return imagery.period_names(), imagery.analysis_period_name()


def consume_analysis_period(assets_def: dg.AssetsDefinition, analysis_period: str,
                            study: str | None = None) -> dg.AssetsDefinition:
    """The same asset(s), with every dependency on one of the study's imagery assets mapped to the analysis period."""
    mapping = dg.SpecificPartitionsPartitionMapping([analysis_period])
    imagery = imagery_keys(study)

    def remap(spec: dg.AssetSpec) -> dg.AssetSpec:
        if not any(dep.asset_key in imagery for dep in spec.deps):
            return spec
        deps = [dg.AssetDep(dep.asset_key, partition_mapping=mapping, metadata=dep.metadata)
                if dep.asset_key in imagery else dep for dep in spec.deps]
        return spec.replace_attributes(deps=deps)

    return assets_def.map_asset_specs(remap)


def period_run_requests(run_key: str, periods: list[str], analysis_period: str,
                        tags: dict[str, str], study: str | None = None) -> list[dg.RunRequest]:
    """One run request per imagery period: the analysis period's for the whole graph (last), every
    other period's for the study's survey, chips and embeddings. Run keys are ``<run_key>:<period>``."""
    others = [p for p in periods if p != analysis_period]
    return [
        *(dg.RunRequest(run_key=f"{run_key}:{p}", partition_key=p, asset_selection=list(period_run_keys(study)),
                        tags={**tags, "eocausal/imagery_period": p}) for p in others),
        dg.RunRequest(run_key=f"{run_key}:{analysis_period}", partition_key=analysis_period,
                      tags={**tags, "eocausal/imagery_period": analysis_period}),
    ]
