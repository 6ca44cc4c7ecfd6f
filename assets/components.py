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

from pathlib import Path

import dagster as dg

from assets.studies import StudyEntry, study_definitions, study_name
from eocausal.study import default_workdir


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
        name = study_name(study_path, None if study_path.exists() else self.name or Path(context.path).name)
        return study_definitions(StudyEntry(name, str(study_path), str(workdir)))
