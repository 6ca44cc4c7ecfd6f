"""Kubernetes: deploy/k8s/dagster.yaml is a valid instance, and the Jobs its run launcher makes for a
study's runs are what a cluster should get (rendered offline by dagster-k8s itself, assets/k8s.py).

An embedding run on a GPU asks for one nvidia.com/gpu and tolerates GPU nodes; a chips run from
Earth Engine asks for none; both get the image, the instance's home, the Postgres password from its
secret (never its value), the shared data volume, and `dagster api execute_run` naming their run.
Nothing here contacts a cluster: the Jobs are captured where the launcher would send them.
"""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (pip install 'eocausal[k8s]')")

from dagster._core.instance.config import dagster_instance_config  # noqa: E402

from assets.instance import INSTANCE_CONFIG  # noqa: E402
from assets.k8s import INSTANCE_YAML, launcher_config, main, render_study_run  # noqa: E402
from assets.naming import STUDY_TAG, TILE_STUDY_TAG  # noqa: E402
from assets.run_tags import EARTHENGINE_TAG, GPU_TAG, TAG_CONCURRENCY_LIMITS  # noqa: E402
from eocausal.study import load_study  # noqa: E402
from tests.assets.conftest import small_study  # noqa: E402

PG_PASSWORD = "not-a-real-password-4711"


def _study(root, **sections):
    study_path = small_study(root, n_units=60)
    doc = yaml.safe_load(study_path.read_text())
    for section, values in sections.items():
        doc[section] = values if section == "imagery" else {**doc[section], **values}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return study_path


@pytest.fixture(scope="module")
def gpu_study(tmp_path_factory):
    """GeoTIFF imagery, RCF embeddings on CUDA: its runs embed on a GPU."""
    return _study(tmp_path_factory.mktemp("gpu"), embedding={"device": "cuda"})


@pytest.fixture(scope="module")
def ee_study(tmp_path_factory):
    """Two Earth Engine periods, embeddings on the CPU: its runs fetch chips from Earth Engine."""
    return _study(tmp_path_factory.mktemp("ee"), embedding={"device": "cpu"},
                  imagery={"source": "earthengine", "collection": "landsat8_9_sr", "periods": [2019, 2021],
                           "analysis_period": "2021", "chip_size_px": 32})


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_k8s_instance_file_is_a_valid_instance_with_the_repository_caps(monkeypatch):
    monkeypatch.delenv("DAGSTER_PG_PASSWORD", raising=False)  # validating reads no secret
    config, custom_class = dagster_instance_config(str(INSTANCE_YAML.parent), INSTANCE_YAML.name)
    assert custom_class is None
    assert config["run_launcher"]["module"] == "dagster_k8s" and config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == TAG_CONCURRENCY_LIMITS
    assert config["concurrency"]["pools"] == INSTANCE_CONFIG["concurrency"]["pools"]
    assert {k: config[k] for k in ("telemetry", "python_logs")} == {
        k: INSTANCE_CONFIG[k] for k in ("telemetry", "python_logs")}
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["scheme"] == "postgresql+psycopg2"  # SQLAlchemy 2.1 reads postgresql:// as psycopg 3
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # never a literal in the file
    launcher = launcher_config()
    assert launcher["postgres_password_secret"] and launcher["job_image"]


def test_an_embedding_run_on_a_gpu_asks_for_one_gpu(gpu_study, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PG_PASSWORD)
    run, job = render_study_run(gpu_study, tmp_path / "work")
    assert run.tags[GPU_TAG] == "true" and EARTHENGINE_TAG not in run.tags
    config = launcher_config()
    container = _container(job)
    pod = job["spec"]["template"]["spec"]

    assert job["kind"] == "Job" and job["metadata"]["namespace"] == config["job_namespace"]
    assert job["metadata"]["name"] == f"dagster-run-{run.run_id}"
    assert job["metadata"]["labels"]["dagster/job"] == run.job_name
    assert container["image"] == config["job_image"]
    requests = config["run_k8s_config"]["container_config"]["resources"]["requests"]
    assert container["resources"]["requests"] == requests  # the launcher's, kept under the GPU's
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "16Gi"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["serviceAccountName"] == config["service_account_name"] and pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0


def test_a_gpu_study_s_tile_runs_ask_for_the_gpu(gpu_study, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PG_PASSWORD)
    run, job = render_study_run(gpu_study, tmp_path / "work", tile="0231")
    assert run.tags[GPU_TAG] == "true" and run.job_name.endswith("__tiles_job")
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_tile_run_from_earth_engine_asks_for_no_gpu(ee_study, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PG_PASSWORD)
    name = load_study(ee_study).name
    run, job = render_study_run(ee_study, tmp_path / "work", period="2019", tile="0231")
    assert run.tags[EARTHENGINE_TAG] == "true" and GPU_TAG not in run.tags
    # the tiles job: its own study tag, outside the one-run-per-study cap
    assert run.job_name == f"{name}__tiles_job" and run.tags[TILE_STUDY_TAG] == name and STUDY_TAG not in run.tags
    assert run.tags["dagster/partition"] == "2019|0231"
    container = _container(job)
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert "tolerations" not in pod or not pod["tolerations"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}


@pytest.mark.parametrize("which", ["gpu_study", "ee_study"])
def test_every_run_pod_gets_the_image_home_secret_volume_and_command(which, request, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", PG_PASSWORD)
    run, job = render_study_run(request.getfixturevalue(which), tmp_path / "work")
    config = launcher_config()
    container = _container(job)
    env = _env(container)
    assert env["DAGSTER_HOME"] == config["dagster_home"]
    assert env["DAGSTER_PG_PASSWORD"] == {
        "secretKeyRef": {"name": config["postgres_password_secret"], "key": "postgresql-password"}}
    assert env["DAGSTER_RUN_JOB_NAME"] == run.job_name
    assert env["EOCAUSAL_EE_SERVICE_ACCOUNT_KEY"] == "/var/secrets/earthengine/key.json"
    assert {"configMapRef": {"name": "eocausal-env"}} in container["envFrom"]
    assert {"name": "eocausal-data", "mountPath": "/data"} in container["volumeMounts"]
    assert {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]} == {"eocausal-data", "earthengine-key"}

    args = container["args"]
    assert args[1:5] == ["-m", "dagster", "api", "execute_run"]
    execute = json.loads(args[5])
    assert execute["pipeline_run_id"] == run.run_id
    assert execute["pipeline_origin"]["pipeline_name"] == run.job_name
    assert execute["pipeline_origin"]["repository_origin"]["code_pointer"]["module"] == "assets.definitions"
    # the run pod opens the deployment's instance (Postgres), reading the password from its environment
    ref = execute["instance_ref"]
    assert ref["run_storage_data"]["class_name"] == "PostgresRunStorage"
    assert ref["run_launcher_data"]["class_name"] == "K8sRunLauncher"
    assert "env: DAGSTER_PG_PASSWORD" in ref["run_storage_data"]["config_yaml"]
    assert PG_PASSWORD not in json.dumps(job)


def test_the_command_line_prints_the_job(gpu_study, tmp_path, capsys):
    assert main([str(gpu_study), "--workdir", str(tmp_path / "work")]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "Job"
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"
