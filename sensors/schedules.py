"""Schedule `imagery_refresh`: once per period (a calendar month), refresh the study from its imagery.

A refresh re-reads the imagery (chips are cached by the imagery's content, so replaced or added
scenes give new chips and an unchanged folder costs little), retries chips a source failed to
deliver, and carries any change through embeddings, the warehouse and the estimates, which get a
new version only when an input changed. One run per period: the run key is the period.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

IMAGERY_REFRESH_SCHEDULE = "imagery_refresh"


def imagery_period(scheduled_at: datetime) -> str:
    """The period a tick refreshes: the calendar month that ended before it ('YYYY-MM')."""
    last_month = scheduled_at.replace(day=1) - timedelta(days=1)
    return f"{last_month:%Y-%m}"


def build_schedules(study_job) -> list[dg.ScheduleDefinition]:
    @dg.schedule(
        name=IMAGERY_REFRESH_SCHEDULE,
        job=study_job,
        cron_schedule="0 4 1 * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Monthly imagery refresh: new or replaced imagery gives new chips, embeddings and a new estimate version.",
    )
    def imagery_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        period = imagery_period(context.scheduled_execution_time or datetime.now(timezone.utc))
        return dg.RunRequest(
            run_key=f"imagery-refresh:{period}",
            tags={"eocausal/trigger": "imagery_refresh", "eocausal/imagery_period": period},
        )

    return [imagery_refresh]
