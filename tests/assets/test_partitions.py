"""Imagery partitions: a study with two Earth Engine periods, against the fake client.

A new period is its own partitions (its embedder, its tiles, its merge): it fetches that period
only and leaves the other periods' lake files as they were; the unpartitioned rest of the graph
reads the analysis period's merge. Chips and embeddings are partitioned period x tile.
"""

from __future__ import annotations

import threading

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets.embedder import build_image_embedder
from assets.naming import scoped
from assets.partitions import (
    MERGE_KEYS, PREPARE_KEYS, by_period, imagery_periods, keyed, tile_keys, tile_partition_key, tiles_job_name,
)
from assets.resources import StudyResource, WarehouseResource
from assets.studies import build_definitions, study_job_name
from eocausal.imagery.earthengine import RetryPolicy
from eocausal.imagery.sources import open_source
from eocausal.lake import period_path, tile_path
from eocausal.study import GEOTIFF_PERIOD, StudyError, load_study
from tests.assets.conftest import small_study
from tests.imagery import fake_earthengine
from tests.imagery.conftest import no_earth_engine  # noqa: F401  (autouse: nothing reaches Earth Engine)
from tests.imagery.fake_earthengine import FakeEarthEngine

PERIOD_START = {"2019": "2019-01-01", "2021": "2021-01-01"}


class RecordingFake(FakeEarthEngine):
    """The fake client, remembering which period (composite start date) each call asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts: list[str] = []
        self._starts_lock = threading.Lock()

    def compute_pixels(self, recipe, grid):
        with self._starts_lock:
            self.starts.append(recipe.start)
        return super().compute_pixels(recipe, grid)


def _two_period_study(root, monkeypatch, analysis_period: str, n_units: int, chip_size_px: int = 16,
                      max_units_per_tile: int = 20_000):
    study_path = small_study(root, n_units=n_units, seed=4, heterogeneity={"enabled": False})
    doc = yaml.safe_load(study_path.read_text())
    scene = next((study_path.parent / doc["imagery"]["path"]).glob("*.tif"))
    doc["imagery"] = {"source": "earthengine", "collection": "landsat8_9_sr", "periods": [2019, 2021],
                      "analysis_period": analysis_period, "chip_size_px": chip_size_px, "max_concurrency": 4,
                      "max_units_per_tile": max_units_per_tile}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fake = RecordingFake(scene, seed=3)
    monkeypatch.setitem(fake_earthengine.SHARED, "client", fake)
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", "tests.imagery.fake_earthengine:shared_fake")
    monkeypatch.setattr("eocausal.imagery.earthengine.DEFAULT_RETRY",
                        RetryPolicy(initial_delay_s=0.001, max_delay_s=0.01))
    return study_path, fake


def _files(lake, period, tiles):
    return [period_path(lake, "image_chips", period), period_path(lake, "image_embeddings", period),
            period_path(lake, "image_embeddings", period, suffix=".pca.json"),
            *(tile_path(lake, table, period, t) for t in tiles for table in ("image_chips", "image_embeddings"))]


def _period_waves(defs, name, instance, period, lake) -> tuple[list, list[str]]:
    """One period's waves, as a refresh runs them: survey + embedder, each tile, the merge."""
    study_job, tiles_job = defs.resolve_job_def(study_job_name(name)), defs.resolve_job_def(tiles_job_name(name))
    results = [study_job.execute_in_process(instance=instance, partition_key=period,
                                            asset_selection=list(keyed(name, PREPARE_KEYS)))]
    tiles = sorted(set(pd.read_parquet(lake / "survey.parquet")["tile"]))
    results += [tiles_job.execute_in_process(instance=instance, partition_key=tile_partition_key(period, t),
                                             asset_selection=list(tile_keys(name))) for t in tiles]
    results.append(study_job.execute_in_process(instance=instance, partition_key=period,
                                                asset_selection=list(keyed(name, MERGE_KEYS))))
    return results, tiles


def test_a_new_period_is_its_own_partitions_and_leaves_the_others_untouched(tmp_path, monkeypatch):
    study_path, fake = _two_period_study(tmp_path, monkeypatch, analysis_period="2019", n_units=60,
                                         max_units_per_tile=25)
    workdir = tmp_path / "work"
    name = load_study(study_path).name  # the keys' prefix
    defs = build_definitions(str(study_path), str(workdir))
    job = defs.resolve_job_def(study_job_name(name))
    assert set(job.partitions_def.get_partition_keys()) == {"2019", "2021"}
    lake = workdir / "lake"

    with dg.DagsterInstance.ephemeral() as instance:
        first, tiles = _period_waves(defs, name, instance, "2019", lake)
        assert all(r.success for r in first) and len(tiles) >= 3  # 60 units, at most 25 a tile
        # the survey registered its tiles as the tiles job's partitions
        assert sorted(instance.get_dynamic_partitions(f"{name}__tiles")) == tiles
        assert fake.starts and set(fake.starts) == {PERIOD_START["2019"]}
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _files(lake, "2019", tiles)}
        assert not any(p.exists() for p in _files(lake, "2021", tiles))
        calls_for_2019 = len(fake.starts)

        second, _ = _period_waves(defs, name, instance, "2021", lake)
        assert all(r.success for r in second)
        # period 2021 fetched its own composite, and nothing of 2019's
        new_calls = fake.starts[calls_for_2019:]
        assert new_calls and set(new_calls) == {PERIOD_START["2021"]}
        # 2019's files were not rewritten: same bytes, same modification time
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _files(lake, "2019", tiles)} == before
        for key in ("image_chips", "image_embeddings"):
            assert instance.get_materialized_partitions(dg.AssetKey([name, key])) == {
                f"{p}|{t}" for p in ("2019", "2021") for t in tiles}
        for key in ("image_embedder", "image_chip_index", "image_components"):
            assert instance.get_materialized_partitions(dg.AssetKey([name, key])) == {"2019", "2021"}
        second = second[-1]  # the merge

    chips = {p: pd.read_parquet(period_path(lake, "image_chips", p)) for p in ("2019", "2021")}
    assert set(chips["2019"]["period"]) == {"2019"} and set(chips["2021"]["period"]) == {"2021"}
    assert (chips["2021"].loc[chips["2021"]["status"] == "ok", "source_file"] == "earthengine:landsat8_9_sr/2021").all()
    # a chip of one period is never another period's (content-addressed by period, among the rest)
    assert not set(chips["2019"]["chip_key"].dropna()) & set(chips["2021"]["chip_key"].dropna())
    embeddings = pd.read_parquet(period_path(lake, "image_embeddings", "2021"))
    assert set(embeddings["period"]) == {"2021"}
    assert set(embeddings["unit_id"]) == set(chips["2021"].loc[chips["2021"]["status"] == "ok", "unit_id"])
    # each tile's chips are its units', and the merge holds every unit once, in the survey's order
    survey = pd.read_parquet(lake / "survey.parquet")
    for t in tiles:
        part = pd.read_parquet(tile_path(lake, "image_chips", "2021", t))
        assert part["unit_id"].tolist() == survey.loc[survey["tile"] == t, "unit_id"].tolist()
    assert chips["2021"]["unit_id"].tolist() == survey["unit_id"].tolist()
    # the merge's op is <safe study>__image_components; its chip index names its tiles
    meta = {m.asset_key.path[-1]: m.metadata
            for m in second.asset_materializations_for_node(scoped(name, "image_components"))}
    assert meta["image_chip_index"]["n_tiles"].value == len(tiles) and meta["image_components"]["period"].value == "2021"


def test_downstream_assets_consume_the_analysis_period_only(tmp_path, monkeypatch):
    study_path, _ = _two_period_study(tmp_path, monkeypatch, analysis_period="2021", n_units=20)
    assert imagery_periods(study_path) == (["2019", "2021"], "2021")
    graph = build_definitions(str(study_path), str(tmp_path / "work")).resolve_asset_graph()
    name = load_study(study_path).name
    merged = {dg.AssetKey([name, "image_chip_index"]), dg.AssetKey([name, "image_components"])}
    mapped = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        for parent in node.parent_keys & merged:
            if node.partitions_def is None:
                mapped[(key.to_user_string().removeprefix(f"{name}/"), parent.path[-1])] = \
                    graph.get_partition_mapping(key, parent)
    # the dbt staging models (through their sources) and transport (its grid of chips)
    assert set(mapped) == {("staging/stg_image_chips", "image_chip_index"),
                           ("staging/stg_image_embeddings", "image_components"),
                           ("transport_predictions", "image_chip_index"), ("transport_predictions", "image_components")}
    assert all(m == dg.SpecificPartitionsPartitionMapping(["2021"]) for m in mapped.values())
    # the tiles of period P: chips and embeddings by period x tile; the embeddings read their period's
    # embedder, and the merge every tile of its period
    chips, embeddings = (graph.get(dg.AssetKey([name, k])) for k in ("image_chips", "image_embeddings"))
    assert chips.partitions_def == embeddings.partitions_def
    assert isinstance(chips.partitions_def, dg.MultiPartitionsDefinition)
    assert {d.name for d in chips.partitions_def.partitions_defs} == {"period", "tile"}
    every_tile = by_period()
    assert graph.get_partition_mapping(embeddings.key, dg.AssetKey([name, "image_embedder"])) == every_tile
    assert graph.get_partition_mapping(dg.AssetKey([name, "image_components"]), embeddings.key) == every_tile


def test_a_period_the_study_does_not_name_is_a_clear_error(tmp_path, monkeypatch):
    study_path, fake = _two_period_study(tmp_path, monkeypatch, analysis_period="2019", n_units=20)
    study = load_study(study_path)
    with pytest.raises(StudyError, match=r"no imagery period named '2022'.*\['2019', '2021'\]"):
        open_source(study, "2022")
    # Definitions built while the study named a period it has since dropped: the step says so.
    stale = [build_image_embedder(dg.StaticPartitionsDefinition(["2019", "2021", "2022"]))]
    resources = {"study": StudyResource(study_path=str(study_path)),
                 "warehouse": WarehouseResource(root=str(tmp_path / "work"))}
    result = dg.materialize(stale, partition_key="2022", resources=resources, raise_on_error=False)
    assert not result.success and not fake.calls
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no imagery period named '2022'" in str(failure.event_specific_data.error.cause or failure.event_specific_data.error)


def test_a_geotiff_study_has_one_period_and_no_period_settings(tiny_study, tmp_path):
    assert imagery_periods(tiny_study) == ([GEOTIFF_PERIOD], GEOTIFF_PERIOD)
    study = load_study(tiny_study)
    assert open_source(study, GEOTIFF_PERIOD).fingerprint() == open_source(study).fingerprint()
    with pytest.raises(StudyError, match="no imagery period named '2019'"):
        open_source(study, "2019")
    doc = yaml.safe_load(tiny_study.read_text())
    doc["imagery"]["periods"] = [2019]
    bad = tiny_study.parent / "with_periods.yaml"
    try:
        bad.write_text(yaml.safe_dump(doc, sort_keys=False))
        with pytest.raises(StudyError, match="imagery.periods apply to sources 'earthengine' and 'stac' only"):
            load_study(bad)
    finally:
        bad.unlink(missing_ok=True)
    # a study file not written yet (the default demo location) reads as the demo's kind
    assert imagery_periods(tmp_path / "missing" / "study.yaml") == ([GEOTIFF_PERIOD], GEOTIFF_PERIOD)


@pytest.mark.slow
def test_the_analysis_reads_the_analysis_period(tmp_path, monkeypatch):
    """The whole graph in one call: every period's imagery, then the analysis on the analysis period's."""
    from assets.runner import run_study
    from eocausal.warehouse import query

    study_path, fake = _two_period_study(tmp_path, monkeypatch, analysis_period="2021", n_units=160,
                                         chip_size_px=32)
    outcome = run_study(study_path)

    assert outcome.success, outcome.errors + outcome.failed_checks
    assert set(fake.starts) == {"2019-01-01", "2021-01-01"}
    assert outcome.metadata["image_chips"]["period"] == "2021" == outcome.metadata["image_components[2021]"]["period"]
    assert outcome.metadata["image_components[2019]"]["period"] == "2019"
    [tile] = set(pd.read_parquet(outcome.workdir / "lake" / "survey.parquet")["tile"])
    assert outcome.metadata[f"image_embeddings[2019|{tile}]"]["period"] == "2019"
    warehouse = outcome.workdir / "warehouse.duckdb"
    chips = query(warehouse, "select period, cloud_share from staging.stg_image_chips")
    assert set(chips["period"]) == {"2021"}
    assert chips["cloud_share"].dropna().between(0, 1).all() and chips["cloud_share"].notna().any()
    assert set(query(warehouse, "select distinct period from staging.stg_image_embeddings")["period"]) == {"2021"}
    lake_2021 = pd.read_parquet(period_path(outcome.workdir / "lake", "image_embeddings", "2021"))
    assert set(outcome.estimates["embeddings_version"]) == {lake_2021["embedding_version"].iloc[0]}
    n_usable = query(warehouse, "select count(*) as n from marts.analysis_units")["n"].iloc[0]
    assert n_usable == len(lake_2021)

    # Re-running fetches nothing for any period (the chip store), and rewrites no other period.
    calls = len(fake.starts)
    again = run_study(study_path)
    assert again.success and len(fake.starts) == calls
    assert set(again.estimates["estimate_version"]) == set(outcome.estimates["estimate_version"])
