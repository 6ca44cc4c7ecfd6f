"""Malformed survey and imagery input, each run through the whole graph on top of a published study.

Every case must fail the run with a message naming the rule and the rows, units or file at fault,
and leave the published warehouse byte-for-byte as it was (and the private warehouse's history
unchanged). The cases share one working folder: a case that changed anything would fail its own
before/after comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.faults import matrix, support

pytestmark = pytest.mark.slow

# The cases are the graph rows of the fault matrix (tests/faults/matrix.py: one list of cases).
CASES = matrix.GRAPH_CASES


@pytest.fixture(scope="module")
def shared_workdir(ops):
    _, workdir = support.scenario(ops, "bad_input")
    return workdir


def _state(workdir: Path) -> dict:
    return {
        "published": support.file_sha256(workdir / "published" / "warehouse.duckdb"),
        "history": support.estimate_history(workdir / "warehouse.duckdb"),
        "estimate_files": sorted(p.name for p in (workdir / "lake" / "effect_estimates").glob("*.parquet")),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_rejected_and_nothing_published_changes(ops, shared_workdir, matrix_observations, tmp_path, case):
    from assets.runner import run_study

    study = tmp_path / "study"
    shutil.copytree(ops.study_dir, study, ignore=shutil.ignore_patterns("eocausal_work"))
    case.build(study)
    before = _state(shared_workdir)

    outcome = run_study(study / "study.yaml", shared_workdir)

    message = "\n".join(outcome.errors + outcome.failed_checks)
    (ops.logs / f"bad_input_{case.name}.txt").write_text(message)
    matrix.save_observation(matrix_observations, case, matrix.observation(case, outcome.exit_code, message))
    assert not outcome.success, f"{case.name} was accepted"
    assert outcome.exit_code == case.code, f"{case.name}: exit {outcome.exit_code}:\n{message}"
    for text in case.words:
        assert text in message, f"{case.name}: {text!r} not in:\n{message}"
    assert "Traceback" not in message
    after = _state(shared_workdir)
    assert after["published"] == before["published"], f"{case.name} changed the published warehouse"
    pd.testing.assert_frame_equal(after["history"], before["history"])
    assert after["estimate_files"] == before["estimate_files"]


def test_at_least_twenty_kinds():
    assert len({c.name for c in CASES}) >= 20
