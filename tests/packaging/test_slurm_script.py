"""SLURM: deploy/slurm/eocausal-backfill.sbatch writes a valid Dagster instance for its allocation.

Outside SLURM, with EOCAUSAL_PREPARE_ONLY=1 the script writes the instance file and stops: Postgres
storage (psycopg2), the default run launcher, as many runs at once as the allocation's cores allow,
and the repository's caps on Earth Engine and GPU runs. Postgres, the daemon and the backfill
themselves need an allocation (not run here).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from assets.instance import INSTANCE_CONFIG
from assets.run_tags import TAG_CONCURRENCY_LIMITS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "slurm" / "eocausal-backfill.sbatch"


def _prepare(tmp_path: Path, **env) -> dict:
    state = tmp_path / "state"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EOCAUSAL_"))}
    environ.update({"EOCAUSAL_PREPARE_ONLY": "1", "EOCAUSAL_STATE": str(state), **env})
    out = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    home = state / "dagster_home"
    dagster_instance_config(str(home))  # raises unless Dagster would open it (without reading the password)
    return yaml.safe_load((home / "dagster.yaml").read_text())


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_instance_holds_runs_per_core_and_the_caps(tmp_path):
    config = _prepare(tmp_path, SLURM_CPUS_PER_TASK="32", EOCAUSAL_CORES_PER_RUN="4")
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 8
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == TAG_CONCURRENCY_LIMITS
    assert config["concurrency"]["pools"] == INSTANCE_CONFIG["concurrency"]["pools"]
    assert config["run_launcher"] == {"module": "dagster", "class": "DefaultRunLauncher"}
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["scheme"] == "postgresql+psycopg2" and db["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert db["hostname"] == "127.0.0.1"


@pytest.mark.parametrize(("cpus", "per_run", "runs"), [("2", "4", 1), ("16", "1", 16)])
def test_runs_at_once_follow_the_allocation(tmp_path, cpus, per_run, runs):
    config = _prepare(tmp_path, SLURM_CPUS_PER_TASK=cpus, EOCAUSAL_CORES_PER_RUN=per_run,
                      EOCAUSAL_PG_HOST="db.example.org", EOCAUSAL_GPU_RUNS="2")
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == runs
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == "db.example.org"
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "eocausal/gpu", "value": "true", "limit": 2} in limits
