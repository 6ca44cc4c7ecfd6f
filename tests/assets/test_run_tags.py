"""Run tags that cap Earth Engine and GPU runs across the instance (assets/run_tags.py).

A study's job carries the tags its study calls for; the instance every home gets (INSTANCE_CONFIG,
dagster.yaml) caps the tagged runs, and Dagster's run queue reads those caps from it: with two Earth
Engine runs in progress a third waits, with one GPU run a second waits, an untagged run never does.
"""

from __future__ import annotations

import json

import dagster as dg
import yaml
from dagster._utils.tags import TagConcurrencyLimitsCounter

from assets.instance import INSTANCE_CONFIG, open_instance
from assets.naming import STUDY_TAG
from assets.run_tags import (
    EARTHENGINE_TAG,
    GPU_K8S_CONFIG,
    GPU_TAG,
    K8S_CONFIG_TAG,
    TAG_CONCURRENCY_LIMITS,
    study_run_tags,
)
from assets.studies import build_definitions, study_job_name
from eocausal.study import load_study
from tests.assets.conftest import small_study


def _with(study_path, **sections):
    doc = yaml.safe_load(study_path.read_text())
    for section, values in sections.items():
        doc[section] = values if section == "imagery" else {**doc.get(section, {}), **values}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return study_path


def _earthengine(study_path):
    doc = yaml.safe_load(study_path.read_text())
    return _with(study_path, imagery={"source": "earthengine", "collection": "landsat8_9_sr", "periods": [2019, 2021],
                                      "analysis_period": "2021", "chip_size_px": doc["imagery"]["chip_size_px"]})


def test_a_study_is_tagged_for_what_it_uses(tmp_path):
    study_path = small_study(tmp_path, n_units=60)
    assert study_run_tags(study_path) == {}  # GeoTIFF imagery, RCF on device auto
    assert study_run_tags(tmp_path / "not_written_yet.yaml") == {}

    _with(study_path, embedding={"device": "cuda"})
    tags = study_run_tags(study_path)
    assert tags[GPU_TAG] == "true" and EARTHENGINE_TAG not in tags
    assert json.loads(tags[K8S_CONFIG_TAG]) == GPU_K8S_CONFIG
    assert GPU_K8S_CONFIG["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}

    _with(study_path, embedding={"device": "cpu"})
    assert study_run_tags(study_path) == {}
    _earthengine(study_path)
    assert study_run_tags(load_study(study_path)) == {EARTHENGINE_TAG: "true"}


def test_a_backbone_on_auto_is_a_gpu_run_and_on_cpu_is_not(tmp_path):
    study_path = small_study(tmp_path, n_units=60)
    (study_path.parent / "weights.pt").write_bytes(b"")
    _with(study_path, embedding={"method": "backbone", "weights": "weights.pt", "device": "auto"})
    assert study_run_tags(study_path)[GPU_TAG] == "true"
    _with(study_path, embedding={"device": "cpu"})
    assert study_run_tags(study_path) == {}


def test_the_study_job_carries_the_tags(tmp_path):
    study_path = _with(_earthengine(small_study(tmp_path, n_units=60)), embedding={"device": "cuda"})
    name = load_study(study_path).name
    job = build_definitions(study_path, tmp_path / "work").resolve_job_def(study_job_name(name))
    assert job.tags[STUDY_TAG] == name
    assert job.tags[EARTHENGINE_TAG] == "true" and job.tags[GPU_TAG] == "true"
    assert json.loads(job.tags[K8S_CONFIG_TAG]) == GPU_K8S_CONFIG


def test_the_demo_kind_of_study_job_has_only_its_study_tag(tmp_path):
    study_path = small_study(tmp_path, n_units=60)
    name = load_study(study_path).name
    job = build_definitions(study_path, tmp_path / "work").resolve_job_def(study_job_name(name))
    assert {k: v for k, v in job.tags.items() if k.startswith(("eocausal/", "dagster-k8s/"))} == {STUDY_TAG: name}


def _run(**tags) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="study_job", tags={k.replace("__", "/"): v for k, v in tags.items()})


def test_the_instance_queue_caps_earth_engine_and_gpu_runs(tmp_path):
    assert INSTANCE_CONFIG["concurrency"]["runs"]["tag_concurrency_limits"] == TAG_CONCURRENCY_LIMITS
    with open_instance(tmp_path / "home") as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert [dict(limit) for limit in limits] == TAG_CONCURRENCY_LIMITS
    ee, gpu, plain = _run(eocausal__earthengine="true"), _run(eocausal__gpu="true"), _run(eocausal__study="s")

    counter = TagConcurrencyLimitsCounter(list(limits), [ee, ee])
    assert counter.is_blocked(ee) and not counter.is_blocked(gpu) and not counter.is_blocked(plain)
    counter = TagConcurrencyLimitsCounter(list(limits), [ee, gpu])
    assert not counter.is_blocked(ee) and counter.is_blocked(gpu) and not counter.is_blocked(plain)
    assert not counter.is_blocked(_run(eocausal__gpu="false"))
    # one run per study at a time (its working folder): a second waits, another study's does not
    counter = TagConcurrencyLimitsCounter(list(limits), [plain])
    assert counter.is_blocked(_run(eocausal__study="s")) and not counter.is_blocked(_run(eocausal__study="t"))
