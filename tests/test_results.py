"""eocausal.results: the entry points a notebook uses, on the cases that need no run."""

from __future__ import annotations

import pytest

import eocausal
from eocausal.results import ResultsNotFound
from eocausal.study import StudyError


def test_entry_points_are_at_the_top_level_and_lazy():
    import subprocess
    import sys

    code = "import sys, eocausal; assert 'eocausal.results' not in sys.modules; eocausal.open_study; " \
           "assert 'eocausal.results' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    assert callable(eocausal.open_study) and callable(eocausal.run_study)


def test_opening_a_study_that_has_not_run_says_so(tiny_study, tmp_path):
    with pytest.raises(ResultsNotFound, match="no published results of .* run the study first"):
        eocausal.open_study(tiny_study, workdir=tmp_path / "work")


def test_running_a_missing_study_names_it(tmp_path):
    with pytest.raises(StudyError, match="study file not found"):
        eocausal.run_study(tmp_path / "nowhere" / "study.yaml")
