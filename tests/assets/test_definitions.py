"""The code location: the demo deployment (two studies declared in assets/defs/), each study's graph
keyed under its name, and the graph as a whole against its snapshot (tests/assets/snapshots/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import defs
from assets.naming import STUDY_TAG, TILE_STUDY_TAG, run_study_name
from assets.studies import study_job_name

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("snapshots") / "demo_deployment.json"
UPDATE_ENV = "EOCAUSAL_UPDATE_SNAPSHOTS"  # =1: rewrite the snapshot instead of comparing with it
DEMO, SEED7 = "eocausal_demo", "eocausal_demo_seed7"


@pytest.fixture(scope="module")
def deployment() -> dg.Definitions:
    return defs()


def test_definitions_load_and_graph_is_wired(deployment):
    graph = deployment.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for study in (DEMO, SEED7):
        for key in ["survey", "image_embedder", "image_chips", "image_embeddings", "image_chip_index",
                    "image_components", "effect_estimates", "published_warehouse",
                    "staging/stg_survey", "intermediate/int_units_imaged", "marts/analysis_units",
                    "marts/unit_exclusions", "marts/effect_estimates", "marts/effect_estimates_latest"]:
            assert f"{study}/{key}" in keys, (study, key)
        parents = lambda k: {p.to_user_string().removeprefix(f"{study}/")  # noqa: E731
                             for p in graph.get(dg.AssetKey([study, *k.split("/")])).parent_keys}
        assert parents("staging/stg_survey") == {"survey"}
        assert parents("staging/stg_image_embeddings") == {"image_components"}
        assert parents("staging/stg_image_chips") == {"image_chip_index"}
        assert parents("image_components") == {"image_embeddings"} and parents("image_chip_index") == {"image_chips", "survey"}
        assert parents("image_embeddings") == {"image_chips", "image_embedder"}
        assert parents("effect_estimates") == {"marts/analysis_units", "imputed_outcomes", "image_context"}
        assert parents("image_context") == {"marts/analysis_units"}
        assert parents("cate_estimates") == {"marts/analysis_units", "image_context"}
        assert parents("imputed_outcomes") == {"marts/analysis_units"}
        assert parents("effect_sensitivity") == {"effect_estimates"}
        assert parents("staging/stg_effect_estimates") == {"effect_estimates"}
        job = deployment.resolve_job_def(study_job_name(study))
        assert job.tags[STUDY_TAG] == study
        assert {k.path[0] for k in job.asset_layer.executable_asset_keys} == {study}
        tiles_job = deployment.resolve_job_def(f"{study}__tiles_job")
        assert tiles_job.tags[TILE_STUDY_TAG] == study and STUDY_TAG not in tiles_job.tags
        assert {k.path[-1] for k in tiles_job.asset_layer.executable_asset_keys} == {"image_chips", "image_embeddings"}
    # every key but the deployment's catalog is one study's, and no study's asset depends on another's
    from assets.catalog import CATALOG_KEY

    study_keys = graph.get_all_asset_keys() - {CATALOG_KEY}
    assert {k.path[0] for k in study_keys} == {DEMO, SEED7}
    for key in study_keys:
        assert {p.path[0] for p in graph.get(key).parent_keys} <= {key.path[0]}, key
    # the catalog follows every study's published warehouse
    assert graph.get(CATALOG_KEY).parent_keys == {dg.AssetKey([s, "published_warehouse"]) for s in (DEMO, SEED7)}


def test_each_study_has_its_own_job_schedule_and_sensors(deployment):
    assert sorted(j.name for j in deployment.jobs) == [
        "catalog_job", "eocausal_demo__refresh_job", "eocausal_demo__study_job", "eocausal_demo__tiles_job",
        "eocausal_demo_seed7__refresh_job", "eocausal_demo_seed7__study_job", "eocausal_demo_seed7__tiles_job"]
    assert sorted(s.name for s in deployment.schedules) == ["eocausal_demo__imagery_refresh",
                                                            "eocausal_demo_seed7__imagery_refresh"]
    assert sorted(s.name for s in deployment.sensors) == [
        "catalog_refresh_sensor", "eocausal_demo__refresh_waves", "eocausal_demo__run_failure_alerts",
        "eocausal_demo__survey_wave_sensor", "eocausal_demo_seed7__refresh_waves",
        "eocausal_demo_seed7__run_failure_alerts", "eocausal_demo_seed7__survey_wave_sensor"]
    # one study resource and one warehouse resource for both, each study with its own working folder
    resources = deployment.resources
    assert set(resources["study"].studies) == set(resources["warehouse"].roots) == {DEMO, SEED7}
    assert resources["study"].studies[SEED7] == str(REPO / "demo_run" / "study_seed7" / "study.yaml")
    assert resources["warehouse"].roots[SEED7] == str(REPO / "demo_run" / "study_seed7" / "eocausal_work")
    assert resources["warehouse"].roots[DEMO] == str(REPO / "demo_run" / "study" / "eocausal_work")


def test_blocking_checks_and_pools(deployment):
    graph = deployment.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name): graph.get_check_spec(k) for k in graph.asset_check_keys}
    for asset, name in [("survey", "survey_suite"), ("image_embedder", "chip_usability"),
                        ("image_chips", "chip_usability"), ("image_chip_index", "chip_usability"), ("image_components", "embeddings_valid"),
                        ("effect_estimates", "propensity_overlap")]:
        assert checks[(f"{DEMO}/{asset}", name)].blocking, name
    # dbt tests are asset checks too
    assert (f"{DEMO}/marts/analysis_units", "unique_analysis_units_unit_id") in checks
    # Every warehouse writer or reader shares one pool.
    for key in ["effect_estimates", "published_warehouse", "marts/analysis_units", "marts/effect_estimates"]:
        node = graph.get(dg.AssetKey.from_user_string(f"{SEED7}/{key}"))
        assert node.pools == {"duckdb_warehouse"}, key


def _snapshot(deployment: dg.Definitions) -> dict:
    """Every asset spec of the deployment (key, group, deps and their partition mappings, partitions,
    checks) and the jobs, schedules and sensors: what a graph change shows in review."""
    graph = deployment.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        deps = {}
        for parent in sorted(node.parent_keys, key=lambda k: k.to_user_string()):
            mapping = graph.get_partition_mapping(key, parent) if node.partitions_def is None else None
            deps[parent.to_user_string()] = (
                f"{type(mapping).__name__}({sorted(mapping.partition_keys)})"
                if isinstance(mapping, dg.SpecificPartitionsPartitionMapping) else None)
        partitions = node.partitions_def
        if isinstance(partitions, dg.MultiPartitionsDefinition):  # period x tile: the tiles are dynamic
            partitions = {d.name: (sorted(d.partitions_def.get_partition_keys())
                                   if isinstance(d.partitions_def, dg.StaticPartitionsDefinition)
                                   else f"dynamic {d.partitions_def.name}") for d in partitions.partitions_defs}
        elif partitions is not None:
            partitions = sorted(partitions.get_partition_keys())
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": deps,
            "partitions": partitions,
            "checks": {c.name: {"blocking": graph.get_check_spec(c).blocking}
                       for c in sorted(node.check_keys, key=lambda c: c.name)},
            "pools": sorted(node.pools or ()),
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in deployment.jobs),
        "schedules": sorted(s.name for s in deployment.schedules),
        "sensors": sorted(s.name for s in deployment.sensors),
    }


def test_the_asset_graph_matches_its_snapshot(deployment):
    """A change to the graph (a key, a dependency, a partition, a check, a group) shows here and in
    the snapshot's diff. After an intended change:
    EOCAUSAL_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/assets/test_definitions.py"""
    current = _snapshot(deployment)
    text = json.dumps(current, indent=1, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), f"no snapshot: run with {UPDATE_ENV}=1 to write {SNAPSHOT}"
    stored = json.loads(SNAPSHOT.read_text())
    changed = sorted(k for k in stored["assets"].keys() | current["assets"].keys()
                     if stored["assets"].get(k) != current["assets"].get(k))
    assert stored == current, (f"the asset graph differs from {SNAPSHOT.name} in {changed[:20]}; if intended, "
                               f"rerun with {UPDATE_ENV}=1 and commit the snapshot")


def test_importing_the_code_location_builds_nothing():
    """No import side effect: no dbt parse (nor any dbt command), nothing built until the location loads."""
    code = ("import subprocess\n"
            "calls, popen = [], subprocess.Popen.__init__\n"
            "def record(self, args, *a, **k):\n"
            "    calls.append(args)\n"
            "    popen(self, args, *a, **k)\n"
            "subprocess.Popen.__init__ = record\n"
            "import assets.definitions, assets.dbt, assets.studies, assets.components\n"
            "from dagster.components.definitions import LazyDefinitions\n"
            "assert isinstance(assets.definitions.defs, LazyDefinitions), type(assets.definitions.defs)\n"
            "dbt = [c for c in calls if 'dbt' in str(c)]\n"
            "assert not dbt, dbt\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _run(tags=None, assets=None, checks=None) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="__ASSET_JOB", tags=tags or {}, asset_selection=frozenset(assets or ()),
                         asset_check_selection=frozenset(checks or ()))


def test_a_run_resolves_its_study_from_its_tag_or_its_assets():
    studies = [DEMO, SEED7]
    assert run_study_name(_run(tags={STUDY_TAG: SEED7}), studies) == SEED7
    assert run_study_name(_run(tags={TILE_STUDY_TAG: SEED7}), studies) == SEED7  # a tile's run
    assert run_study_name(_run(assets=[dg.AssetKey([SEED7, "survey"])]), studies) == SEED7
    check = dg.AssetCheckKey(dg.AssetKey([DEMO, "image_chips"]), "chip_usability")
    assert run_study_name(_run(checks=[check]), studies) == DEMO
    assert run_study_name(_run(), [DEMO]) == DEMO  # a deployment of one (`eocausal run`)
    with pytest.raises(dg.Failure, match="selects assets of 2 studies"):
        run_study_name(_run(assets=[dg.AssetKey([DEMO, "survey"]), dg.AssetKey([SEED7, "survey"])]), studies)
    with pytest.raises(dg.Failure, match="cannot tell which study"):
        run_study_name(_run(), studies)
    with pytest.raises(dg.Failure, match="does not hold"):
        run_study_name(_run(tags={STUDY_TAG: "elsewhere"}), studies)
