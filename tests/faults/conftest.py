"""Session fixtures of the operations suites: the baseline study run and the uninterrupted refresh."""

from __future__ import annotations

import os
import shlex
import sys

import pytest

from tests.faults import matrix, support

# `EOCAUSAL_WRITE_MATRIX=tests/faults/MATRIX.md pytest -m slow tests/faults/test_matrix.py
# tests/faults/test_bad_input.py` writes the fault matrix with what each case did in this session.
WRITE_MATRIX_ENV = "EOCAUSAL_WRITE_MATRIX"


@pytest.fixture(scope="session")
def ops(tmp_path_factory) -> support.Baseline:
    base = support.baseline(tmp_path_factory)
    assert base.success, base.errors
    return base


@pytest.fixture(scope="session")
def reference(ops, tmp_path_factory) -> dict:
    ref = support.reference_refresh(tmp_path_factory)
    assert ref["returncode"] == 0, ref["stderr"][-3000:]
    return ref


@pytest.fixture(scope="session")
def matrix_observations(tmp_path_factory):
    """Where the matrix's cases record what they did; written out as MATRIX.md at the end of the
    session when EOCAUSAL_WRITE_MATRIX names the file."""
    folder = tmp_path_factory.mktemp("matrix_observations")
    yield folder
    target = os.environ.get(WRITE_MATRIX_ENV)
    if target:
        command = f"{WRITE_MATRIX_ENV}={target} " + shlex.join(
            ["pytest", *[a for a in sys.argv[1:] if not a.startswith("--")]])
        matrix.write_markdown(matrix.load_observations(folder), target, command)
