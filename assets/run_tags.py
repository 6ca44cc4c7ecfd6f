"""Run tags that cap scarce resources across the deployment: Earth Engine and GPUs.

Every run of a study's job carries, next to ``eocausal/study``, the tags its study calls for
(:func:`study_run_tags`; the job's tags, so schedules, sensors, backfills of the job and launches
from the job's page carry them too):

- ``eocausal/earthengine: "true"`` when the study's imagery comes from Earth Engine
  (``imagery.source: earthengine``): its chips are fetched under the project's quota (about 40
  requests in flight and 100 requests/s per Cloud project), which more runs at once do not raise.
- ``eocausal/gpu: "true"`` when the study embeds on a GPU (``embedding.device: cuda``, or a
  ``backbone`` embedding on ``device: auto``), with ``dagster-k8s/config`` asking Kubernetes for
  one ``nvidia.com/gpu`` (the Kubernetes run launcher reads that tag; every other launcher ignores it).

The instance's run queue caps the tagged runs (``concurrency.runs.tag_concurrency_limits``,
:data:`TAG_CONCURRENCY_LIMITS`, in assets/instance.py INSTANCE_CONFIG, dagster.yaml and
deploy/k8s/dagster.yaml): two Earth Engine runs, one GPU run. The GPU limit is the knob to turn
on a machine or cluster with more GPUs (one run per GPU). The limits act where runs are queued
(``dagster dev``, the daemon); `eocausal run` executes in its own process and is not queued.

A run launched outside the study's job (materialising assets from the asset graph, which runs
Dagster's implicit asset job) does not carry the job's tags, so the caps do not see it.
"""

from __future__ import annotations

import json
from pathlib import Path

from assets.naming import STUDY_TAG  # every study job's runs carry it
from eocausal.study import Study, load_study

EARTHENGINE_TAG = "eocausal/earthengine"
GPU_TAG = "eocausal/gpu"
# Read by dagster-k8s's run launcher (and its k8s_job_executor): merged into the run's pod spec.
K8S_CONFIG_TAG = "dagster-k8s/config"

# Runs fetching from Earth Engine at once: they share one project's quota (eocausal.imagery.earthengine).
EARTHENGINE_RUN_LIMIT = 2
# Runs embedding on a GPU at once: one per GPU. Set it to the number of GPUs of the machine (or
# of the cluster's GPU nodes) in the instance's dagster.yaml.
GPU_RUN_LIMIT = 1

# One run per study at a time: a run holds its study's working folder from start to end
# (eocausal.workdir), so a second run of the same study queued beside it would fail as busy
# instead of waiting. Different studies (working folders) run side by side.

TAG_CONCURRENCY_LIMITS: list[dict] = [
    {"key": EARTHENGINE_TAG, "value": "true", "limit": EARTHENGINE_RUN_LIMIT},
    {"key": GPU_TAG, "value": "true", "limit": GPU_RUN_LIMIT},
    {"key": STUDY_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
]

# What a GPU run adds to the Kubernetes pod of its run (deep-merged onto the launcher's run_k8s_config):
# one GPU as a limit (an extended resource: the request equals the limit) and a toleration of the taint
# GPU node pools usually carry.
GPU_K8S_CONFIG: dict = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def uses_earthengine(spec: Study) -> bool:
    return spec.imagery.source == "earthengine"


def uses_gpu(spec: Study) -> bool:
    """Whether the study's embedding runs on a GPU: asked for (cuda), or a backbone left on auto."""
    embedding = spec.embedding
    return embedding.device == "cuda" or (embedding.method == "backbone" and embedding.device == "auto")


def study_run_tags(study: Study | str | Path) -> dict[str, str]:
    """The tags every run of the study's job carries for the global caps (none for a study that
    neither fetches from Earth Engine nor embeds on a GPU; none for a study file not written yet)."""
    if not isinstance(study, Study):
        if not Path(study).exists():
            return {}
        study = load_study(study)
    tags: dict[str, str] = {}
    if uses_earthengine(study):
        tags[EARTHENGINE_TAG] = "true"
    if uses_gpu(study):
        tags[GPU_TAG] = "true"
        tags[K8S_CONFIG_TAG] = json.dumps(GPU_K8S_CONFIG, sort_keys=True)
    return tags
