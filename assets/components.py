"""`StudyComponent`: one study of the deployment, declared in a small YAML, without code.

Each folder under assets/defs/ holds a ``defs.yaml`` like::

    type: assets.components.StudyComponent
    attributes:
      study: demo_run/study/study.yaml    # relative to the project root (or absolute)
      workdir: demo_run/study/eocausal_work   # optional: default <study folder>/eocausal_work
      name: eocausal_demo                 # optional: the name while the study file does not exist yet

and `dagster dev` (assets/definitions.py, `dg.load_from_defs_folder`) shows every study: its
assets keyed under its name, its job, schedule and sensors (assets/studies.py). Adding a study is
adding a folder with a defs.yaml.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg

from assets.naming import safe_name
from assets.studies import StudyEntry, study_definitions, study_name
from eocausal.study import StudyError, default_workdir

log = logging.getLogger(__name__)


class StudyComponent(dg.Component, dg.Resolvable, dg.Model):
    """A study (its study.yaml) and its working folder, as one graph of the deployment."""

    study: str
    workdir: str | None = None
    # The study's name (its asset-key prefix) while its file does not exist yet; the file's `name`
    # wins once it does. Default: the name of the defs.yaml's folder.
    name: str | None = None

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        study_path = (Path(context.project_root) / self.study).resolve()
        workdir = (Path(context.project_root) / self.workdir).resolve() if self.workdir else default_workdir(study_path)
        fallback = self.name or Path(context.path).name
        try:
            name = study_name(study_path, None if study_path.exists() else fallback)
            return study_definitions(StudyEntry(name, str(study_path), str(workdir)))
        except StudyError as exc:
            # One bad study file must not take the deployment's other studies down with it.
            return broken_study_definitions(fallback, study_path, str(exc))


def broken_study_definitions(name: str, study_path: Path, error: str) -> dg.Definitions:
    """A study whose file does not follow the contract: one asset, `<name>/study_file`, that shows
    the rule it breaks (description, metadata) and fails naming it when materialised; no job,
    schedule or sensor, and the catalog leaves it out until the file is fixed."""
    message = f"study file {study_path} does not follow the study contract: {error}"

    @dg.asset(key=[safe_name(name) or "study", "study_file"], group_name="broken_studies", description=message,
              metadata={"study": str(study_path), "error": error})
    def study_file() -> None:
        raise dg.Failure(description=message)

    log.warning("%s: the study is left out of the deployment until it is fixed", message)
    return dg.Definitions(assets=[study_file])
