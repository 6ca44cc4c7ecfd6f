"""Materialise the whole graph in-process for one study (used by `eocausal run` and `eocausal demo`)."""

from __future__ import annotations

from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.definitions import STUDY_JOB, build_definitions
from eocausal.study import default_workdir, load_study
from eocausal.warehouse import check_sql_safe_path, query


@dataclass
class RunOutcome:
    success: bool
    workdir: Path
    estimates: pd.DataFrame  # the estimate version this run produced (empty on failure)
    errors: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # asset key -> materialisation metadata (plain values)
    log_path: Path | None = None


def _plain(value):
    return getattr(value, "value", value)


def run_study(study_path: str | Path, workdir: str | Path | None = None,
              instance: dg.DagsterInstance | None = None, log_level: str = "WARNING") -> RunOutcome:
    """Run the study job in this process.

    Dagster's console log is kept at `log_level`; dbt's own output, which dagster-dbt echoes to
    stdout, goes to <workdir>/logs/last_run.log so that stdout stays for results (e.g. --json).
    """
    study = load_study(study_path)  # fail fast, with the contract's message, before any Dagster work
    workdir = Path(workdir).resolve() if workdir else default_workdir(study_path)
    check_sql_safe_path(workdir)  # it reaches SQL through dbt's sources: fail before any work
    defs = build_definitions(str(Path(study_path).resolve()), str(workdir))
    job = defs.resolve_job_def(STUDY_JOB)
    log_path = workdir / "logs" / "last_run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    with (dg.DagsterInstance.ephemeral() if instance is None else nullcontext(instance)) as inst, \
            open(log_path, "w", encoding="utf-8") as log, redirect_stdout(log):
        result = job.execute_in_process(instance=inst, raise_on_error=False, run_config=run_config)
    errors, failed_checks, metadata = [], [], {}
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            errors.append(f"{event.step_key}: {_failure_text(event, err)}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            if not ev.passed:
                failed_checks.append(f"{ev.asset_key.to_user_string()}:{ev.check_name}: {ev.description or ''}")
        elif event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            metadata[mat.asset_key.to_user_string()] = {k: _plain(v) for k, v in mat.metadata.items()}
    estimates = pd.DataFrame()
    version = metadata.get("effect_estimates", {}).get("estimate_version")
    published = workdir / "published" / "warehouse.duckdb"
    if result.success and version and published.exists():
        estimates = query(
            published,
            "select * from marts.effect_estimates where study = ? and estimate_version = ?"
            " order by estimand, feature_set, estimator",
            [study.name, version],
        )
    return RunOutcome(bool(result.success), workdir, estimates, errors, failed_checks, metadata, log_path)


def _failure_text(event, err) -> str:
    # dg.Failure carries the user-facing description; other errors carry their message.
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    # Unwrap Dagster's own wrappers only: the user's exception says what went wrong in its words
    # (an ImageryError naming the file), its causes only how (a GDAL read error).
    cause = err
    while getattr(cause, "cause", None) is not None and (cause.cls_name or "").startswith("Dagster"):
        cause = cause.cause
    return (cause.message if cause is not None else err.message).strip()

