"""The run-failure sensor, invoked with Dagster's run-status sensor context on a real failed run."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from eocausal.alerts import RunFailureAlert, read_alerts, write_alert
from eocausal.credentials import REDACTED, redact
from sensors.run_failures import RUN_FAILURE_SENSOR

FAKE_KEY = "fake-ee-key-7f3a9c21d4e8b6a0"


@pytest.fixture
def failed_run(defs_for, names, study_dir, survey, monkeypatch):
    """The study job run on a survey whose duplicated id is, by bad luck, a credential's value."""
    monkeypatch.setenv("EOCAUSAL_EE_KEY", FAKE_KEY)
    bad = survey.copy()
    bad.loc[[2, 9], "village_code"] = FAKE_KEY
    bad.to_csv(study_dir / "villages.csv", index=False)
    instance = dg.DagsterInstance.ephemeral()
    job = defs_for.resolve_job_def(names.job)
    # The analysis period's run, as the survey-wave sensor requests it (a GeoTIFF study: "geotiff").
    result = job.execute_in_process(instance=instance, raise_on_error=False, partition_key="geotiff",
                                    tags={"eocausal/trigger": "survey_wave"})
    assert not result.success
    failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed == ["survey"], failed  # the survey suite stopped it, for the duplicated id
    return instance, result


def test_failed_run_leaves_one_alert_record(defs_for, names, study_dir, failed_run):
    instance, result = failed_run
    sensor = defs_for.resolve_sensor_def(names(RUN_FAILURE_SENSOR))
    context = dg.build_run_status_sensor_context(
        sensor_name=names(RUN_FAILURE_SENSOR),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
    ).for_run_failure()
    sensor(context)
    sensor(context)  # re-evaluating the same failure rewrites its record

    alerts = study_dir / "eocausal_work" / "alerts"
    [record] = read_alerts(alerts)
    assert len(list(alerts.iterdir())) == 1
    assert record["run_id"] == result.run_id and record["job"] == names.job
    # what triggered it, and the study (its job's tag); the working-folder holder's tags may follow
    assert {"eocausal/trigger": "survey_wave", "eocausal/study": names.study}.items() <= record["tags"].items()
    [step] = record["failed_steps"]
    assert step["step"] == "survey"
    assert "rule 'unique unit_id' failed" in step["message"] and "rows 2, 9" in step["message"]
    # the credential that leaked into the message (as a unit id) is not in the record
    text = (alerts / f"run_failure_{result.run_id}.json").read_text()
    assert FAKE_KEY not in text and REDACTED in text


def test_sensor_runs_by_default(defs_for, names):
    sensor = defs_for.resolve_sensor_def(names(RUN_FAILURE_SENSOR))
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert isinstance(sensor, dg.RunStatusSensorDefinition)


def test_redact_covers_credential_variables_and_secret_names():
    env = {"EOCAUSAL_EE_KEY": "abcdefgh1234", "MY_API_TOKEN": "tok-123456789", "PATH": "/usr/bin:/bin",
           "GOOGLE_APPLICATION_CREDENTIALS": "/secure/key.json", "SHORT_KEY": "1"}
    text = "key abcdefgh1234 token tok-123456789 file /secure/key.json path /usr/bin:/bin 1"
    assert redact(text, env) == f"key {REDACTED} token {REDACTED} file {REDACTED} path /usr/bin:/bin 1"


def test_alert_messages_are_bounded(tmp_path):
    alert = RunFailureAlert(run_id="r-1", job="j", failed_at="2026-01-01T00:00:00+00:00", message="x" * 10_000)
    record = json.loads(write_alert(tmp_path, alert).read_text())
    assert len(record["message"]) < 4100 and record["message"].endswith("[truncated]")
