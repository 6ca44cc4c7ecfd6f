from datetime import datetime, timezone

import dagster as dg
import yaml

from assets.definitions import STUDY_JOB, build_definitions, defs
from sensors.schedules import IMAGERY_REFRESH_SCHEDULE, refresh_month


def test_refresh_month_is_the_month_that_ended():
    assert refresh_month(datetime(2026, 12, 1, 4, tzinfo=timezone.utc)) == "2026-11"
    assert refresh_month(datetime(2027, 1, 1, 4, tzinfo=timezone.utc)) == "2026-12"
    assert refresh_month(datetime(2028, 3, 1, 4, tzinfo=timezone.utc)) == "2028-02"


def _ticks(definitions, tick):
    schedule = definitions.resolve_schedule_def(IMAGERY_REFRESH_SCHEDULE)
    with dg.instance_for_test() as instance:
        first = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
        again = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
    return schedule, list(first), list(again)


def test_imagery_refresh_requests_one_run_per_month_and_imagery_period():
    tick = datetime(2026, 12, 1, 4, tzinfo=timezone.utc)
    schedule, [request], [again] = _ticks(defs, tick)  # the default (GeoTIFF) study: one period
    assert schedule.job_name == STUDY_JOB
    assert schedule.cron_schedule == "0 4 1 * *"
    assert request.run_key == "imagery-refresh:2026-11:geotiff" == again.run_key  # Dagster runs a key once
    assert request.partition_key == "geotiff" and request.asset_selection is None  # the whole graph
    assert request.tags == {"eocausal/trigger": "imagery_refresh", "eocausal/refresh_month": "2026-11",
                            "eocausal/imagery_period": "geotiff"}
    # the refresh covers the whole graph: new chips must reach the warehouse and the estimates
    job = defs.resolve_job_def(STUDY_JOB)
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"image_chips", "image_embeddings", "marts/analysis_units", "effect_estimates", "published_warehouse"} <= keys


def test_imagery_refresh_of_an_earthengine_study_refreshes_every_period(tiny_study, tmp_path):
    doc = yaml.safe_load(tiny_study.read_text())
    doc["imagery"] = {"source": "earthengine", "periods": [2019, 2020, 2021], "analysis_period": "2020",
                      "chip_size_px": 32}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / doc["survey"]["path"]).write_bytes((tiny_study.parent / doc["survey"]["path"]).read_bytes())
    definitions = build_definitions(str(study), str(tmp_path / "work"))

    _, requests, again = _ticks(definitions, datetime(2027, 2, 1, 4, tzinfo=timezone.utc))
    assert [r.partition_key for r in requests] == ["2019", "2021", "2020"]  # the analysis period last
    assert [r.run_key for r in requests] == [r.run_key for r in again] == [
        "imagery-refresh:2027-01:2019", "imagery-refresh:2027-01:2021", "imagery-refresh:2027-01:2020"]
    imagery = [dg.AssetKey("survey"), dg.AssetKey("image_chips"), dg.AssetKey("image_embeddings")]
    assert [r.asset_selection for r in requests] == [imagery, imagery, None]  # the analysis period: everything
    assert {r.tags["eocausal/imagery_period"] for r in requests} == {"2019", "2020", "2021"}
    # every request names a partition of the study job
    job = definitions.resolve_job_def(STUDY_JOB)
    assert set(job.partitions_def.get_partition_keys()) == {"2019", "2020", "2021"}
