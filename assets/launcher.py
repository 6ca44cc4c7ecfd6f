"""The Dagster layer's side of eocausal.launch: what `eocausal run`, `demo` and `docs` call.

Registered as the entry point ``eocausal.launchers: dagster`` (pyproject.toml). The Dagster
modules are imported when a function is called, not when this module is found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_study(study_path: str | Path, workdir: str | Path | None = None, **options: Any):
    """assets.runner.run_study: the study's graph in this process, recorded in the Dagster instance."""
    from assets.runner import run_study as run

    return run(study_path, workdir, **options)


def generate_docs(workdir: Path, out: Path | None = None, analysis_period: str | None = None) -> Path:
    """assets.warehouse_docs.generate_docs: dbt docs of the published warehouse."""
    from assets.warehouse_docs import generate_docs as generate

    return generate(workdir, out, analysis_period)
