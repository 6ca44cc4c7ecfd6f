"""Schedules: a periodic refresh of the study (imagery and estimates are content-cached, so an
unchanged study costs little and adds no estimate rows)."""

from __future__ import annotations

import dagster as dg


def build_schedules(study_job) -> list[dg.ScheduleDefinition]:
    return [
        dg.ScheduleDefinition(
            name="weekly_study_refresh",
            job=study_job,
            cron_schedule="0 3 * * 1",
            execution_timezone="UTC",
            description="Weekly refresh: re-reads the survey and imagery; new inputs give a new estimate version.",
        )
    ]
