"""Sensor `run_failure_alerts`: every failed run of the study's jobs (study job, tiles job) leaves an alert record.

Thin wiring over eocausal.alerts: the record (one JSON file per run, under <workdir>/alerts/)
names the run, what triggered it (its eocausal/* and schedule/sensor tags) and each failed
step with its message, with credentials redacted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from assets.naming import scoped
from eocausal.alerts import ALERTS_FOLDER, FailedStep, RunFailureAlert, write_alert

RUN_FAILURE_SENSOR = "run_failure_alerts"
_TRIGGER_TAGS = ("dagster/schedule_name", "dagster/sensor_name", "dagster/backfill")


def _step_message(event: dg.DagsterEvent) -> str:
    # A dg.Failure carries its user-facing description; other errors their own message, below
    # Dagster's wrappers (not their causes': "ImageryError: scene.tif is corrupt", not a GDAL code).
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    error = getattr(data, "error", None)
    while error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    return error.message.strip() if error is not None else (event.message or "")


def build_run_failure_sensor(jobs, workdir: str, study: str | None = None) -> dg.SensorDefinition:
    """The study's sensor over its jobs, named <safe study>__run_failure_alerts (assets.naming.scoped)."""
    jobs = jobs if isinstance(jobs, list) else [jobs]
    alerts = Path(workdir) / ALERTS_FOLDER

    @dg.run_failure_sensor(
        name=scoped(study, RUN_FAILURE_SENSOR),
        monitored_jobs=jobs,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Writes an alert record for each failed run of {', '.join(j.name for j in jobs)} to {alerts}.",
    )
    def run_failure_alerts(context: dg.RunFailureSensorContext) -> None:
        run = context.dagster_run
        alert = RunFailureAlert(
            run_id=run.run_id,
            job=run.job_name,
            failed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            message=context.failure_event.message or "run failed",
            failed_steps=[FailedStep(e.step_key or "?", _step_message(e)) for e in context.get_step_failure_events()],
            tags={k: v for k, v in run.tags.items() if k.startswith("eocausal/") or k in _TRIGGER_TAGS},
        )
        path = write_alert(alerts, alert)
        context.log.info(f"alert record written: {path}")

    return run_failure_alerts
