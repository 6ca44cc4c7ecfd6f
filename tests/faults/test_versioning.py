"""Estimate versions (DESIGN §9) as Dagster records them and as the warehouse keeps them."""

from __future__ import annotations

import hashlib

import dagster as dg
import pandas as pd
import pytest
from dagster._core.instance.ref import InstanceRef

from assets.naming import unprefixed
from assets.studies import build_definitions
from eocausal.estimate.effects import CODE_VERSION as ESTIMATE_CODE_VERSION
from eocausal.study import load_study
from eocausal.versioning import frame_version
from eocausal.warehouse import query
from tests.faults import support

pytestmark = pytest.mark.slow


def _materialization(instance, key, study):
    # the study's assets are keyed under its name (assets/naming.py)
    event = instance.get_latest_materialization_event(dg.AssetKey([study, *([key] if isinstance(key, str) else key)]))
    assert event is not None, key
    return event.asset_materialization


def test_dagster_records_code_versions_data_versions_and_lineage(ops):
    study_path = ops.study_dir / "study.yaml"
    name = load_study(study_path).name
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(ops.instance_dir))) as instance:
        survey = _materialization(instance, "survey", name)
        chips = _materialization(instance, "image_chips", name)
        embeddings = _materialization(instance, "image_embeddings", name)
        estimates = _materialization(instance, "effect_estimates", name)
        analysis_units = _materialization(instance, ["marts", "analysis_units"], name)

    graph = build_definitions(study_path, ops.workdir).resolve_asset_graph()
    for mat in (survey, chips, embeddings, estimates):
        assert mat.tags["dagster/code_version"] == graph.get(mat.asset_key).code_version
        assert mat.tags["dagster/data_version"] == ops.metadata[unprefixed(name, mat.asset_key).to_user_string()].get(
            "data_version", ops.metadata["effect_estimates"]["estimate_version"])
    # dbt models carry their SQL's hash as code version, and a data version
    assert analysis_units.tags["dagster/code_version"] and analysis_units.tags["dagster/data_version"]
    # Dagster's lineage: each stage names the data version of what it was computed from
    assert chips.tags[f"dagster/input_data_version/{name}/survey"] == survey.tags["dagster/data_version"]
    # (both are partitioned by imagery period: Dagster records a partitioned input's version as the
    # sha256 of its partitions' versions joined, here the one partition's)
    chips_partitions_version = hashlib.sha256(chips.tags["dagster/data_version"].encode()).hexdigest()
    assert embeddings.tags[f"dagster/input_data_version/{name}/image_chips"] == chips_partitions_version
    # the estimate's own lineage: the input versions its version hashes
    meta = {k: v.value for k, v in estimates.metadata.items()}
    assert meta["survey_version"] == survey.tags["dagster/data_version"]
    assert meta["embeddings_version"] == embeddings.tags["dagster/data_version"]
    assert meta["code_version"] == ESTIMATE_CODE_VERSION
    assert estimates.tags["dagster/data_version"] == meta["estimate_version"]


def test_changed_input_adds_a_version_whose_lineage_names_the_new_inputs(ops, reference):
    db = reference["workdir"] / "published" / "warehouse.duckdb"
    v1 = ops.metadata["effect_estimates"]["estimate_version"]
    history = query(db, "select * from marts.effect_estimates")
    new = history[history["estimate_version"] != v1]
    assert new["estimate_version"].nunique() == 1 and len(new) == support.ROWS_PER_VERSION
    wave2_version = frame_version(pd.read_parquet(reference["workdir"] / "lake" / "survey.parquet"))
    [embeddings_version] = query(db, "select distinct embedding_version from marts.analysis_units")["embedding_version"]
    assert set(new["survey_version"]) == {wave2_version} != {ops.metadata["survey"]["data_version"]}
    assert set(new["embeddings_version"]) == {embeddings_version} != {ops.metadata["image_embeddings"]["data_version"]}
    assert set(new["code_version"]) == {ESTIMATE_CODE_VERSION}
    latest = query(db, "select distinct estimate_version from marts.effect_estimates_latest")
    assert latest["estimate_version"].tolist() == [new["estimate_version"].iloc[0]]


def test_history_is_never_rewritten(ops, reference):
    """The baseline's rows survive the refresh exactly: values and computed_at alike."""
    order = "estimand, estimator, feature_set"
    v1 = ops.metadata["effect_estimates"]["estimate_version"]
    before = query(ops.published, f"select * from marts.effect_estimates order by {order}")
    after = query(reference["workdir"] / "published" / "warehouse.duckdb",
                  f"select * from marts.effect_estimates where estimate_version = ? order by {order}", [v1])
    pd.testing.assert_frame_equal(after, before, check_exact=True)


def test_latest_follows_the_current_spec_back_to_an_earlier_version(tiny_study, tmp_path):
    """Spec A, then B, then A again: the third run reuses A's version (no new rows), and
    effect_estimates_latest shows A's rows again although B's were computed later."""
    import shutil

    import yaml

    from assets.runner import run_study

    study_dir = tmp_path / "study"
    shutil.copytree(tiny_study.parent, study_dir)
    study_path = study_dir / tiny_study.name
    spec_a = yaml.safe_load(study_path.read_text())
    spec_b = {**spec_a, "analysis": {**spec_a["analysis"], "seed": spec_a["analysis"].get("seed", 0) + 1}}
    versions = []
    for doc in (spec_a, spec_b, spec_a):
        study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        outcome = run_study(study_path)
        assert outcome.success, outcome.errors + outcome.failed_checks
        versions.append(outcome.metadata["effect_estimates"]["estimate_version"])
        db = outcome.workdir / "published" / "warehouse.duckdb"
        latest = query(db, "select distinct estimate_version from marts.effect_estimates_latest")
        assert latest["estimate_version"].tolist() == [versions[-1]]
        current = query(db, "select * from marts.current_estimate")
        assert current[["study", "estimate_version"]].values.tolist() == [[spec_a["name"], versions[-1]]]
    assert versions[0] == versions[2] != versions[1]
    history = query(db, "select estimate_version, count(*) as n from marts.effect_estimates group by 1")
    assert sorted(history["estimate_version"]) == sorted(set(versions))  # A reused, not appended again
