"""The command line's one way into the orchestration layer, without importing it.

`eocausal run`, `demo` and `docs` need an orchestrator to materialise the asset graph. The library
says what it needs (:class:`Launcher`: two functions) and finds one by the entry point group
``eocausal.launchers``, where the Dagster layer registers ``assets.launcher`` (pyproject.toml).
So the library imports nothing from ``assets/`` or ``sensors/`` (tests/test_layering.py), and
another orchestration layer could stand in for Dagster's.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, cast

ENTRY_POINT_GROUP = "eocausal.launchers"
# The Dagster layer's launcher, for an install made before the entry point was declared.
DEFAULT_LAUNCHER = "assets.launcher"


class RunResult(Protocol):
    """What a launcher's ``run_study`` returns (assets.runner.RunOutcome)."""

    success: bool
    workdir: Path
    estimates: Any  # the run's estimate rows (a pandas DataFrame; empty on failure)
    errors: list[str]
    failed_checks: list[str]
    metadata: dict
    log_path: Path | None


class Launcher(Protocol):
    def run_study(self, study_path: str | Path, workdir: str | Path | None = None, **options: Any) -> RunResult:
        """Materialise the study's graph (every imagery period, then the analysis) in this process."""
        ...

    def generate_docs(self, workdir: Path, out: Path | None = None, analysis_period: str | None = None) -> Path:
        """dbt docs of the study's published warehouse; returns the page."""
        ...


class LauncherMissing(RuntimeError):
    """No orchestration layer is installed."""


def find_launcher() -> Launcher:
    """The launcher registered under ``eocausal.launchers`` (the first by name)."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    try:
        return cast(Launcher, found[0].load() if found else import_module(DEFAULT_LAUNCHER))
    except ModuleNotFoundError as exc:
        raise LauncherMissing(
            f"`eocausal run`, `demo` and `docs` need the Dagster layer, which cannot be imported ({exc}): "
            "install eocausal with its dependencies (pip install eocausal)"
        ) from None
