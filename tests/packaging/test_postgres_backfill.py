"""A multi-process deployment on Postgres gives what `eocausal run` gives (issue 14, item 5).

On period partitions; tiles will add a dimension: `image_chips` and `image_embeddings` are
partitioned by imagery period only (period x tile does not exist yet).

Two two-period STAC studies (the same survey and the same local static catalog of COGs, two
acquisitions; names `pg_a` and `pg_b`, each with its own working folder) are materialised:

- in-process: `eocausal run` on study `pg_a` (the whole graph, both periods; SQLite instance in
  its working folder), in its own process, started first and left running beside the rest;
- by a deployment: a loopback PostgreSQL that the test starts (Debian's postgresql, installed by
  the test if missing), a DAGSTER_HOME whose dagster.yaml has Postgres storage (dagster-postgres,
  `scheme: postgresql+psycopg2`), the queued run coordinator with `max_concurrent_runs: 2`, the
  default run launcher (a process per run) and the repository's pools and caps, plus one run per
  study at a time (`eocausal/study`, per value): a working folder admits one run
  (eocausal/workdir.py), so a second run of the same study at once would fail (WorkdirBusy)
  rather than wait. `dagster-daemon run` runs it. Two backfills, submitted together: `pg_a`'s
  whole job for its analysis period 2020 (`dagster job backfill`, the SLURM script's command), and
  both periods (2019, 2020) of `pg_b`'s survey and imagery (selected assets, the way the UI
  backfills an asset selection). 3 runs, 2 at once.

The catalog is served by a local HTTP server (its own process), so every process names the same
URL (a STAC source's chip keys hash its catalog's location).

A rendezvous at the start of the chips stage (eocausal/faults.py `rendezvous`, two processes)
makes the first two runs wait for each other: both succeeding shows two runs alive at once
(ordering, not timing). Those two runs are one per study, not two periods of one study (the
working-folder lock above).

Checked: `pg_b`'s lake period files of both periods (chips index, embeddings, PCA) and `pg_a`'s
of the analysis period are byte for byte the in-process run's; `pg_a`'s marts (every table, in
full precision, timestamps aside) are the in-process run's; the Postgres instance holds the
three runs, successful, with their partition, study and backfill tags and asset selections.
Not checked: more than one machine, another run launcher (Kubernetes, SLURM), the schedule and
sensors under the daemon, a crash of a run or of the daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from assets.instance import INSTANCE_CONFIG
from eocausal.faults import RENDEZVOUS_COUNT_ENV, RENDEZVOUS_DIR_ENV, RENDEZVOUS_TIMEOUT_ENV
from eocausal.lake import period_path
from eocausal.layout import Layout
from tests.faults.support import file_sha256, marts_digests
from tests.packaging.postgres_deployment import STUDIES_ENV
from tests.packaging.postgres_server import PostgresUnavailable, loopback_postgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PERIODS = ["2019", "2020"]
ANALYSIS_PERIOD = "2020"
STUDIES = ("pg_a", "pg_b")
# What a run for one imagery period selects (assets/partitions.py PERIOD_RUN_KEYS, under the study's name).
IMAGERY_STAGES = ["survey", "image_chips", "image_embeddings"]
# Safety nets against a hung deployment, not timing assertions.
_WAIT_S = 900
_RENDEZVOUS_S = 300


def _build_study(root: Path, server_root: Path, catalog_url) -> Path:
    """Study `pg_a`: 120 demo-process units, imagery from a static STAC catalog of COGs with two
    periods (two acquisitions), written under ``server_root`` and named by its URL (``catalog_url``)."""
    from tests.assets.conftest import small_study
    from tests.imagery.stac_catalog import COLLECTION, Acquisition, cut_catalog

    study_path = small_study(root, n_units=120, seed=5, heterogeneity={"enabled": False})
    doc = yaml.safe_load(study_path.read_text())
    scene = study_path.parent / doc["imagery"]["path"]
    scene = next(scene.glob("*.tif")) if scene.is_dir() else scene
    catalog = cut_catalog(scene, server_root / "catalog", tiles=(2, 2), acquisitions=[
        Acquisition(datetime(2019, 6, 1, 10, tzinfo=timezone.utc), values=lambda d: (d * 0.9).astype(d.dtype)),
        Acquisition(datetime(2020, 6, 1, 10, tzinfo=timezone.utc)),
    ])
    doc["name"] = STUDIES[0]
    doc["imagery"] = {"source": "stac", "catalog": catalog_url(catalog), "collection": COLLECTION,
                      "periods": [int(p) for p in PERIODS], "analysis_period": ANALYSIS_PERIOD,
                      "chip_size_px": doc["imagery"].get("chip_size_px", 32), "band_names": ["red", "green", "blue"]}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return study_path


def _lake_digests(workdir: Path, periods: list[str]) -> dict[str, str]:
    lake = Layout(workdir).lake
    files = {f"{table}[{p}]{suffix}": period_path(lake, table, p, suffix=suffix)
             for p in periods for table, suffix in (("image_chips", ".parquet"), ("image_embeddings", ".parquet"),
                                                    ("image_embeddings", ".pca.json"))}
    return {name: file_sha256(path) if path.is_file() else "missing" for name, path in files.items()}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DAGSTER_", "EOCAUSAL_RENDEZVOUS", "EOCAUSAL_CRASH", "EOCAUSAL_FS_FAULT"))}
    env.update({"DAGSTER_DISABLE_TELEMETRY": "true", "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "PYTHONPATH": str(REPO), **extra})
    return env


def _instance_config(pg) -> dict:
    limits = INSTANCE_CONFIG["concurrency"]["runs"]["tag_concurrency_limits"]
    return {
        **INSTANCE_CONFIG,
        "concurrency": {
            "pools": INSTANCE_CONFIG["concurrency"]["pools"],
            "runs": {"max_concurrent_runs": 2,
                     # with one run per study (working folder) at a time: a second would fail, not wait
                     "tag_concurrency_limits": limits},
        },
        "run_launcher": {"module": "dagster", "class": "DefaultRunLauncher"},
        "storage": pg.storage_config(),
    }


def _stop_group(proc: subprocess.Popen) -> None:
    """End the process group this test started (the daemon, its code server, any run worker)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (run workers outliving the daemon)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _submit_selected(workspace: Path, env: dict, study: str, partitions: list[str], stages: list[str]):
    """Start adding a backfill of the study's job over ``partitions``, for these stages' assets only."""
    return subprocess.Popen([sys.executable, "-m", "tests.packaging.postgres_deployment", "backfill", str(workspace),
                             f"{study}__study_job", ",".join(partitions), *(f"{study}/{s}" for s in stages)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _backfill_id(proc: subprocess.Popen) -> str:
    """The id of the backfill a submission added (the helper's `backfill-id:`, the CLI's `Launched backfill job`)."""
    out, err = proc.communicate(timeout=600)
    found = re.search(r"backfill-id: (\w+)|Launched backfill job `(\w+)`", out)
    assert proc.returncode == 0 and found, f"{proc.args}: {out[-2000:]}{err[-3000:]}"
    return found.group(1) or found.group(2)


def _wait_for_runs(instance, n: int, daemon: subprocess.Popen, log: Path) -> list:
    """The instance's runs, once there are ``n`` and every one has finished."""
    import dagster as dg

    done = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if len(runs) >= n and all(r.status in done for r in runs):
            return runs
        assert daemon.poll() is None, f"dagster-daemon exited ({daemon.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(2)
    raise AssertionError(f"{n} runs not finished in {_WAIT_S} s: "
                         f"{[(r.run_id[:8], r.tags.get('dagster/partition'), r.status.value) for r in runs]}")


def _failures(instance, runs) -> str:
    text = []
    for run in runs:
        if run.status.value != "SUCCESS":
            errors = [e.dagster_event.event_specific_data for e in instance.all_logs(run.run_id)
                      if e.dagster_event is not None and e.dagster_event.event_type_value in ("STEP_FAILURE",
                                                                                              "RUN_FAILURE")]
            text.append(f"{run.run_id[:8]} {run.tags.get('dagster/partition')}: {errors}")
    return "\n".join(text)


@pytest.fixture(scope="module")
def stac_server(tmp_path_factory):
    """A local HTTP server (its own process) for the studies' STAC catalog: every process reads the same URL."""
    from tests.imagery.http_server import FileServer

    root = tmp_path_factory.mktemp("stac_served")
    with FileServer(root) as server:
        yield root, server


@pytest.fixture(scope="module")
def postgres():
    try:
        with loopback_postgres() as pg:
            yield pg
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot be installed or started here: {exc}")


def test_daemon_backfill_on_postgres_matches_the_in_process_run(tmp_path, postgres, stac_server):
    import dagster as dg

    logs = tmp_path / "logs"
    logs.mkdir()
    server_root, server = stac_server
    study_a = _build_study(tmp_path / "a", server_root, server.url_of)
    # Study pg_b: the same folder (survey; the same catalog URL) under another name.
    shutil.copytree(study_a.parent, tmp_path / "b" / "study")
    study_b = tmp_path / "b" / "study" / "study.yaml"
    doc = yaml.safe_load(study_b.read_text())
    study_b.write_text(yaml.safe_dump({**doc, "name": STUDIES[1]}, sort_keys=False))

    # The reference: `eocausal run` (in-process executor, SQLite instance in its working folder),
    # started now and left to run beside the deployment.
    reference_work = tmp_path / "reference_work"
    reference = subprocess.Popen([str(BIN / "eocausal"), "run", str(study_a), "--workdir", str(reference_work)],
                                 env=_clean_env(), cwd=tmp_path, stdout=open(logs / "reference.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)

    # The deployment: Postgres storage, queued runs (2 at once), the default run launcher.
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(_instance_config(postgres), sort_keys=False))
    workdirs = {STUDIES[0]: tmp_path / "a" / "work", STUDIES[1]: tmp_path / "b" / "work"}
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "tests.packaging.postgres_deployment", "working_directory": str(REPO),
        "location_name": "eocausal_postgres"}}]}))
    rendezvous = tmp_path / "rendezvous"
    env = _clean_env(DAGSTER_HOME=str(home),
                     **{STUDIES_ENV: json.dumps([[str(study_a), str(workdirs[STUDIES[0]])],
                                                 [str(study_b), str(workdirs[STUDIES[1]])]]),
                        RENDEZVOUS_DIR_ENV: str(rendezvous), RENDEZVOUS_COUNT_ENV: "2",
                        RENDEZVOUS_TIMEOUT_ENV: str(_RENDEZVOUS_S)})
    daemon_log = logs / "daemon.log"
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env=env, cwd=tmp_path,
                              stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            a, b = STUDIES
            # Submitted together (each loads the code location, which takes a while): pg_a's whole
            # job for the analysis period (`dagster job backfill`, as deploy/slurm/ runs it), and a
            # backfill of both periods of pg_b's survey and imagery (selected assets).
            whole_job = subprocess.Popen(
                [str(BIN / "dagster"), "job", "backfill", "-w", str(workspace), "-j", f"{a}__study_job",
                 "--partitions", ANALYSIS_PERIOD, "--noprompt"],
                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            selected = _submit_selected(workspace, env, b, PERIODS, IMAGERY_STAGES)
            backfills = {a: _backfill_id(whole_job), b: _backfill_id(selected)}
            runs = _wait_for_runs(instance, 1 + len(PERIODS), daemon, daemon_log)
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), _failures(instance, runs)
            # Every run reached the chips stage in its own process; the first two waited for each other.
            assert len({p.name for p in rendezvous.glob("chips.start.*")}) == len(runs)

            # The Postgres instance holds the runs with their partition, study and backfill tags.
            tags = [(r.tags["eocausal/study"], r.tags["dagster/partition"], r.tags["dagster/backfill"]) for r in runs]
            want = [(a, ANALYSIS_PERIOD, backfills[a])] + [(b, p, backfills[b]) for p in PERIODS]
            assert sorted(tags) == sorted(want)
            for run in runs:  # pg_a's is the whole job; pg_b's select the survey and imagery only
                study = run.tags["eocausal/study"]
                assert run.asset_selection == (None if study == a else {dg.AssetKey([b, k]) for k in IMAGERY_STAGES})
        assert reference.wait(timeout=_WAIT_S) == 0, (logs / "reference.log").read_text()[-3000:]
    finally:
        _stop_group(daemon)
        if reference.poll() is None:  # the test failed before the reference finished
            _stop_group(reference)

    expected = _lake_digests(reference_work, PERIODS)
    assert "missing" not in expected.values(), expected
    assert _lake_digests(workdirs[STUDIES[1]], PERIODS) == expected
    assert _lake_digests(workdirs[STUDIES[0]], [ANALYSIS_PERIOD]) == _lake_digests(reference_work, [ANALYSIS_PERIOD])
    assert marts_digests(Layout(workdirs[STUDIES[0]]).warehouse) == marts_digests(Layout(reference_work).warehouse)
