from datetime import datetime, timezone

import dagster as dg

from assets.definitions import STUDY_JOB, defs
from sensors.schedules import IMAGERY_REFRESH_SCHEDULE, imagery_period


def test_period_is_the_month_that_ended():
    assert imagery_period(datetime(2026, 12, 1, 4, tzinfo=timezone.utc)) == "2026-11"
    assert imagery_period(datetime(2027, 1, 1, 4, tzinfo=timezone.utc)) == "2026-12"
    assert imagery_period(datetime(2028, 3, 1, 4, tzinfo=timezone.utc)) == "2028-02"


def test_imagery_refresh_requests_one_run_per_period():
    schedule = defs.resolve_schedule_def(IMAGERY_REFRESH_SCHEDULE)
    assert schedule.job_name == STUDY_JOB
    assert schedule.cron_schedule == "0 4 1 * *"
    tick = datetime(2026, 12, 1, 4, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        request = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
        again = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
    assert request.run_key == "imagery-refresh:2026-11" == again.run_key  # Dagster runs a key once
    assert request.tags == {"eocausal/trigger": "imagery_refresh", "eocausal/imagery_period": "2026-11"}
    # the refresh covers the whole graph: new chips must reach the warehouse and the estimates
    job = defs.resolve_job_def(STUDY_JOB)
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"image_chips", "image_embeddings", "marts/analysis_units", "effect_estimates", "published_warehouse"} <= keys
