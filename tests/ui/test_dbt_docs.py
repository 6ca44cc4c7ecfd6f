"""dbt docs of the published warehouse: generated offline, describing the consumers' tables."""

from __future__ import annotations

import json
import os

import pytest

from tests.faults import support

pytestmark = pytest.mark.slow


def test_docs_generate_offline_and_describe_the_marts(tmp_path_factory, tmp_path, monkeypatch):
    from eocausal.cli import main

    base = support.baseline(tmp_path_factory)
    published_before = support.file_sha256(base.published)
    # No network: any attempt to reach out would fail at once.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    out = tmp_path / "docs"
    assert main(["docs", str(base.study_dir / "study.yaml"), "--workdir", str(base.workdir), "--out", str(out)]) == 0

    catalog = json.loads((out / "catalog.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    history = catalog["nodes"]["model.eocausal.effect_estimates"]
    assert history["metadata"]["schema"] == "marts"
    assert {"estimate_version", "survey_version", "embeddings_version", "estimate", "ci_low"} <= set(history["columns"])
    assert "model.eocausal.analysis_units" in catalog["nodes"]
    assert "model.eocausal.effect_estimates_latest" in catalog["nodes"]
    assert "Append-only history" in manifest["nodes"]["model.eocausal.effect_estimates"]["description"]
    page = (out / "static_index.html").read_text()
    assert "effect_estimates_latest" in page and "Append-only history" in page
    # the consumers' copy was only read
    assert support.file_sha256(base.published) == published_before
