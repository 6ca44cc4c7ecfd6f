"""The Dagster instance that records every run: `eocausal run`'s as much as `dagster dev`'s.

`eocausal run` records its runs, materialisations, check results and lineage in a persistent
instance, so that they show in the UI and the asset catalog afterwards: the one in
``$DAGSTER_HOME`` when it is set (the deployment's, e.g. `make dev`'s), otherwise
``<working folder>/dagster_home``, one per working folder (`dagster dev` shows it with
``DAGSTER_HOME=<working folder>/dagster_home``). A home without a ``dagster.yaml`` gets
:data:`INSTANCE_CONFIG`, which the repository's ``dagster.yaml`` repeats: the warehouse pool,
the caps on Earth Engine and GPU runs (assets/run_tags.py), no telemetry, and the library's
loggers (``eocausal.*``) captured into the run logs. A home that has a ``dagster.yaml`` keeps it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg
import yaml

from assets.run_tags import TAG_CONCURRENCY_LIMITS
from eocausal.warehouse import process_alive

DAGSTER_HOME_FOLDER = "dagster_home"
# Tags every run of the study job carries once it holds its working folder (assets/resources.py).
WORKDIR_TAG = "eocausal/workdir"
HOST_TAG = "eocausal/host"
PID_TAG = "eocausal/pid"

INSTANCE_CONFIG: dict = {
    # DuckDB admits one writing process and, while it writes, no other reader: every asset that
    # opens the warehouse file is in the `duckdb_warehouse` pool, one at a time.
    # Runs fetching from Earth Engine (2 at once) and embedding on a GPU (1 per GPU: set the limit to
    # the machine's GPUs) are capped across the instance by their tags (assets/run_tags.py).
    "concurrency": {"pools": {"default_limit": 1}, "runs": {"tag_concurrency_limits": TAG_CONCURRENCY_LIMITS}},
    "telemetry": {"enabled": False},
    # The library's module loggers (logging.getLogger("eocausal...")) in each run's logs, INFO and above.
    "python_logs": {"managed_python_loggers": ["eocausal"], "python_log_level": "INFO"},
}


def dagster_home(workdir: str | Path) -> Path:
    """``$DAGSTER_HOME`` when set, else ``<workdir>/dagster_home``."""
    env = os.environ.get("DAGSTER_HOME")
    return Path(env).expanduser().resolve() if env else Path(workdir).resolve() / DAGSTER_HOME_FOLDER


def open_instance(home: str | Path) -> dg.DagsterInstance:
    """The persistent instance in ``home`` (created, with :data:`INSTANCE_CONFIG`, when new)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        tmp = home / f".dagster.yaml.{os.getpid()}"
        tmp.write_text(yaml.safe_dump(INSTANCE_CONFIG, sort_keys=False))
        os.replace(tmp, config)
    return dg.DagsterInstance.from_config(str(home))


def record_holder(instance: dg.DagsterInstance, run_id: str, workdir: Path) -> list[str]:
    """Tag run ``run_id`` as the holder of ``workdir`` (this host and process), and settle the runs
    that held it before and died with it: marked failed, their concurrency slots freed.

    Called by a run once it holds the working folder, so no other live run can be using it: a run
    on the same folder still STARTED whose process (on this host) is gone was killed, and would
    otherwise stay "started" in the UI and keep its warehouse-pool slot forever. Returns the ids of
    the runs settled.
    """
    host = socket.gethostname()
    instance.add_run_tags(run_id, {WORKDIR_TAG: str(workdir), HOST_TAG: host, PID_TAG: str(os.getpid())})
    unfinished = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
    settled = []
    for run in instance.get_runs(dg.RunsFilter(statuses=unfinished, tags={WORKDIR_TAG: str(workdir), HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if run.run_id == run_id or not pid.isdigit() or process_alive(int(pid)):
            continue
        instance.report_run_failed(
            run, f"the process running it (pid {pid}) ended before the run did (killed?); marked failed by "
                 f"run {run_id}, the next to hold the working folder {workdir}")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        settled.append(run.run_id)
    return settled
