from datetime import datetime, timezone

import dagster as dg
import yaml

from assets.definitions import defs
from assets.naming import scoped
from assets.studies import build_definitions, study_job_name
from eocausal.study import load_study
from sensors.schedules import IMAGERY_REFRESH_SCHEDULE, refresh_month

DEMO = "eocausal_demo"  # the demo deployment's first study (assets/defs/eocausal_demo/defs.yaml)


def test_refresh_month_is_the_month_that_ended():
    assert refresh_month(datetime(2026, 12, 1, 4, tzinfo=timezone.utc)) == "2026-11"
    assert refresh_month(datetime(2027, 1, 1, 4, tzinfo=timezone.utc)) == "2026-12"
    assert refresh_month(datetime(2028, 3, 1, 4, tzinfo=timezone.utc)) == "2028-02"


def _ticks(definitions, tick, study=DEMO):
    schedule = definitions.resolve_schedule_def(scoped(study, IMAGERY_REFRESH_SCHEDULE))
    with dg.instance_for_test() as instance:
        first = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
        again = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
    return schedule, list(first), list(again)


def test_imagery_refresh_requests_one_run_per_month_and_imagery_period():
    tick = datetime(2026, 12, 1, 4, tzinfo=timezone.utc)
    deployment = defs()
    schedule, [request], [again] = _ticks(deployment, tick)  # the demo (GeoTIFF) study: one period
    assert schedule.job_name == "eocausal_demo__refresh_job"  # a refresh's first wave
    assert schedule.cron_schedule == "0 4 1 * *"
    assert request.run_key == "imagery-refresh:2026-11:geotiff:prepare" == again.run_key  # Dagster runs a key once
    # the refresh's first wave: the survey and the period's embedder (the refresh sensor does the rest)
    assert request.partition_key == "geotiff" and request.asset_selection is None
    refresh_job = deployment.resolve_job_def(schedule.job_name)
    assert refresh_job.asset_layer.executable_asset_keys == {dg.AssetKey([DEMO, "survey"]),
                                                             dg.AssetKey([DEMO, "image_embedder"])}
    assert request.tags == {"eocausal/trigger": "imagery_refresh", "eocausal/refresh_month": "2026-11",
                            "eocausal/imagery_period": "geotiff", "eocausal/refresh": "imagery-refresh:2026-11",
                            "eocausal/wave": "prepare"}
    # the study job holds the period's merge and the rest of the graph, the tiles job the tiles'
    job = deployment.resolve_job_def(study_job_name(DEMO))
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {f"{DEMO}/{k}" for k in ("image_embedder", "image_components", "marts/analysis_units", "effect_estimates",
                                    "published_warehouse")} <= keys
    assert not {f"{DEMO}/image_chips", f"{DEMO}/image_embeddings"} & keys
    # ... and that study's graph only: the deployment's other study has its own job and schedule
    assert all(k.startswith(f"{DEMO}/") for k in keys)
    _, [other], _ = _ticks(deployment, tick, study="eocausal_demo_seed7")
    assert other.run_key == request.run_key  # run keys are per schedule, and each study has its own


def test_imagery_refresh_of_an_earthengine_study_refreshes_every_period(tiny_study, tmp_path):
    doc = yaml.safe_load(tiny_study.read_text())
    doc["imagery"] = {"source": "earthengine", "periods": [2019, 2020, 2021], "analysis_period": "2020",
                      "chip_size_px": 32}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / doc["survey"]["path"]).write_bytes((tiny_study.parent / doc["survey"]["path"]).read_bytes())
    definitions = build_definitions(str(study), str(tmp_path / "work"))
    name = load_study(study).name

    _, requests, again = _ticks(definitions, datetime(2027, 2, 1, 4, tzinfo=timezone.utc), study=name)
    assert [r.partition_key for r in requests] == ["2019", "2020", "2021"]
    assert [r.run_key for r in requests] == [r.run_key for r in again] == [
        "imagery-refresh:2027-01:2019:prepare", "imagery-refresh:2027-01:2020:prepare",
        "imagery-refresh:2027-01:2021:prepare"]
    assert [r.asset_selection for r in requests] == [None] * 3  # the refresh job: survey and embedder
    assert {r.tags["eocausal/imagery_period"] for r in requests} == {"2019", "2020", "2021"}
    # every request names a partition of the refresh job
    job = definitions.resolve_job_def(f"{name}__refresh_job")
    assert set(job.partitions_def.get_partition_keys()) == {"2019", "2020", "2021"}
