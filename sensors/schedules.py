"""Schedule `imagery_refresh`: once a month, refresh the study from its imagery, period by period.

A refresh re-reads the imagery (chips are cached by the imagery's content, so replaced or added
scenes give new chips and an unchanged folder costs little), retries chips a source failed to
deliver, and carries any change through embeddings, the warehouse and the estimates, which get a
new version only when an input changed. Each tick requests a refresh's first wave: one run per
imagery period, of the survey and the period's embedder (assets/partitions.py); the study's
refresh sensor (sensors/refresh.py) requests the tiles' runs and the merges as they become due.
Run keys carry the month and the period, so a month's tick runs each period once.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg

from assets.naming import scoped
from assets.partitions import prepare_requests

IMAGERY_REFRESH_SCHEDULE = "imagery_refresh"


def refresh_month(scheduled_at: datetime) -> str:
    """The month a tick refreshes: the calendar month that ended before it ('YYYY-MM')."""
    last_month = scheduled_at.replace(day=1) - timedelta(days=1)
    return f"{last_month:%Y-%m}"


def build_schedules(refresh_job, periods: list[str],
                    study: str | None = None) -> list[dg.ScheduleDefinition]:
    """The study's schedule, named <safe study>__imagery_refresh (assets.naming.scoped)."""

    @dg.schedule(
        name=scoped(study, IMAGERY_REFRESH_SCHEDULE),
        job=refresh_job,
        cron_schedule="0 4 1 * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Monthly imagery refresh of every imagery period: new or replaced imagery gives new chips, "
                    "embeddings and (for the analysis period) a new estimate version.",
    )
    def imagery_refresh(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        month = refresh_month(context.scheduled_execution_time or datetime.now(timezone.utc))
        return prepare_requests(
            f"imagery-refresh:{month}", periods,
            tags={"eocausal/trigger": "imagery_refresh", "eocausal/refresh_month": month},
        )

    return [imagery_refresh]
