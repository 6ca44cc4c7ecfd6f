"""A study with ``imagery.source: earthengine`` through the whole Dagster graph, against the fake client.

The study file is what a user would write; only the environment differs: EOCAUSAL_EE_CLIENT
points the chip stage at the fake (with real credentials and no such variable, the same file
runs against Earth Engine).
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from assets.runner import run_study
from eocausal.imagery.earthengine import RetryPolicy
from tests.assets.conftest import small_study
from tests.imagery import fake_earthengine
from tests.imagery.fake_earthengine import FakeEarthEngine, Faults


@pytest.fixture
def ee_study(tmp_path, monkeypatch):
    study_path = small_study(tmp_path, n_units=160, seed=4)
    doc = yaml.safe_load(study_path.read_text())
    scene = next((study_path.parent / doc["imagery"]["path"]).glob("*.tif"))
    doc["imagery"] = {
        "source": "earthengine",
        "collection": "landsat8_9_sr",
        "periods": [{"name": "2020", "start": "2020-01-01", "end": "2021-01-01"}, 2021],
        "chip_size_px": 32,
        "max_concurrency": 8,
    }
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    # 30 % of calls answer 429: retried with backoff (short delays keep the test fast).
    fake = FakeEarthEngine(scene, faults=Faults(rate_429=0.3), seed=3)
    monkeypatch.setitem(fake_earthengine.SHARED, "client", fake)
    monkeypatch.setenv("EOCAUSAL_EE_CLIENT", "tests.imagery.fake_earthengine:shared_fake")
    monkeypatch.setattr("eocausal.imagery.earthengine.DEFAULT_RETRY", RetryPolicy(initial_delay_s=0.001, max_delay_s=0.01))
    return study_path, fake


def test_chip_asset_materialises_from_earthengine(ee_study, tmp_path):
    """The Dagster chip stage on an Earth Engine study (fast: no dbt); the full graph is the slow test."""
    import dagster as dg

    study_path, fake = ee_study
    result = _chips_of_one_tile(study_path, tmp_path / "w", "2020")

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"chip_usability": True}
    meta = result.asset_materializations_for_node("image_chips")[0].metadata
    assert meta["imagery_provenance"].value["fetch"]["retries"]["http_429"] > 0
    assert meta["n_chips_failed"].value == 0 and fake.calls > meta["n_chips_extracted"].value > 100
    index = pd.read_parquet(tmp_path / "w" / "lake" / "image_chips" / "period=2020" / f"tile={meta['tile'].value}.parquet")
    assert index.loc[index["status"] == "ok", "cloud_share"].between(0, 1).all()
    assert set(index["period"]) == {"2020"} and meta["period"].value == "2020"
    assert not (tmp_path / "w" / "lake" / "image_chips" / "period=2021").exists()


def _chips_of_one_tile(study_path, workdir, period: str):
    """The survey, then `image_chips` for its (one) tile of ``period``: the Dagster chip stage alone."""
    import dagster as dg

    from assets.chips import build_image_chips
    from assets.partitions import tile_partition_key, tile_partitions
    from assets.resources import StudyResource, WarehouseResource
    from assets.survey import survey

    resources = {"study": StudyResource(study_path=str(study_path)), "warehouse": WarehouseResource(root=str(workdir))}
    image_chips = build_image_chips(tile_partitions(["2020", "2021"], None))
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([survey], resources=resources, instance=instance).success  # registers the tiles
        [tile] = instance.get_dynamic_partitions("tiles")
        result = dg.materialize([image_chips], resources=resources, instance=instance, raise_on_error=False,
                                partition_key=tile_partition_key(period, tile),
                                selection=[image_chips.key])
    assert result.success
    return result


@pytest.mark.slow
def test_earthengine_study_runs_end_to_end_and_reruns_from_the_store(ee_study):
    study_path, fake = ee_study

    outcome = run_study(study_path)

    assert outcome.success, outcome.errors + outcome.failed_checks
    assert len(outcome.estimates) == 16
    chips = outcome.metadata["image_chips"]
    survey = pd.read_csv(study_path.parent / "villages.csv")
    assert chips["n_chips_extracted"] + chips["n_chips_failed"] <= len(survey)
    assert chips["n_chips_failed"] == 0 and chips["n_usable"] >= 0.5 * len(survey)
    provenance = chips["imagery_provenance"]
    assert provenance["source"] == "earthengine" and provenance["period"] == "2020"  # the first period
    assert provenance["recipe"]["start"] == "2020-01-01" and provenance["fetch"]["retries"]["http_429"] > 0
    # once per run that opens a period's source (the period's embedder and its one tile), not per chip
    assert fake.initialize_calls == 4 and fake.max_in_flight <= 8
    other = next(v for k, v in outcome.metadata.items() if k.startswith("image_chips[2021|"))
    assert other["imagery_provenance"]["period"] == "2021"  # every period
    index = pd.read_parquet(outcome.workdir / "lake" / "image_chips" / "period=2020.parquet")
    usable = index[index["status"] == "ok"]
    assert usable["cloud_share"].between(0, 1).all() and usable["cloud_share"].max() > 0
    assert usable["source_file"].eq("earthengine:landsat8_9_sr/2020").all()

    calls = fake.calls
    rerun = run_study(study_path)
    assert rerun.success and fake.calls == calls  # nothing stored is fetched again
    assert rerun.metadata["image_chips"]["n_chips_extracted"] == 0


def test_chip_asset_materialises_from_earthengine_batch_exports(ee_study, tmp_path, monkeypatch):
    """imagery.export through the Dagster chip stage: per-block COG tasks, chip keys of the per-chip path."""
    import dagster as dg

    study_path, faulty = ee_study
    fake = FakeEarthEngine(faulty.scene, export_root=tmp_path / "bucket", export_polls=(1, 2))
    monkeypatch.setitem(fake_earthengine.SHARED, "client", fake)

    def materialise(warehouse: str):
        result = _chips_of_one_tile(study_path, tmp_path / warehouse, "2020")
        meta = result.asset_materializations_for_node("image_chips")[0].metadata
        folder = tmp_path / warehouse / "lake" / "image_chips" / "period=2020"
        return meta, pd.read_parquet(folder / f"tile={meta['tile'].value}.parquet")

    per_chip_meta, per_chip = materialise("per_chip")
    doc = yaml.safe_load(study_path.read_text())
    doc["imagery"]["export"] = {"bucket": "eo-bucket", "block_px": 256, "poll_interval_s": 0.001}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    calls = fake.calls
    meta, exported = materialise("export")

    provenance = meta["imagery_provenance"].value
    assert provenance["mode"] == "export" and fake.calls == calls  # no computePixels request
    assert provenance["export"]["tasks_started"] == provenance["export"]["blocks"] == len(fake.tasks) > 1
    cols = ["unit_id", "chip_key", "status", "reason", "valid_share", "source_file", "cloud_share"]
    pd.testing.assert_frame_equal(exported[cols], per_chip[cols])
    assert meta["n_chips_extracted"].value == per_chip_meta["n_chips_extracted"].value > 100
