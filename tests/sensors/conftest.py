"""Fixtures for the sensor tests: a study folder of our own and the real Definitions bound to it.

The study's job, schedule and sensors are named after it (assets.naming.scoped): `names` gives them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture
def study_dir(tiny_study: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny study (its files may be changed)."""
    target = tmp_path / "study"
    shutil.copytree(tiny_study.parent, target, ignore=shutil.ignore_patterns("eocausal_work", "landing"))
    return target


@pytest.fixture
def defs_for(study_dir: Path):
    from assets.studies import build_definitions

    return build_definitions(str(study_dir / "study.yaml"), str(study_dir / "eocausal_work"))


@dataclass(frozen=True)
class StudyNames:
    study: str  # the asset-key prefix

    @property
    def job(self) -> str:
        from assets.studies import study_job_name

        return study_job_name(self.study)

    def __call__(self, name: str) -> str:
        """A schedule's or sensor's name for this study."""
        from assets.naming import scoped

        return scoped(self.study, name)


@pytest.fixture
def names(study_dir: Path) -> StudyNames:
    from eocausal.study import load_study

    return StudyNames(load_study(study_dir / "study.yaml").name)


@pytest.fixture
def survey(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "villages.csv", dtype=str)
