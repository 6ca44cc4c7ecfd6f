"""The Dagster instance that records every run: `eocausal run`'s as much as `dagster dev`'s.

`eocausal run` records its runs, materialisations, check results and lineage in a persistent
instance, so that they show in the UI and the asset catalog afterwards: the one in
``$DAGSTER_HOME`` when it is set (the deployment's, e.g. `make dev`'s), otherwise
``<working folder>/dagster_home``, one per working folder (`dagster dev` shows it with
``DAGSTER_HOME=<working folder>/dagster_home``). A home without a ``dagster.yaml`` gets
:data:`INSTANCE_CONFIG`, which the repository's ``dagster.yaml`` repeats: the warehouse pool,
no telemetry, and the library's loggers (``eocausal.*``) captured into the run logs.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

DAGSTER_HOME_FOLDER = "dagster_home"

INSTANCE_CONFIG: dict = {
    # DuckDB admits one writing process and, while it writes, no other reader: every asset that
    # opens the warehouse file is in the `duckdb_warehouse` pool, one at a time.
    "concurrency": {"pools": {"default_limit": 1}},
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
