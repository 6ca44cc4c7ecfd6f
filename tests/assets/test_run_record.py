"""Every run on the record: `eocausal run` records into a persistent Dagster instance (assets/instance.py),
and every run of the study job holds its working folder, however it was launched (assets/resources.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.instance import (
    DAGSTER_HOME_FOLDER,
    HOST_TAG,
    INSTANCE_CONFIG,
    PID_TAG,
    WORKDIR_TAG,
    dagster_home,
    open_instance,
    record_holder,
)
from assets.naming import STUDY_TAG, TILE_STUDY_TAG, unprefixed
from assets.partitions import PREPARE_KEYS, keyed, refresh_job_name, tiles_job_name
from assets.studies import study_job_name
from eocausal.faults import CRASH_AT_ENV, CRASH_DIR_ENV
from eocausal.study import load_study
from tests.assets.conftest import small_study

REPO = Path(__file__).resolve().parents[2]
EOCAUSAL = str(Path(sys.executable).with_name("eocausal"))


def test_the_cli_run_is_in_the_instance_in_its_working_folder(e2e_run):
    study_path, outcome = e2e_run
    assert outcome.success
    name = load_study(study_path).name  # the study's assets are keyed under its name, as in a deployment
    home = outcome.workdir / DAGSTER_HOME_FOLDER
    assert outcome.dagster_home == home
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == INSTANCE_CONFIG
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # (other tests run the same study again later in the session: its first runs are the oldest;
        # one tile, one period: the survey and embedder, the tile, the merge and the rest)
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        prepare, tile, run = runs[-1], runs[-2], runs[-3]
        for r in (prepare, run):
            assert r.tags[WORKDIR_TAG] == str(outcome.workdir) and r.tags[PID_TAG].isdigit()
            assert r.tags[STUDY_TAG] == name
        assert prepare.job_name == refresh_job_name(name) and run.job_name == study_job_name(name)
        assert tile.tags[TILE_STUDY_TAG] == name and tile.job_name == tiles_job_name(name) and STUDY_TAG not in tile.tags
        events = [e for r in (prepare, tile, run)
                  for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)]
        assert all(e.dagster_event.asset_key.path[0] == name for e in events)
        mats = {unprefixed(name, e.dagster_event.asset_key).to_user_string(): e.asset_materialization for e in events}
        assert {"survey", "image_chips", "image_embeddings", "effect_estimates", "marts/analysis_units",
                "marts/effect_estimates", "published_warehouse"} <= set(mats)
        # lineage: each materialisation names the versions of what it was computed from
        estimates = mats["effect_estimates"]
        assert estimates.metadata["estimate_version"].value == outcome.metadata["effect_estimates"]["estimate_version"]
        assert any(tag.startswith("dagster/input_data_version/") for tag in estimates.tags)
        assert mats["image_chips"].tags[f"dagster/input_data_version/{name}/survey"] == \
            mats["survey"].tags["dagster/data_version"]
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey([name, "image_chips"]), "chip_usability"), limit=100)
        assert tile.run_id in {c.run_id for c in checks}
        # the library's loggers are in the run's logs (python_logs in the instance config)
        messages = [e.user_message for r in (tile, run) for e in instance.all_logs(r.run_id)]
        assert any(m.startswith("chips: ") for m in messages) and any(m.startswith("estimation: ") for m in messages)


def test_dagster_home_from_the_environment(tmp_path, monkeypatch):
    assert dagster_home(tmp_path / "w") == (tmp_path / "w").resolve() / DAGSTER_HOME_FOLDER
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "deployment"))
    assert dagster_home(tmp_path / "w") == tmp_path / "deployment"
    (tmp_path / "deployment").mkdir()
    (tmp_path / "deployment" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with open_instance(tmp_path / "deployment") as instance:  # the deployment's own settings are kept
        assert instance.managed_python_loggers == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_that_died_holding_the_folder_is_marked_failed_and_its_pool_slot_freed(tmp_path):
    workdir = tmp_path / "work"
    with open_instance(tmp_path / "home") as instance:
        dead, alive, other = (str(uuid.uuid4()) for _ in range(3))
        host = os.uname().nodename
        for run_id, pid, folder in ((dead, _dead_pid(), workdir), (alive, os.getppid(), workdir),
                                    (other, _dead_pid(), tmp_path / "elsewhere")):
            instance.add_run(dg.DagsterRun(job_name="study_job", run_id=run_id, status=dg.DagsterRunStatus.STARTED,
                                           tags={WORKDIR_TAG: str(folder), HOST_TAG: host, PID_TAG: str(pid)}))
        storage = instance.event_log_storage
        storage.set_concurrency_slots("duckdb_warehouse", 1)
        assert storage.claim_concurrency_slot("duckdb_warehouse", dead, "dbt_analysis_models").is_claimed
        current = str(uuid.uuid4())
        instance.add_run(dg.DagsterRun(job_name="study_job", run_id=current, status=dg.DagsterRunStatus.STARTED))

        assert record_holder(instance, current, workdir) == [dead]
        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED  # its process lives
        assert instance.get_run_by_id(other).status == dg.DagsterRunStatus.STARTED  # another folder's
        assert storage.get_concurrency_info("duckdb_warehouse").claimed_slots == []
        tags = instance.get_run_by_id(current).tags
        assert tags[WORKDIR_TAG] == str(workdir) and tags[PID_TAG] == str(os.getpid())


@pytest.fixture
def folder_holder(tmp_path):
    """Another process holding a working folder (as a running `eocausal run` would)."""
    workdir = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from eocausal.workdir import exclusive_workdir\n"
         "with exclusive_workdir(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
         str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield workdir, holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_run_launched_outside_the_cli_holds_the_folder_too(tiny_study, folder_holder, tmp_path):
    from assets.studies import build_definitions

    workdir, holder_pid = folder_holder
    name = load_study(tiny_study).name
    job = build_definitions(str(tiny_study), str(workdir)).resolve_job_def(study_job_name(name))
    assert job.executor_def is dg.in_process_executor  # one process per run: the hold covers it
    # as the UI, a schedule or a sensor would run it: not through the CLI's runner
    with open_instance(tmp_path / "home") as instance:
        busy = job.execute_in_process(instance=instance, partition_key="geotiff", raise_on_error=False,
                                      asset_selection=list(keyed(name, PREPARE_KEYS)))
        assert not busy.success
        failure = next(e for e in busy.all_events if e.is_failure)
        assert f"another eocausal run (pid {holder_pid}" in str(failure.event_specific_data.error)
        assert not (workdir / "lake").exists()


@pytest.mark.slow
def test_a_killed_run_is_settled_by_the_next_which_does_not_wait_for_its_pool_slot(tmp_path):
    """`eocausal run` killed inside dbt (holding the warehouse pool's one slot), then run again."""
    study_path = small_study(tmp_path, n_units=120,
                             analysis={"estimators": ["difference_in_means", "ipw"], "feature_sets": ["none", "image"]})
    crash_dir = tmp_path / "crash"
    env = {**os.environ, CRASH_AT_ENV: "dbt.dbt_analysis_models", CRASH_DIR_ENV: str(crash_dir)}
    killed = subprocess.Popen([EOCAUSAL, "run", str(study_path), "--json"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while not (crash_dir / "dbt.dbt_analysis_models.reached").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its crash point"
        time.sleep(0.5)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()

    env.pop(CRASH_AT_ENV)
    rerun = subprocess.run([EOCAUSAL, "run", str(study_path), "--json"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)
    with dg.DagsterInstance.from_config(str(study_path.parent / "eocausal_work" / DAGSTER_HOME_FOLDER)) as instance:
        runs = list(reversed(instance.get_runs()))  # oldest first: survey + embedder, the tile, the analysis
        ok, failure = dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE
        assert [r.status for r in runs] == [ok, ok, failure, ok, ok, ok]
        failed = runs[2]
        assert "ended before the run did" in next(
            e.message for e in instance.all_logs(failed.run_id) if e.dagster_event and e.dagster_event.is_run_failure)
