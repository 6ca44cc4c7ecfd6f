"""Fixtures for the sensor tests: a study folder of our own and the real Definitions bound to it."""

from __future__ import annotations

import shutil
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
    from assets.definitions import build_definitions

    return build_definitions(str(study_dir / "study.yaml"), str(study_dir / "eocausal_work"))


@pytest.fixture
def survey(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "villages.csv", dtype=str)
