"""Session fixtures of the operations suites: the baseline study run and the uninterrupted refresh."""

from __future__ import annotations

import pytest

from tests.faults import support


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
