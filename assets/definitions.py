"""The code location (`dagster dev -w workspace.yaml`, `dg`): every study declared in assets/defs/.

A dg project (pyproject.toml [tool.dg.project]): each study is a `StudyComponent` (one defs.yaml
per study, assets/components.py) with its own asset keys, job, schedule, sensors and working
folder; the deployment binds one `study` and one `warehouse` resource for them all
(assets/studies.py). Importing this module builds nothing: the definitions are built (and dbt's
manifest prepared) when the code location loads them.

EOCAUSAL_STUDY (and EOCAUSAL_WORKDIR) point the location at one study file instead of the defs folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets.catalog import build_catalog_definitions, default_catalog_path
from assets.studies import build_definitions, studies_of, study_job_name, with_resources

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def load_deployment(project_root: Path = PROJECT_ROOT) -> dg.Definitions:
    """Every study of the defs folder (or the one EOCAUSAL_STUDY names), with the deployment's resources."""
    study = os.environ.get("EOCAUSAL_STUDY")
    if study:
        from eocausal.study import default_workdir

        return build_definitions(study, os.environ.get("EOCAUSAL_WORKDIR") or default_workdir(study))
    return with_catalog(with_resources(dg.load_from_defs_folder(path_within_project=project_root)), project_root)


def with_catalog(defs: dg.Definitions, project_root: Path = PROJECT_ROOT) -> dg.Definitions:
    """The deployment plus its catalog (assets/catalog.py): one DuckDB file with every study's marts."""
    entries = studies_of(defs)
    jobs = [defs.resolve_job_def(study_job_name(e.name)) for e in entries]
    catalog = build_catalog_definitions({e.name: e.workdir for e in entries}, jobs, default_catalog_path(project_root))
    return dg.Definitions.merge(defs, catalog)


@dg.definitions
def defs() -> dg.Definitions:
    return load_deployment()
