"""The Kubernetes Job a study's run becomes under dagster-k8s's run launcher, rendered offline.

deploy/k8s/dagster.yaml configures the instance of a Kubernetes deployment: K8sRunLauncher (one
Kubernetes Job per run), Postgres storage, and the run queue's caps on Earth Engine and GPU runs
(assets/run_tags.py). :func:`render_study_run` builds the study's job as the deployment does,
makes the run a schedule or backfill would make for one imagery period, or one tile of it (the
job's tags: the study, the caps, and for a GPU study ``dagster-k8s/config`` asking for an
``nvidia.com/gpu``), and
hands it to the launcher configured from that file, which builds the Job exactly as it would on a
cluster; the Job is captured instead of sent (no cluster is contacted). It needs the ``k8s`` extra::

    pip install "eocausal[k8s]"
    python -m assets.k8s path/to/study.yaml [--period 2021] [--tile 0231 | --prepare] \
        [--instance deploy/k8s/dagster.yaml]

prints the Job as YAML: image, command, environment, resources, volumes, as the cluster would get it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg
import yaml

from assets.partitions import PERIOD_TAG, refresh_job_name, tiles_job_name
from assets.studies import build_definitions, study_job_name, study_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_YAML = PROJECT_ROOT / "deploy" / "k8s" / "dagster.yaml"
# Where the image holds the project (the code location's working directory in a run pod).
IMAGE_PROJECT_ROOT = "/opt/eocausal"
IMAGE_PYTHON = "/usr/local/bin/python"

# A kubeconfig naming a cluster that is never contacted: the launcher loads one when it is built.
_OFFLINE_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "offline", "cluster": {"server": "https://offline.invalid"}}],
    "users": [{"name": "offline", "user": {"token": "unused"}}],
    "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}],
    "current-context": "offline",
}


def _dagster_k8s():
    try:
        import dagster_k8s
    except ImportError as exc:  # an optional part
        raise ImportError("rendering Kubernetes jobs needs dagster-k8s: pip install 'eocausal[k8s]'") from exc
    return dagster_k8s


class _CapturingBatchApi:
    """Stands in for kubernetes' BatchV1Api: keeps the Job the launcher would create."""

    def __init__(self):
        self.jobs: list[tuple[str, object]] = []

    def create_namespaced_job(self, body, namespace, **_kwargs):
        self.jobs.append((namespace, body))
        return body


def launcher_config(instance_yaml: str | Path = INSTANCE_YAML) -> dict:
    """The ``run_launcher`` config of an instance file, checked against K8sRunLauncher's schema
    (defaults filled in; ``{env: ...}`` values read from the environment)."""
    from dagster._config import process_config  # validates and fills defaults, as the instance does

    doc = yaml.safe_load(Path(instance_yaml).read_text())
    launcher = doc.get("run_launcher") or {}
    if (launcher.get("module"), launcher.get("class")) != ("dagster_k8s", "K8sRunLauncher"):
        raise ValueError(f"{instance_yaml}: run_launcher is not dagster_k8s.K8sRunLauncher")
    result = process_config(_dagster_k8s().K8sRunLauncher.config_type(), launcher.get("config") or {})
    if not result.success:
        raise dg.DagsterInvalidConfigError(f"{instance_yaml}: run_launcher config", result.errors, launcher)
    return dict(result.value)


class _AsDeployed:
    """A local instance that hands out the deployment's instance reference (what the run pod's
    command carries: the Postgres storage of the instance file), and records everything else."""

    def __init__(self, instance: dg.DagsterInstance, ref):
        self._instance, self._ref = instance, ref

    def get_ref(self):
        return self._ref

    def __getattr__(self, name):
        return getattr(self._instance, name)


def render_run_job(run: dg.DagsterRun, instance: dg.DagsterInstance, config: Mapping, deployed_ref=None) -> dict:
    """The Kubernetes Job (as the API gets it: camelCase keys) that K8sRunLauncher with ``config``
    creates for ``run``, which must be stored in ``instance``; the run pod's command names
    ``deployed_ref`` as its instance (default: ``instance``'s). Nothing reaches a cluster."""
    dagster_k8s = _dagster_k8s()
    from dagster._core.launcher import LaunchRunContext
    from kubernetes.client import ApiClient

    capture = _CapturingBatchApi()
    recorder = _AsDeployed(instance, deployed_ref or instance.get_ref())
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(_OFFLINE_KUBECONFIG))
        settings = {**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
        launcher = dagster_k8s.K8sRunLauncher(**settings, k8s_client_batch_api=capture)
        launcher.register_instance(recorder)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    (namespace, job), = capture.jobs
    rendered = ApiClient().sanitize_for_serialization(job)
    rendered["metadata"]["namespace"] = namespace
    return rendered


def study_run(study_path: str | Path, workdir: str | Path, period: str | None = None,
              asset_selection: Sequence[dg.AssetKey] | None = None, tile: str | None = None,
              prepare: bool = False) -> dg.DagsterRun:
    """The run the deployment makes of the study's job for one imagery period (default: the
    analysis period; the whole graph unless ``asset_selection``), or of its tiles job for one tile
    of it (``tile``: partition ``<period>|<tile>``), or of its refresh job (``prepare``: a refresh's
    first wave), as a run in a code location loaded from the image (``assets.definitions`` in
    :data:`IMAGE_PROJECT_ROOT`)."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin

    from eocausal.study import load_study

    defs = build_definitions(study_path, workdir)
    name = study_name(study_path)
    job = defs.resolve_job_def(tiles_job_name(name) if tile else refresh_job_name(name) if prepare
                               else study_job_name(name))
    period = period or load_study(study_path).imagery.analysis_period_name()
    partition = f"{period}|{tile}" if tile else period
    origin = JobPythonOrigin(
        job.name,
        RepositoryPythonOrigin(
            executable_path=IMAGE_PYTHON,
            code_pointer=ModuleCodePointer("assets.definitions", "defs", working_directory=IMAGE_PROJECT_ROOT),
        ),
    )
    tags = {**job.tags, "dagster/partition": partition, PERIOD_TAG: period}
    return dg.DagsterRun(job_name=job.name, run_id=str(uuid.uuid4()), tags=tags, job_code_origin=origin,
                         asset_selection=frozenset(asset_selection) if asset_selection else None)


def render_study_run(study_path: str | Path, workdir: str | Path, period: str | None = None,
                     asset_selection: Sequence[dg.AssetKey] | None = None,
                     instance_yaml: str | Path = INSTANCE_YAML, tile: str | None = None,
                     prepare: bool = False) -> tuple[dg.DagsterRun, dict]:
    """(the run, its Kubernetes Job) for one imagery period of the study, or one tile of it (see :func:`study_run`)."""
    from dagster._core.instance.ref import InstanceRef

    instance_yaml = Path(instance_yaml)
    config = launcher_config(instance_yaml)
    run = study_run(study_path, workdir, period, asset_selection, tile, prepare)
    with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.from_config(home) as instance:
        # The deployment's instance as the run pod gets it: validated, {env: ...} values left unread.
        deployed = InstanceRef.from_dir(config["dagster_home"], config_dir=str(instance_yaml.parent),
                                        config_filename=instance_yaml.name)
        instance.add_run(run)
        return run, render_run_job(run, instance, config, deployed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assets.k8s", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="the study file")
    parser.add_argument("--workdir", help="its working folder (default: the study's default)")
    parser.add_argument("--period", help="the imagery period (default: the analysis period)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--prepare", action="store_true",
                       help="a refresh's first run for the period: the survey and the period's embedder")
    which.add_argument("--tile", help="a tile's run (the tiles job): the tile's chips and embeddings")
    parser.add_argument("--instance", default=str(INSTANCE_YAML), help="the instance file (run_launcher)")
    args = parser.parse_args(argv)
    from eocausal.study import default_workdir

    workdir = args.workdir or default_workdir(args.study)
    _, job = render_study_run(args.study, workdir, args.period, None, args.instance, tile=args.tile,
                              prepare=args.prepare)
    yaml.safe_dump(job, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
