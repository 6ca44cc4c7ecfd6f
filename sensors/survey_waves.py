"""Sensor `survey_wave_sensor`: new survey waves in the study's landing folder trigger a refresh.

Thin wiring over eocausal.waves. The cursor maps each accepted wave still in the folder to its
stamp (mtime:size), so a file is handled once, and a wave rewritten in place counts as new.
Every tick: a bad file goes to landing/quarantine/ with its validation report; of the good
files, the newest becomes the study's survey and one refresh is requested for it: its first
wave, a run of the survey and embedder of every imagery period (new units need chips in every
period); the study's refresh sensor (sensors/refresh.py) requests its tiles' runs and merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from assets.naming import scoped
from assets.partitions import prepare_requests
from eocausal.study import load_study
from eocausal.waves import check_wave, file_stamp, install_wave, landing_folder, new_waves, quarantine_wave

SURVEY_WAVE_SENSOR = "survey_wave_sensor"


def build_survey_wave_sensor(refresh_job, study_path: str, landing: str | None = None,
                             study: str | None = None) -> dg.SensorDefinition:
    """The study's sensor, named <safe study>__survey_wave_sensor (assets.naming.scoped)."""

    @dg.sensor(
        name=scoped(study, SURVEY_WAVE_SENSOR),
        job=refresh_job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Watches the study's landing/ folder for survey waves: validates each new file with the "
            "survey suite, quarantines bad files with their report, installs the newest good one as "
            "the study's survey and requests a refresh."
        ),
    )
    def survey_wave_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        study = load_study(study_path)
        folder = Path(landing) if landing else landing_folder(study)
        handled: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        waves = new_waves(folder, handled)
        stamps = {p.name: file_stamp(p) for p in waves}
        checks = [check_wave(p, study) for p in waves]

        for check in checks:
            if not check.accepted:
                report = quarantine_wave(check, folder)
                context.log.warning(f"survey wave quarantined; report {report}:\n{check.message}")

        accepted = [c for c in checks if c.accepted]
        run_requests = []
        if accepted:
            newest = accepted[-1]
            for older in accepted[:-1]:
                context.log.info(f"{older.path.name} is superseded by {newest.path.name}, which landed later")
            install_wave(newest, study)
            context.log.info(newest.message)
            name, stamp = newest.path.name, stamps[newest.path.name]
            run_requests += prepare_requests(
                f"survey-wave:{name}:{stamp}", study.imagery.period_names(),
                tags={
                    "eocausal/trigger": "survey_wave",
                    "eocausal/survey_wave": name,
                    "eocausal/survey_wave_sha256": newest.sha256[:16],
                },
            )

        # Remember accepted waves that are still in the folder (quarantined ones have left it).
        cursor = {n: s for n, s in handled.items() if (folder / n).exists()}
        cursor.update({c.path.name: stamps[c.path.name] for c in accepted})
        cursor_text = json.dumps(cursor, sort_keys=True)
        if not run_requests:
            skip = f"no new valid survey wave in {folder}" + (f" ({len(checks)} quarantined)" if checks else "")
            return dg.SensorResult(skip_reason=skip, cursor=cursor_text)
        return dg.SensorResult(run_requests=run_requests, cursor=cursor_text)

    return survey_wave_sensor
