"""A SQL consumer reading the published warehouse in a loop while `eocausal run` refreshes it."""

from __future__ import annotations

import json

import pytest

from tests.faults import support

pytestmark = pytest.mark.slow


def test_reader_never_errors_and_sees_only_complete_versions(ops, reference):
    reads = reference["reads"]
    v1 = ops.metadata["effect_estimates"]["estimate_version"]
    [v2] = {r["estimate_version"] for r in json.loads(reference["stdout"])}
    assert v2 != v1
    print(f"read loop during the refresh: {reads['reads']} reads, {len(reads['errors'])} errors, "
          f"versions seen {reads['sequence']}")
    assert reads["errors"] == []
    assert reads["reads"] > 0
    # every version the consumer saw had all its rows, each key once
    for shape, n_reads in reads["shapes"].items():
        version, n_rows, n_keys = shape.split(":")
        assert version in (v1, v2), shape
        assert int(n_rows) == int(n_keys) == support.ROWS_PER_VERSION, shape
    # the latest view moved from the old version to the new one, never showing a partial one
    assert set(reads["latest"]) <= {f"{v1}:{support.ROWS_PER_VERSION}", f"{v2}:{support.ROWS_PER_VERSION}"}
    # the history the consumer saw: the old version alone, then old and new together, nothing between
    assert reads["sequence"] == [[v1], sorted([v1, v2])]


def test_refresh_printed_the_new_version_as_json(reference):
    records = json.loads(reference["stdout"])
    assert len(records) == support.ROWS_PER_VERSION
    assert {"estimand", "estimator", "feature_set", "estimate", "std_error", "ci_low", "ci_high", "n",
            "estimate_version"} <= set(records[0])
