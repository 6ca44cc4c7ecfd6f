"""Materialise the whole graph in-process for one study (used by `eocausal run` and `eocausal demo`)."""

from __future__ import annotations

import gc
import re
import signal
import threading
import traceback
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.instance import dagster_home, open_instance
from assets.naming import unprefixed, unscoped
from assets.partitions import PERIOD_RUN_KEYS, period_run_keys
from assets.studies import build_definitions, study_job_name
from eocausal import failures
from eocausal.layout import Layout
from eocausal.study import default_workdir, load_study
from eocausal.warehouse import check_sql_safe_path, query
from eocausal.workdir import WorkdirBusy, WorkdirUnusable, disk_problem, exclusive_workdir


@dataclass
class RunOutcome:
    success: bool
    workdir: Path
    estimates: pd.DataFrame  # the estimate version this run produced (empty on failure)
    errors: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    # asset key -> materialisation metadata (plain values), keyed by the stage's key without the
    # study's prefix ("survey", "marts/analysis_units"). The imagery assets' entry is their
    # analysis-period partition's; "image_chips[<period>]" etc. hold every period's.
    metadata: dict = field(default_factory=dict)
    log_path: Path | None = None
    # eocausal.failures: 0 success, 1 failed, 2 input rejected, 3 working folder unusable, 4 busy,
    # 5 Earth Engine access refused
    exit_code: int = failures.EXIT_OK
    traces: list[str] = field(default_factory=list)  # the failures' full traces, for the failure log
    dagster_home: Path | None = None  # the persistent Dagster instance the runs are recorded in


def _plain(value):
    return getattr(value, "value", value)


def run_study(study_path: str | Path, workdir: str | Path | None = None,
              instance: dg.DagsterInstance | None = None, log_level: str = "WARNING",
              inputs_only: bool = False) -> RunOutcome:
    """Run the study job in this process: every imagery period, then the analysis.

    One run per imagery period other than the analysis period materialises the survey and that
    period's `image_chips` and `image_embeddings` partitions (cached by content: an unchanged
    period costs little); then one run of the whole graph for the analysis period. Success means every run
    succeeded. dbt's own output, which dagster-dbt echoes to stdout, goes to
    <workdir>/logs/last_run.log so that stdout stays for results (e.g. --json); so does Dagster's
    console log (with the stack traces of failed steps) unless `log_level` is DEBUG or INFO, when it
    is shown at that level. The outcome's `errors` and `failed_checks` say what failed in a line
    each, `exit_code` what kind of failure it was (eocausal.failures), `traces` the full traces.

    `inputs_only`: materialise the survey, chips and embeddings (with their blocking checks) for
    every period and stop there — every input is checked, nothing is estimated or published.
    """
    study = load_study(study_path)  # fail fast, with the contract's message, before any Dagster work
    workdir = Path(workdir).resolve() if workdir else default_workdir(study_path)
    check_sql_safe_path(workdir)  # it reaches SQL through dbt's sources: fail before any work
    try:
        with exclusive_workdir(workdir):
            return _run_locked(study, study_path, workdir, instance, log_level, inputs_only)
    except WorkdirBusy as exc:
        return RunOutcome(False, workdir, pd.DataFrame(), errors=[str(exc)], exit_code=failures.EXIT_BUSY,
                          traces=["".join(traceback.format_exception(exc))])
    except WorkdirUnusable as exc:
        return RunOutcome(False, workdir, pd.DataFrame(), errors=[str(exc)], exit_code=failures.EXIT_WORKDIR,
                          traces=["".join(traceback.format_exception(exc))])
    except Exception as exc:  # outside any step (the run log, the instance's SQLite) on a full or read-only disk
        problem = disk_problem(workdir, exc)
        if problem is None:
            raise
        return RunOutcome(False, workdir, pd.DataFrame(), errors=[problem], exit_code=failures.EXIT_WORKDIR,
                          traces=["".join(traceback.format_exception(exc))])


@contextmanager
def keeping_sigterm():
    """Restore SIGTERM's disposition afterwards: Dagster's in-process execution maps SIGTERM to
    SIGINT's handler, which is "ignore" in a background job (``nohup eocausal run ... &``); left so,
    ``kill`` would no longer stop the process, nor anything it starts afterwards."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _run_locked(study, study_path, workdir: Path, instance, log_level: str, inputs_only: bool = False) -> RunOutcome:
    # The study's own definitions, with the keys (under the study's name) and job name it has in a
    # deployment: its runs show in the UI under the same assets when the deployment holds it.
    defs = build_definitions(str(Path(study_path).resolve()), str(workdir))
    job = defs.resolve_job_def(study_job_name(study.name))
    selection = list(period_run_keys(study.name))
    log_path = Layout(workdir).logs / "last_run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    analysis_period = study.imagery.analysis_period_name()
    other_periods = [p for p in study.imagery.period_names() if p != analysis_period]
    with ExitStack() as stack:
        # Every run on the record: the persistent instance ($DAGSTER_HOME, else <workdir>/dagster_home)
        # keeps the runs, materialisations, checks and lineage for `dagster dev` and the asset catalog.
        home = dagster_home(workdir) if instance is None else None
        inst = stack.enter_context(open_instance(home) if home is not None else nullcontext(instance))
        stack.enter_context(keeping_sigterm())
        log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
        stack.enter_context(redirect_stdout(log))
        if log_level.upper() not in ("DEBUG", "INFO"):
            # Dagster's console log prints a failed step's whole stack trace: into the run log with
            # it; the terminal gets the one-line reasons below (progress and the library's log
            # handler hold the terminal's stream, not sys.stderr, and still show).
            stack.enter_context(redirect_stderr(log))
        runs = [
            (period, job.execute_in_process(instance=inst, raise_on_error=False, run_config=run_config,
                                            partition_key=period, asset_selection=selection))
            for period in other_periods
        ]
        result = job.execute_in_process(instance=inst, raise_on_error=False, run_config=run_config,
                                        partition_key=analysis_period,
                                        asset_selection=selection if inputs_only else None)
        runs.append((analysis_period, result))
        # Finalise what the runs left (a failed dbt invocation's output generator) while stderr is
        # still the run log: Python reports an error in a finaliser there, not on the terminal.
        gc.collect()
    errors, failed_checks, metadata, codes, traces = [], [], {}, [], []
    imagery_steps = {key.to_user_string() for key in PERIOD_RUN_KEYS} - {"survey"}
    for period, event in ((period, e) for period, r in runs for e in r.all_events):
        # Another period's imagery failures name the period; the rest read as they always have
        # (a survey failure, the same in every period's run, is reported once).
        where = "" if period == analysis_period else f"[{period}]"
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            name = unscoped(study.name, event.step_key)  # <safe study>__image_chips -> image_chips
            step = name + (where if name in imagery_steps else "")
            text = _failure_text(event, err)
            problem = disk_problem(workdir, text)
            traces.append(f"step {step}:\n{err.to_string()}")
            if "DagsterAssetCheckFailedError" in _error_names(err):
                continue  # a blocking check failed: its evaluation (below) says which and why
            codes.append(failures.EXIT_WORKDIR if problem else failures.code_for_names(_error_names(err)))
            errors.append(f"{step}: {problem or text}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            ev = event.event_specific_data
            stage = unprefixed(study.name, ev.asset_key).to_user_string()
            asset = stage + (where if stage in imagery_steps else "")
            if not ev.passed:
                failed_checks.append(f"{asset}:{ev.check_name}: {ev.description or ''}")
                codes.append(failures.EXIT_INPUT if stage in failures.INPUT_ASSETS else failures.EXIT_FAILED)
        elif event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            key = unprefixed(study.name, mat.asset_key).to_user_string()
            plain = {k: _plain(v) for k, v in mat.metadata.items()}
            if mat.partition is not None:
                metadata[f"{key}[{mat.partition}]"] = plain
            if mat.partition in (None, analysis_period):
                metadata[key] = plain
    estimates = pd.DataFrame()
    version = metadata.get("effect_estimates", {}).get("estimate_version")
    published = Layout(workdir).published
    if result.success and version and published.exists():
        estimates = query(
            published,
            "select * from marts.effect_estimates where study = ? and estimate_version = ?"
            " order by estimand, feature_set, estimator",
            [study.name, version],
        )
    success = all(r.success for _, r in runs)
    errors, failed_checks = list(dict.fromkeys(errors)), list(dict.fromkeys(failed_checks))
    if not success and not errors and not failed_checks:
        errors = ["the run failed without a step failure or a failed check: see the run log"]
    code = failures.EXIT_OK if success else failures.worst(codes) or failures.EXIT_FAILED
    if traces:
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write("\n== failed steps ==\n" + "\n".join(traces) + "\n")
        except OSError:  # a full disk: the failure log (eocausal.failures) still gets them
            pass
    return RunOutcome(bool(success), workdir, estimates, errors, failed_checks, metadata, log_path,
                      exit_code=code, traces=list(dict.fromkeys(traces)), dagster_home=home)


def _error_names(err) -> list[str]:
    """The class names along a serialised error's causes and contexts."""
    names, stack = [], [err]
    while stack:
        e = stack.pop()
        if e is None:
            continue
        names.append(e.cls_name or "")
        stack += [getattr(e, "cause", None), getattr(e, "context", None)]
    return names


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
    cause = cause if cause is not None else err
    # The message, without the exception's dotted class name in front (the message is the reason).
    return re.sub(rf"^([\w.]+\.)?{re.escape(cause.cls_name or '')}: ", "", cause.message.strip())

