"""A multi-process deployment on Postgres gives what `eocausal run` gives (issue 14, items 1 and 5).

One two-period STAC study, `pg_tiles`: 120 units in 6 tiles (`imagery.max_units_per_tile` 40), so
its refresh is 2 + 12 + 2 runs (per period: the survey and embedder; per period and tile: the
tile's chips and embeddings; per period: the merge, the analysis period's with the rest of the
graph). It is materialised:

- in-process: `eocausal run` on a copy of the study folder (its own working folder and SQLite
  instance), in its own process, started first and left running beside the rest;
- by a deployment: a loopback PostgreSQL that the test starts (Debian's postgresql, installed by
  the test if missing), a DAGSTER_HOME whose dagster.yaml has Postgres storage (dagster-postgres,
  `scheme: postgresql+psycopg2`), the queued run coordinator with `max_concurrent_runs: 2`, the
  default run launcher (a process per run), the repository's pools and caps (one study-job run
  per study at a time; tile runs outside that cap, sharing the working folder). `dagster-daemon
  run` runs it, sensors included: a survey wave dropped into the study's landing folder is
  validated and installed by the survey-wave sensor, which requests the refresh's first wave; the
  study's refresh sensor requests the tiles' runs when a period's first wave succeeded, and the
  merges when its tiles did (sensors/refresh.py). Nothing else starts a run.

The catalog is served by a local HTTP server (its own process), so every process names the same
URL (a STAC source's chip keys hash its catalog's location).

A rendezvous at the start of the chips stage (eocausal/faults.py `rendezvous`, two processes)
makes the first two tile runs wait for each other: both succeeding shows two tile runs of one
study alive at once (ordering, not timing).

Checked: every lake file of the imagery (each tile's chips and embeddings and moments, each
period's merged chip index, embeddings and PCA) is byte for byte the in-process run's; the marts
(every table, in full precision, timestamps aside) are the in-process run's; the Postgres
instance holds the 16 runs, successful, with their jobs, partitions and refresh tags.
Not checked: more than one machine, another run launcher (Kubernetes, SLURM), a crash of a run
or of the daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from assets.instance import INSTANCE_CONFIG
from eocausal.faults import RENDEZVOUS_COUNT_ENV, RENDEZVOUS_DIR_ENV, RENDEZVOUS_TIMEOUT_ENV
from eocausal.layout import Layout
from tests.faults.support import file_sha256, marts_digests
from tests.packaging.postgres_deployment import STUDIES_ENV
from tests.packaging.postgres_server import PostgresUnavailable, loopback_postgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PERIODS = ["2019", "2020"]
ANALYSIS_PERIOD = "2020"
STUDY = "pg_tiles"
N_UNITS, MAX_UNITS_PER_TILE = 120, 40
# Safety nets against a hung deployment, not timing assertions.
_WAIT_S = 1200
_RENDEZVOUS_S = 300


def _build_study(root: Path, server_root: Path, catalog_url) -> Path:
    """Study `pg_tiles`: demo-process units, imagery from a static STAC catalog of COGs with two
    periods (two acquisitions), written under ``server_root`` and named by its URL (``catalog_url``)."""
    from tests.assets.conftest import small_study
    from tests.imagery.stac_catalog import COLLECTION, Acquisition, cut_catalog

    study_path = small_study(root, n_units=N_UNITS, seed=5, heterogeneity={"enabled": False})
    doc = yaml.safe_load(study_path.read_text())
    scene = study_path.parent / doc["imagery"]["path"]
    scene = next(scene.glob("*.tif")) if scene.is_dir() else scene
    catalog = cut_catalog(scene, server_root / "catalog", tiles=(2, 2), acquisitions=[
        Acquisition(datetime(2019, 6, 1, 10, tzinfo=timezone.utc), values=lambda d: (d * 0.9).astype(d.dtype)),
        Acquisition(datetime(2020, 6, 1, 10, tzinfo=timezone.utc)),
    ])
    doc["name"] = STUDY
    doc["imagery"] = {"source": "stac", "catalog": catalog_url(catalog), "collection": COLLECTION,
                      "periods": [int(p) for p in PERIODS], "analysis_period": ANALYSIS_PERIOD,
                      "chip_size_px": doc["imagery"].get("chip_size_px", 32), "band_names": ["red", "green", "blue"],
                      "max_units_per_tile": MAX_UNITS_PER_TILE}
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return study_path


def _lake_digests(workdir: Path) -> dict[str, str]:
    """Every imagery file of the lake (tiles' and periods'), by its path under the lake."""
    lake = Layout(workdir).lake
    files = sorted(p for table in ("image_chips", "image_embeddings") for p in (lake / table).rglob("*") if p.is_file())
    return {str(p.relative_to(lake)): file_sha256(p) for p in files}


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
                     # one study-job run per study (working folder) at a time: a second would fail, not
                     # wait; tile runs are outside that cap (they share the folder)
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


def test_a_refresh_fans_tiles_out_on_postgres_and_matches_the_in_process_run(tmp_path, postgres, stac_server):
    import dagster as dg

    from assets.partitions import PERIOD_TAG, REFRESH_TAG, WAVE_TAG

    logs = tmp_path / "logs"
    logs.mkdir()
    server_root, server = stac_server
    study = _build_study(tmp_path / "deployed", server_root, server.url_of)
    survey_file = study.parent / yaml.safe_load(study.read_text())["survey"]["path"]
    tiles = sorted(set(pd.read_parquet(_survey_tiles(study))["tile"]))
    assert len(tiles) == 6, tiles  # quadkey cells split 1 -> 4 until each holds <= 40 units

    # The reference: `eocausal run` on a copy of the study folder (in-process executor, SQLite
    # instance in its working folder), started now and left to run beside the deployment.
    shutil.copytree(study.parent, tmp_path / "reference" / "study")
    reference_work = tmp_path / "reference_work"
    reference = subprocess.Popen([str(BIN / "eocausal"), "run", str(tmp_path / "reference" / "study" / study.name),
                                  "--workdir", str(reference_work)],
                                 env=_clean_env(), cwd=tmp_path, stdout=open(logs / "reference.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)

    # The deployment: Postgres storage, queued runs (2 at once), the default run launcher.
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(_instance_config(postgres), sort_keys=False))
    workdir = tmp_path / "deployed" / "work"
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "tests.packaging.postgres_deployment", "working_directory": str(REPO),
        "location_name": "eocausal_postgres"}}]}))
    rendezvous = tmp_path / "rendezvous"
    env = _clean_env(DAGSTER_HOME=str(home),
                     **{STUDIES_ENV: json.dumps([[str(study), str(workdir)]]),
                        RENDEZVOUS_DIR_ENV: str(rendezvous), RENDEZVOUS_COUNT_ENV: "2",
                        RENDEZVOUS_TIMEOUT_ENV: str(_RENDEZVOUS_S)})
    daemon_log = logs / "daemon.log"
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env=env, cwd=tmp_path,
                              stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    n_runs = len(PERIODS) * (2 + len(tiles))
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            # A survey wave lands (the same units): the sensors do the rest.
            landing = study.parent / "landing"
            landing.mkdir(exist_ok=True)
            shutil.copyfile(survey_file, landing / f"wave1{survey_file.suffix}")
            runs = _wait_for_runs(instance, n_runs, daemon, daemon_log)
            assert len(runs) == n_runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), \
                _failures(instance, runs)
            # Every tile run reached the chips stage in its own process; the first two waited for each other.
            assert len({p.name for p in rendezvous.glob("chips.start.*")}) == len(PERIODS) * len(tiles)

            # The runs: one refresh, its waves in their jobs and partitions.
            [refresh] = {r.tags[REFRESH_TAG] for r in runs}
            assert refresh.startswith("survey-wave:wave1")
            got = sorted((r.tags[WAVE_TAG], r.job_name, r.tags["dagster/partition"]) for r in runs)
            want = sorted([("prepare", f"{STUDY}__refresh_job", p) for p in PERIODS]
                          + [("tile", f"{STUDY}__tiles_job", f"{p}|{t}") for p in PERIODS for t in tiles]
                          + [("merge", f"{STUDY}__study_job", p) for p in PERIODS])
            assert got == want
            assert {r.tags[PERIOD_TAG] for r in runs} == set(PERIODS)
            assert all(("eocausal/study" in r.tags) == (r.job_name != f"{STUDY}__tiles_job") for r in runs)
        assert reference.wait(timeout=_WAIT_S) == 0, (logs / "reference.log").read_text()[-3000:]
    finally:
        _stop_group(daemon)
        if reference.poll() is None:  # the test failed before the reference finished
            _stop_group(reference)

    expected = _lake_digests(reference_work)
    assert len(expected) == len(PERIODS) * (3 * len(tiles) + 3), sorted(expected)
    assert _lake_digests(workdir) == expected
    assert marts_digests(Layout(workdir).warehouse) == marts_digests(Layout(reference_work).warehouse)


def _survey_tiles(study: Path) -> Path:
    """The survey's tiles, as the survey asset assigns them (written beside the test's study)."""
    from eocausal.study import load_study
    from eocausal.survey import load_study_survey

    df, _ = load_study_survey(load_study(study))
    path = study.parent.parent / "tiles.parquet"
    df[["unit_id", "tile"]].to_parquet(path)
    return path
