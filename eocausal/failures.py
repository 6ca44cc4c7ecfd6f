"""How `eocausal` fails: its exit codes, which failure gets which, and the log that keeps the trace.

A rejection or failure prints one short reason on the terminal — the rule and the rows, units,
keys or file at fault — and the path of a log file that holds the full trace; never a stack trace.
The exit code says what kind of problem it was, so that a script or a scheduler can tell bad input
(fix the input) from a full disk (fix the machine) from a failed run (look at the log):

====  =================================================================================
code  meaning
====  =================================================================================
0     success: every requested estimate row was produced and published
1     the run failed: a stage error, a blocking check on the estimates (e.g. propensity
      overlap), requested estimate rows missing, or an unexpected error
2     input rejected: the study file, survey, imagery or another input breaks a rule
      (the contract, or a blocking check on the survey, chips or embeddings); also a
      wrong command line
3     working folder unusable: a file where the folder should be, read-only, or out of
      space (before or during the run)
4     working folder busy: another run holds it
5     Earth Engine access refused: credentials missing, unreadable or refused (401/403)
130   interrupted (Ctrl-C)
====  =================================================================================

In every case nothing already published is changed.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

from eocausal import layout

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_WORKDIR = 3
EXIT_BUSY = 4
EXIT_CREDENTIALS = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success: every requested estimate row produced and published",
    EXIT_FAILED: "the run failed (a stage error, a blocking check on the estimates, missing estimate rows)",
    EXIT_INPUT: "input rejected (study file, survey, imagery or command line breaks a rule)",
    EXIT_WORKDIR: "working folder unusable (a file, read-only, or out of space)",
    EXIT_BUSY: "working folder busy (another run holds it)",
    EXIT_CREDENTIALS: "Earth Engine access refused (credentials missing, unreadable or refused)",
    EXIT_INTERRUPTED: "interrupted",
}


def exit_codes_help() -> str:
    """The exit-code table as `--help` shows it."""
    return "exit codes:\n" + "\n".join(f"  {code:<4}{text}" for code, text in EXIT_CODES.items())


class InputRejected(Exception):
    """Input the contract rejects before any work (exit code 2, like a StudyError)."""


class CredentialsRefused(Exception):
    """Earth Engine credentials missing, unreadable or refused, found before any work (exit code 5)."""


# Exception classes (by name: failures inside a Dagster run arrive as serialised errors that keep
# only the class name) whose failure is the input's fault; their subclasses count too (found among
# the classes imported when the failure is classified: the run that raised one imported it).
INPUT_ERRORS = frozenset({
    "InputRejected", "StudyError", "WarehousePathError",  # the study file (and paths it implies)
    "SurveyError", "DataQualityError",  # the survey contract and the quality suites
    "ImageryError", "BandFileError",  # rasters and band files
    "EmbeddingError",  # backbone weights, embedding checks
    "TransportError",  # a transport region the imagery cannot serve
})
CREDENTIAL_ERRORS = frozenset({"EarthEngineError", "EarthEngineCredentialsError"})
# Assets whose blocking checks judge the input (a failure there is exit 2); any other asset's
# blocking check judges the results (exit 1).
INPUT_ASSETS = frozenset({"survey", "image_embedder", "image_chips", "image_embeddings", "image_chip_index",
                          "image_components"})

# The order in which one failure's kind wins over another's when a run has several.
_PRECEDENCE = (EXIT_WORKDIR, EXIT_BUSY, EXIT_CREDENTIALS, EXIT_INPUT, EXIT_FAILED)


def worst(codes: Iterable[int]) -> int:
    """The exit code of a run whose failures have ``codes`` (the most specific kind wins)."""
    codes = set(codes) - {EXIT_OK}
    for code in _PRECEDENCE:
        if code in codes:
            return code
    return EXIT_FAILED if codes else EXIT_OK


def code_for_names(class_names: Iterable[str]) -> int:
    """The exit code of a failure whose exception (and its causes) have these class names."""
    names = set(class_names)
    if names & _with_subclasses(CREDENTIAL_ERRORS):
        return EXIT_CREDENTIALS
    if names & _with_subclasses(INPUT_ERRORS):
        return EXIT_INPUT
    return EXIT_FAILED


def _with_subclasses(roots: frozenset[str]) -> set[str]:
    """``roots`` and the names of the imported eocausal exception classes that derive from one."""
    found, stack = set(roots), [BaseException]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("eocausal") and any(base.__name__ in roots for base in cls.__mro__):
            found.add(cls.__name__)
    return found


def exception_names(exc: BaseException) -> list[str]:
    """The class names of ``exc`` and of the exceptions it was raised from or during."""
    names, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names.extend(cls.__name__ for cls in type(exc).__mro__ if cls not in (BaseException, Exception, object))
        exc = exc.__cause__ or exc.__context__
    return names


# -- the log that keeps the trace ----------------------------------------------------------------

LOG_DIR_ENV = "EOCAUSAL_LOG_DIR"
LOGS_FOLDER = layout.LOGS_FOLDER
_KEEP_LOGS = 50


def failure_log_dir(workdir: Path | None) -> Path:
    """Where a failure's log goes: ``$EOCAUSAL_LOG_DIR`` if set; else ``<workdir>/logs`` when the
    working folder already exists and takes files; else ``<temp>/eocausal-<uid>/logs``.

    A rejection never creates a working folder just to hold its log (a mistyped path would leave
    folders about), and a working folder that is the problem (read-only, full) cannot hold it.
    """
    env = os.environ.get(LOG_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if workdir is not None and Path(workdir).is_dir():
        return Path(workdir) / LOGS_FOLDER
    return Path(tempfile.gettempdir()) / f"eocausal-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / LOGS_FOLDER


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def write_failure_log(workdir: Path | None, command: list[str], message: str, code: int,
                      traces: Iterable[str] = (), exc: BaseException | None = None,
                      run_log: Path | None = None) -> Path | None:
    """Write what failed and its full trace to a new log file; return its path (None if no folder
    could take it). Credential values from the environment are redacted."""
    from eocausal.credentials import redact

    parts = [
        f"eocausal {' '.join(command)}",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  pid: {os.getpid()}",
        f"exit code: {code} - {EXIT_CODES.get(code, 'failure')}",
        "",
        "message:",
        message,
        "",
    ]
    if run_log is not None:
        parts += [f"run log (Dagster and dbt output): {run_log}", ""]
    for trace in traces:
        parts += ["trace:", trace.rstrip(), ""]
    if exc is not None:
        parts += ["trace:", "".join(traceback.format_exception(exc)).rstrip(), ""]
    text = redact("\n".join(parts) + "\n")
    candidates = [failure_log_dir(workdir)]
    if not os.environ.get(LOG_DIR_ENV):
        candidates.append(failure_log_dir(None))
    for folder in candidates:
        if not _writable_dir(folder):
            continue
        path = folder / f"eocausal-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        try:
            path.write_text(text, encoding="utf-8")
        except OSError:  # a full disk: no half-written log left behind, try the next folder
            try:
                path.unlink()
            except OSError:
                pass
            continue
        _prune(folder)
        return path
    return None


def _prune(folder: Path) -> None:
    """Keep the newest failure logs only."""
    logs = sorted(folder.glob("eocausal-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-_KEEP_LOGS]:
        try:
            old.unlink()
        except OSError:
            pass
