"""Resources: which study to run, and where its lake, cache and warehouse live.

A deployment of many studies has ONE `study` and ONE `warehouse` resource (Dagster refuses two
objects under one resource key): they hold every study's file (`studies`) and working folder
(`roots`), keyed by study name, and resolve the run's study when the run starts
(assets.naming.run_study_name: the run's `eocausal/study` tag, else the prefix of the assets it
selected). Single-study uses (`eocausal run`, tests) may give `study_path` / `root` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from assets.instance import record_holder
from assets.naming import TILE_STUDY_TAG, run_study_name
from eocausal.layout import Layout
from eocausal.study import Study, load_study
from eocausal.warehouse import check_sql_safe_path
from eocausal.workdir import exclusive_workdir, held_by_this_process


class StudyResource(dg.ConfigurableResource):
    """The study file (DESIGN §5) the run materialises: `study_path`, or the run's study's among `studies`."""

    study_path: str = ""
    studies: dict[str, str] = {}  # study name -> study file (a deployment)
    _resolved: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.studies:
            self._resolved = self.studies[run_study_name(context.run, self.studies)]

    @property
    def path(self) -> str:
        """The study file of this run."""
        path = self._resolved or self.study_path
        if not path:
            raise dg.Failure(description="no study file: the study resource has no study_path and this run "
                                         f"resolved none of its studies ({sorted(self.studies)})")
        return path

    def load(self) -> Study:
        return load_study(self.path)


class WarehouseResource(dg.ConfigurableResource):
    """One working folder per study: Parquet lake, content cache, DuckDB warehouse and its published copy."""

    root: str = ""
    roots: dict[str, str] = {}  # study name -> working folder (a deployment)
    _resolved: str | None = PrivateAttr(default=None)

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[WarehouseResource]:
        """Every run holds its working folder while it runs, however it was launched (UI,
        schedule, sensor, `eocausal run`): a second run on the folder fails at once, naming the
        first (eocausal/workdir.py). `eocausal run` holds it around its runs already. The study
        job runs its steps in one process (in_process executor), so the hold covers the whole run.
        In a deployment, the folder is the run's study's (assets.naming.run_study_name)."""
        if self.roots:
            self._resolved = self.roots[run_study_name(context.run, self.roots)]
        root = self.root_path
        with ExitStack() as stack:
            if not held_by_this_process(root):
                # A tile's run shares the folder with the study's other tile runs, and runs beside
                # its study-job runs (eocausal.workdir.ROLES; assets/studies.py).
                tile = context.run is not None and TILE_STUDY_TAG in context.run.tags
                stack.enter_context(exclusive_workdir(root, role="tile" if tile else "run"))
            if context.instance is not None and context.run_id:
                record_holder(context.instance, context.run_id, root)
            yield self

    @property
    def root_path(self) -> Path:
        root = self._resolved or self.root
        if not root:
            raise dg.Failure(description="no working folder: the warehouse resource has no root and this run "
                                         f"resolved none of its studies ({sorted(self.roots)})")
        return Path(root).resolve()

    @property
    def layout(self) -> Layout:
        return Layout(self.root_path)

    @property
    def lake(self) -> Path:
        return self.layout.lake

    @property
    def cache(self) -> Path:
        return self.layout.cache

    @property
    def warehouse_path(self) -> Path:
        return self.layout.warehouse

    @property
    def published_path(self) -> Path:
        return self.layout.published

    def dbt_vars(self) -> dict[str, str]:
        """Absolute paths for dbt's profile and sources (dbt reads them with var(), from --vars)."""
        # The paths end up inside SQL text (dbt-duckdb sources): refuse quotes and control characters.
        check_sql_safe_path(self.root_path)
        return dbt_path_vars(self.lake, self.warehouse_path)


def dbt_path_vars(lake: Path, warehouse: Path) -> dict[str, str]:
    """The --vars that point dbt's profile and sources at a lake and a warehouse file."""
    return {"lake": str(lake), "warehouse": str(warehouse)}
