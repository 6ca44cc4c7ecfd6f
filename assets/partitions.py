"""Imagery partitions: period x tile for the chips and embeddings, period for the rest of the
imagery, and the runs a refresh is made of.

- `image_chips` and `image_embeddings` are partitioned **period x tile**
  (a MultiPartitionsDefinition: the study's imagery periods, a StaticPartitionsDefinition; its
  tiles, a DynamicPartitionsDefinition ``<safe study>__tiles`` that the survey asset fills with the
  quadkey tiles of its units, eocausal.tiles): one tile's units per run, in the study's tiles job
  (``<safe study>__tiles_job``), so a refresh fans its tiles out to the instance's run launcher.
- `image_embedder` (the embedder, fitted once per period on a seeded sample of the survey's units,
  independent of the tiling) and `image_components` (the period's tiles merged, with the exact PCA
  from their moments) are partitioned by **period**, in the study job with the rest of the graph.
- Everything downstream is unpartitioned and reads the analysis period's `image_components`
  (a SpecificPartitionsPartitionMapping on each dependency, dbt models' included).

A refresh is three waves of runs (:func:`refresh_runs`): per period, the survey and the period's
embedder; per period and tile, the tile's chips and embeddings (side by side, on as many run
workers as the launcher has); per period, the merge, and for the analysis period the rest of the
graph (the whole study job: the survey and embedder again, cached). `eocausal run` runs them
in order in its process (assets/runner.py); the schedule and the survey-wave sensor request the
first wave (the study's refresh job, ``<safe study>__refresh_job``, which a job backfill over the
periods also starts: deploy/slurm/) and the study's refresh sensor the next ones as the previous
succeed (sensors/refresh.py).

In a deployment every study's keys carry its name as prefix ([study, "image_chips"]): the
functions below take the study's name; the constants are the unprefixed stage keys.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

from assets.naming import scoped
from eocausal.study import GEOTIFF_PERIOD, load_study

TILE_ASSET_KEYS = (dg.AssetKey("image_chips"), dg.AssetKey("image_embeddings"))  # period x tile
PERIOD_ASSET_KEYS = (dg.AssetKey("image_embedder"), dg.AssetKey("image_chip_index"),  # period
                     dg.AssetKey("image_components"))
# The first wave of a refresh, per period: the survey (its units and their tiles; cheap, and a run
# must not read a survey that another run of the same refresh is replacing) and the embedder.
PREPARE_KEYS = (dg.AssetKey("survey"), dg.AssetKey("image_embedder"))
# The last wave for a period other than the analysis period.
MERGE_KEYS = (dg.AssetKey("image_chip_index"), dg.AssetKey("image_components"))
TILES_JOB = "tiles_job"  # a study's tiles job: <safe study>__tiles_job
REFRESH_JOB = "refresh_job"  # a refresh's first wave (survey, embedder): <safe study>__refresh_job
PERIOD_DIM, TILE_DIM = "period", "tile"
# The run tag naming the refresh a run belongs to (its run key's stem), for the refresh sensor.
REFRESH_TAG = "eocausal/refresh"
PERIOD_TAG = "eocausal/imagery_period"
WAVE_TAG = "eocausal/wave"  # prepare, tile or merge


def keyed(study: str | None, keys) -> tuple[dg.AssetKey, ...]:
    """Stage keys under the study's prefix (unprefixed for None)."""
    return tuple(k.with_prefix(study) for k in keys) if study else tuple(keys)


def tile_keys(study: str | None) -> tuple[dg.AssetKey, ...]:
    return keyed(study, TILE_ASSET_KEYS)


def tiles_partitions_name(study: str | None) -> str:
    """The name of the study's dynamic tile partitions (``<safe study>__tiles``)."""
    return scoped(study, "tiles") if study else "tiles"


def tile_partitions(periods: list[str], study: str | None) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({
        PERIOD_DIM: dg.StaticPartitionsDefinition(periods),
        TILE_DIM: dg.DynamicPartitionsDefinition(name=tiles_partitions_name(study)),
    })


def by_period() -> dg.MultiToSingleDimensionPartitionMapping:
    """The mapping between a period asset and the period x tile assets of its period (every tile
    of the period upstream of the merge; the period's embedder upstream of each tile)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # beta in Dagster 1.13, and the documented way
        return dg.MultiToSingleDimensionPartitionMapping(PERIOD_DIM)


def tile_partition_key(period: str, tile: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({PERIOD_DIM: period, TILE_DIM: tile})


def partition_parts(partition_key) -> tuple[str, str | None]:
    """(period, tile) of a period or period x tile partition key (or its text, as a run's
    ``dagster/partition`` tag holds it: ``<period>|<tile>``, dimensions in name order)."""
    if isinstance(partition_key, dg.MultiPartitionKey):
        dims = partition_key.keys_by_dimension
        return dims[PERIOD_DIM], dims[TILE_DIM]
    period, _, tile = str(partition_key).partition("|")
    return period, tile or None


def register_tiles(instance: dg.DagsterInstance, study: str | None, tiles) -> list[str]:
    """Add the tiles the instance does not know yet to the study's tile partitions; the new ones."""
    name = tiles_partitions_name(study)
    known = set(instance.get_dynamic_partitions(name))
    new = sorted(set(map(str, tiles)) - known)
    if new:
        instance.add_dynamic_partitions(name, new)
    return new


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
    """The same asset(s), with every dependency on the study's period assets (`image_chip_index`,
    `image_components`) mapped to the analysis period."""
    mapping = dg.SpecificPartitionsPartitionMapping([analysis_period])
    period_keys = keyed(study, PERIOD_ASSET_KEYS)

    def remap(spec: dg.AssetSpec) -> dg.AssetSpec:
        if not any(dep.asset_key in period_keys for dep in spec.deps):
            return spec
        deps = [dg.AssetDep(dep.asset_key, partition_mapping=mapping, metadata=dep.metadata)
                if dep.asset_key in period_keys else dep for dep in spec.deps]
        return spec.replace_attributes(deps=deps)

    return assets_def.map_asset_specs(remap)


def tiles_job_name(study: str) -> str:
    return scoped(study, TILES_JOB)


def refresh_job_name(study: str) -> str:
    return scoped(study, REFRESH_JOB)


def refresh_tags(run_key: str, tags: dict[str, str], period: str, wave: str) -> dict[str, str]:
    return {**tags, REFRESH_TAG: run_key, PERIOD_TAG: period, WAVE_TAG: wave}


def prepare_requests(run_key: str, periods: list[str], tags: dict[str, str]) -> list[dg.RunRequest]:
    """A refresh's first wave: per period, the survey and the period's embedder (the refresh job).
    Run keys ``<run_key>:<period>:prepare``."""
    return [dg.RunRequest(run_key=f"{run_key}:{p}:prepare", partition_key=p,
                          tags=refresh_tags(run_key, tags, p, "prepare"))
            for p in periods]


def tile_requests(run_key: str, period: str, tiles: list[str], tags: dict[str, str], job_name: str,
                  study: str | None = None) -> list[dg.RunRequest]:
    """The second wave for a period: one run per tile, its chips and embeddings (tiles job).
    Run keys ``<run_key>:<period>|<tile>``."""
    return [dg.RunRequest(run_key=f"{run_key}:{period}|{t}", partition_key=tile_partition_key(period, t),
                          job_name=job_name, asset_selection=list(tile_keys(study)),
                          tags=refresh_tags(run_key, tags, period, "tile")) for t in tiles]


def merge_request(run_key: str, period: str, analysis_period: str, tags: dict[str, str], job_name: str,
                  study: str | None = None) -> dg.RunRequest:
    """The last wave for a period: its merge (study job), and for the analysis period the whole
    study job (the survey and the embedder again: cached by content, they cost a file read).
    Run key ``<run_key>:<period>``."""
    selection = None if period == analysis_period else list(keyed(study, MERGE_KEYS))
    return dg.RunRequest(run_key=f"{run_key}:{period}", partition_key=period, job_name=job_name,
                         asset_selection=selection,
                         tags=refresh_tags(run_key, tags, period, "merge"))
