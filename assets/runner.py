"""Materialise the whole graph in-process for one study (used by `eocausal run` and `eocausal demo`)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import signal
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.instance import dagster_home, open_instance
from assets.naming import unprefixed, unscoped
from assets.partitions import (
    MERGE_KEYS,
    PERIOD_ASSET_KEYS,
    TILE_ASSET_KEYS,
    keyed,
    refresh_job_name,
    tile_keys,
    tile_partition_key,
    tiles_job_name,
)
from assets.studies import build_definitions, study_job_name
from eocausal import failures
from eocausal.layout import Layout
from eocausal.study import default_workdir, load_study
from eocausal.warehouse import check_sql_safe_path, query
from eocausal.workdir import HELD_BY_PARENT_ENV, WorkdirBusy, WorkdirUnusable, disk_problem, exclusive_workdir


@dataclass
class RunOutcome:
    success: bool
    workdir: Path
    estimates: pd.DataFrame  # the estimate version this run produced (empty on failure)
    errors: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    # asset key -> materialisation metadata (plain values), keyed by the stage's key without the
    # study's prefix ("survey", "marts/analysis_units"). The imagery assets' entry is their
    # analysis-period partition's (the tile stages': the period's tiles added up, runner.tiles_summary);
    # "image_components[<period>]", "image_chips[<period>|<tile>]" etc. hold every partition's.
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
    """Run the study's jobs in this process: the waves of a refresh (assets/partitions.py).

    Per imagery period, a run of the survey and the period's embedder; per period and tile, a run
    of the tile's chips and embeddings (the tiles job); per period, a run of its merge
    (`image_components`), the analysis period's with the rest of the graph. Everything is cached by
    content, so an unchanged period or tile costs little. Success means every run succeeded.
    dbt's own output, which dagster-dbt echoes to stdout, goes to
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
        local_tile_workers(1)  # a malformed EOCAUSAL_TILE_WORKERS: said before any work
    except ValueError as exc:
        return RunOutcome(False, workdir, pd.DataFrame(), errors=[str(exc)], exit_code=failures.EXIT_FAILED)
    try:
        with exclusive_workdir(workdir, role="all"):  # it runs every kind of run of the study
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
    # The study's own definitions, with the keys (under the study's name) and job names it has in a
    # deployment: its runs show in the UI under the same assets when the deployment holds it.
    defs = build_definitions(str(Path(study_path).resolve()), str(workdir))
    study_job = defs.resolve_job_def(study_job_name(study.name))
    tiles_job = defs.resolve_job_def(tiles_job_name(study.name))
    refresh_job = defs.resolve_job_def(refresh_job_name(study.name))
    log_path = Layout(workdir).logs / "last_run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    periods = study.imagery.period_names()
    analysis_period = study.imagery.analysis_period_name()
    runs: list[tuple[str, str | None, object]] = []  # (period, tile, result)
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

        def execute(job, period: str, tile: str | None, partition_key, selection) -> bool:
            result = job.execute_in_process(instance=inst, raise_on_error=False, run_config=run_config,
                                            partition_key=partition_key,
                                            asset_selection=list(selection) if selection is not None else None)
            runs.append((period, tile, result))
            return result.success

        # The waves of a refresh (assets/partitions.py), in order: each period's survey and
        # embedder; each period's tiles (chips and embeddings); each period's merge, the analysis
        # period's last with the rest of the graph (unless only the inputs are asked for).
        ordered = [p for p in periods if p != analysis_period] + [analysis_period]  # the analysis last
        prepared = [p for p in ordered if execute(refresh_job, p, None, p, None)]
        tiles = []
        if prepared:
            survey = pd.read_parquet(Layout(workdir).lake / "survey.parquet", columns=["tile"])
            tiles = sorted(set(survey["tile"].astype(str)))
        workers = local_tile_workers(len(tiles)) if home is not None else 1
        for period in prepared:
            if workers > 1:  # the wave's tiles side by side in worker processes (a run each, as here)
                recorded = _tiles_in_workers(study_path, workdir, inst, home, log_path, period, tiles, run_config,
                                             workers)
                runs.extend((period, tile, r) for tile, r in zip(tiles, recorded))
                tiled = [r.success for r in recorded]
            else:
                tiled = [execute(tiles_job, period, t, tile_partition_key(period, t), tile_keys(study.name))
                         for t in tiles]
            if all(tiled):
                last = period == analysis_period and not inputs_only
                execute(study_job, period, None, period, None if last else keyed(study.name, MERGE_KEYS))
        # Finalise what the runs left (a failed dbt invocation's output generator) while stderr is
        # still the run log: Python reports an error in a finaliser there, not on the terminal.
        gc.collect()
    errors, failed_checks, metadata, codes, traces = [], [], {}, [], []
    tile_stages = {key.to_user_string() for key in TILE_ASSET_KEYS}
    period_stages = {key.to_user_string() for key in (*PERIOD_ASSET_KEYS, *TILE_ASSET_KEYS)}
    tile_metadata: dict[str, list[dict]] = {}
    for period, tile, event in ((period, tile, e) for period, tile, r in runs for e in r.all_events):
        # Imagery failures name their partition: the tile (and the period, unless it is the
        # analysis period); a survey failure, the same in every period's run, is reported once.
        def where(stage: str) -> str:
            if stage not in period_stages:
                return ""
            if tile is not None:
                return f"[tile {tile}]" if period == analysis_period else f"[{period}|{tile}]"
            return "" if period == analysis_period else f"[{period}]"

        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            name = unscoped(study.name, event.step_key)  # <safe study>__image_chips -> image_chips
            step = name + where(name)
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
            if not ev.passed:
                failed_checks.append(f"{stage}{where(stage)}:{ev.check_name}: {ev.description or ''}")
                codes.append(failures.EXIT_INPUT if stage in failures.INPUT_ASSETS else failures.EXIT_FAILED)
        elif event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            key = unprefixed(study.name, mat.asset_key).to_user_string()
            plain = {k: _plain(v) for k, v in mat.metadata.items()}
            if mat.partition is not None:
                metadata[f"{key}[{mat.partition}]"] = plain
            if key in tile_stages:
                if period == analysis_period:
                    tile_metadata.setdefault(key, []).append(plain)
            elif mat.partition in (None, analysis_period):
                metadata[key] = plain
    for period, tile, r in runs:
        if getattr(r, "error", None):
            step = f"image_chips[tile {tile}]" if period == analysis_period else f"image_chips[{period}|{tile}]"
            errors.append(f"{step}: {r.error}")
    # A tile stage's entry for the analysis period: its tiles' counts added up.
    metadata.update({key: tiles_summary(values) for key, values in tile_metadata.items()})
    estimates = pd.DataFrame()
    version = metadata.get("effect_estimates", {}).get("estimate_version")
    published = Layout(workdir).published
    expected = len(periods) * (2 + len(tiles)) if tiles else None
    success = bool(runs) and all(r.success for _, _, r in runs) and len(runs) == expected
    if success and version and published.exists():
        estimates = query(
            published,
            "select * from marts.effect_estimates where study = ? and estimate_version = ?"
            " order by estimand, feature_set, estimator",
            [study.name, version],
        )
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


# `eocausal run` runs a wave's tiles in worker processes (each tile its own run) when the machine
# has room for more than one: a worker per TILE_WORKER_CORES cores and TILE_WORKER_MEMORY bytes.
# Two cores per worker because the tile's heaviest step, the fused RCF kernel, already keeps two
# threads near the GEMM rate: on a 2-core machine two one-thread workers took the 100,000-unit
# study from 602 s to 577 s (4 %) and its process tree from 2.9 GB to 4.2 GB, so there a single
# in-process run (both cores in the kernel) is the default. Memory: a tile of the default 20,000
# units peaks near 1.6 GB in its worker (benchmarks/results/scale).
TILE_WORKER_CORES = 2
TILE_WORKER_MEMORY = 2 << 30
MAX_LOCAL_TILE_WORKERS = 8
# Overrides the choice (1: every tile in `eocausal run`'s own process, one after another).
LOCAL_TILE_WORKERS_ENV = "EOCAUSAL_TILE_WORKERS"


def local_tile_workers(n_tiles: int, cores: int | None = None, memory: int | None = None) -> int:
    """How many worker processes `eocausal run` runs a wave's tiles in (1: none, in-process):
    :data:`LOCAL_TILE_WORKERS_ENV` if set, else one per :data:`TILE_WORKER_CORES` usable cores and
    :data:`TILE_WORKER_MEMORY` of physical memory, at most the tiles and :data:`MAX_LOCAL_TILE_WORKERS`."""
    asked = os.environ.get(LOCAL_TILE_WORKERS_ENV, "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise ValueError(f"{LOCAL_TILE_WORKERS_ENV} must be a whole number >= 1, got {asked!r}")
        return max(1, min(n_tiles, int(asked)))
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if memory is None else memory
    return max(1, min(n_tiles, cores // TILE_WORKER_CORES, memory // TILE_WORKER_MEMORY, MAX_LOCAL_TILE_WORKERS))


@dataclass
class RecordedRun:
    """A tile run made by a worker process, as the instance recorded it (what the outcome reads of
    an in-process result); ``error``: why there is no run (the worker failed outside it)."""

    success: bool
    all_events: list
    error: str | None = None

    @classmethod
    def of(cls, instance: dg.DagsterInstance, run_id: str) -> RecordedRun:
        run = instance.get_run_by_id(run_id)
        events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
        return cls(run is not None and run.status == dg.DagsterRunStatus.SUCCESS, events)


def _tiles_in_workers(study_path, workdir: Path, instance: dg.DagsterInstance, home: Path, log_path: Path,
                      period: str, tiles: list[str], run_config: dict, workers: int) -> list[RecordedRun]:
    """The tiles' runs, each executed in a worker process (spawned: none of this process's Dagster
    or torch state), which finds the working folder held by this process; in tile order."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    args = (str(Path(study_path).resolve()), str(workdir), str(home), str(log_path), period, run_config, threads)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_tile_worker, *args, tile) for tile in tiles]
        recorded = []
        for future in futures:
            try:
                recorded.append(RecordedRun.of(instance, future.result()))
            except Exception as exc:  # the worker died (killed, out of memory) or failed outside the run
                recorded.append(RecordedRun(False, [], f"the tile's worker process failed: {exc!r}"))
        return recorded


_WORKER_DEFINITIONS: dict = {}  # in a worker process: (study, workdir) -> (definitions, study name)


def _tile_worker(study_path: str, workdir: str, home: str, log_path: str, period: str, run_config: dict,
                 threads: int, tile: str) -> str:
    """One tile's run in a worker process; its run id."""
    if (study_path, workdir) not in _WORKER_DEFINITIONS:
        os.environ[HELD_BY_PARENT_ENV] = str(Path(workdir).resolve())
        import torch

        torch.set_num_threads(threads)
        _WORKER_DEFINITIONS[(study_path, workdir)] = (build_definitions(study_path, workdir),
                                                      load_study(study_path).name)
    defs, name = _WORKER_DEFINITIONS[(study_path, workdir)]
    job = defs.resolve_job_def(tiles_job_name(name))
    with open(log_path, "a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log), \
            open_instance(Path(home)) as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=run_config,
                                        partition_key=tile_partition_key(period, tile),
                                        asset_selection=list(tile_keys(name)))
        return result.run_id


def tiles_summary(tiles: list[dict]) -> dict:
    """One entry for a tile stage's runs of a period: counts (``n_*``, row counts) and per-reason
    counts added up, flags true when true for every tile, values every tile shares kept."""
    out: dict = {"n_tiles": len(tiles)}
    for key in dict.fromkeys(k for m in tiles for k in m):
        values = [m[key] for m in tiles if key in m]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif key != "n_features" and (key.startswith("n_") or key == "dagster/row_count") \
                and all(isinstance(v, int) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, dict) for v in values) and key == "excluded_by_reason":
            total: dict = {}
            for v in values:
                for reason, n in v.items():
                    total[reason] = total.get(reason, 0) + n
            out[key] = total
        elif all(v == values[0] for v in values):
            out[key] = values[0]
    return out


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

