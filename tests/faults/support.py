"""Shared machinery of the operations suites (crash recovery, read loop, bad input, security).

One small study is run once per session (the baseline: wave 1, published). Each scenario copies
the baseline's study folder and working folder, so scenarios never disturb each other, and
compares what it ends with against the baseline or against the uninterrupted refresh:

- wave 2 = wave 1 plus 40 new units, so a refresh extracts new chips, embeds afresh, adds a
  new estimate version and publishes it;
- the uninterrupted refresh runs `eocausal run` on wave 2 while a reader process queries the
  published warehouse in a loop;
- fake credentials sit in the environment of every run, for the security test to look for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd

from eocausal.faults import CRASH_AT_ENV, CRASH_DIR_ENV
from eocausal.warehouse import query, quote_identifier

N_UNITS = 120
N_NEW_UNITS = 40
ANALYSIS = {"estimators": ["difference_in_means", "ipw", "aipw"], "feature_sets": ["none", "tabular+image"],
            "folds": 3}
ROWS_PER_VERSION = 6  # estimators x feature sets above, one estimand
EOCAUSAL = str(Path(sys.executable).with_name("eocausal"))
READ_LOOP = Path(__file__).with_name("read_loop.py")
# A safety net against a hung subprocess, not a timing assertion.
_PROCESS_LIMIT_S = 900

FAKE_EE_KEY = "fk-ee-3c9d1e7a5b2f48d6a0e4c8b1"
FAKE_PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\\nMIIfakefakefake9b7c5e3a1d2f4\\n-----END PRIVATE KEY-----\\n"
FAKE_PRIVATE_KEY_MARK = "MIIfakefakefake9b7c5e3a1d2f4"


@dataclass
class Baseline:
    root: Path
    study_dir: Path  # wave 1; never run again after the baseline (copy it)
    workdir: Path  # the baseline's working folder, published; never run again (copy it)
    wave2: Path  # the wave-2 survey file
    instance_dir: Path  # storage of the Dagster instance the baseline ran on
    logs: Path  # stdout/stderr of every subprocess run
    secrets: dict[str, str]
    metadata: dict = field(default_factory=dict)
    success: bool = False
    errors: list = field(default_factory=list)

    @property
    def published(self) -> Path:
        return self.workdir / "published" / "warehouse.duckdb"


_state: dict = {}


def secret_env(base: Baseline, **extra: str) -> dict[str, str]:
    env = {**os.environ, **base.secrets, **extra}
    env.update(DBT_SEND_ANONYMOUS_USAGE_STATS="false", GX_ANALYTICS_ENABLED="false", DAGSTER_DISABLE_TELEMETRY="true")
    return env


@contextmanager
def environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def baseline(tmp_path_factory) -> Baseline:
    """Wave 1 run once per session, in-process, on a persistent instance, with fake credentials set."""
    if "baseline" in _state:
        return _state["baseline"]
    from assets.runner import run_study
    from eocausal.simulate import write_demo_study
    from tests.assets.conftest import small_study

    root = tmp_path_factory.mktemp("ops")
    study_path = small_study(root, n_units=N_UNITS, seed=3, analysis=ANALYSIS)
    extra = write_demo_study(root / "extra", n_units=N_NEW_UNITS, seed=9,
                             scene=root / "scene_src" / "scene.tif", chip_size_px=32)
    wave1 = pd.read_csv(study_path.parent / "villages.csv", dtype=str)
    new = pd.read_csv(extra.parent / "villages.csv", dtype=str)
    new["village_code"] = "W2-" + new["village_code"]
    wave2 = root / "wave2.csv"
    pd.concat([wave1, new], ignore_index=True).to_csv(wave2, index=False, lineterminator="\n")

    key_file = root / "secure" / "service-account.json"
    key_file.parent.mkdir()
    key_file.write_text(json.dumps({"type": "service_account", "private_key": FAKE_PRIVATE_KEY,
                                    "client_email": "fake@example.invalid"}))
    secrets = {"EOCAUSAL_EE_KEY": FAKE_EE_KEY, "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY": str(key_file),
               "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}
    base = Baseline(root=root, study_dir=study_path.parent, workdir=root / "base_work", wave2=wave2,
                    instance_dir=root / "dagster_home", logs=root / "logs", secrets=secrets)
    base.logs.mkdir()
    base.instance_dir.mkdir()
    with environment(secrets), dg.DagsterInstance.local_temp(tempdir=str(base.instance_dir)) as instance:
        outcome = run_study(study_path, base.workdir, instance=instance, log_level="INFO")
    base.metadata, base.success, base.errors = outcome.metadata, outcome.success, outcome.errors + outcome.failed_checks
    _state["baseline"] = base
    return base


def scenario(base: Baseline, name: str, wave: int = 1) -> tuple[Path, Path]:
    """A private copy of the baseline's study (with wave 1 or 2 as its survey) and working folder."""
    folder = base.root / "scenarios" / name
    study = folder / "study"
    shutil.copytree(base.study_dir, study, ignore=shutil.ignore_patterns("eocausal_work"))
    if wave == 2:
        shutil.copyfile(base.wave2, study / "villages.csv")
    workdir = folder / "work"
    shutil.copytree(base.workdir, workdir)
    return study / "study.yaml", workdir


def start_run(base: Baseline, study_path: Path, workdir: Path, log_name: str, *extra_args: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """`eocausal run` as its own process group (so that a kill reaches dbt, its child, too)."""
    out = open(base.logs / f"{log_name}.out", "wb")
    err = open(base.logs / f"{log_name}.err", "wb")
    proc = subprocess.Popen([EOCAUSAL, "run", str(study_path), "--workdir", str(workdir), *extra_args],
                            stdout=out, stderr=err, env=env or secret_env(base), start_new_session=True)
    out.close()
    err.close()
    return proc


def finish(proc: subprocess.Popen) -> int:
    return proc.wait(timeout=_PROCESS_LIMIT_S)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_until_crash(base: Baseline, study_path: Path, workdir: Path, point: str, log_name: str) -> dict:
    """Run until the crash point is reached, SIGKILL the whole process group there, and report."""
    crash_dir = base.root / "crash_markers" / log_name
    env = secret_env(base, **{CRASH_AT_ENV: point, CRASH_DIR_ENV: str(crash_dir)})
    proc = start_run(base, study_path, workdir, log_name, env=env)
    marker = crash_dir / f"{point.split('@')[0]}.reached"
    deadline = time.monotonic() + _PROCESS_LIMIT_S
    while not marker.exists():
        if proc.poll() is not None:
            err = (base.logs / f"{log_name}.err").read_text(errors="replace")[-3000:]
            raise AssertionError(f"run ended (rc {proc.returncode}) before reaching {point}:\n{err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"run never reached {point}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    # dbt and anything else the run started were in its group: nothing may survive to write.
    for _ in range(100):
        if not group_alive(proc.pid):
            break
        time.sleep(0.05)
    return {"point": point, "returncode": rc, "pid": int(marker.read_text()), "survivors": group_alive(proc.pid)}


class Reader:
    """The SQL consumer (read_loop.py) as a separate process."""

    def __init__(self, base: Baseline, db: Path, name: str):
        self.stop_file = base.root / "readers" / f"{name}.stop"
        self.result_file = base.root / "readers" / f"{name}.json"
        self.stop_file.parent.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(READ_LOOP), str(db), str(self.stop_file), str(self.result_file)])

    def wait_until_seen(self, n_versions: int) -> None:
        """Until the reader has read a state with n versions (bounded: a safety net, no assertion)."""
        progress = Path(str(self.result_file) + ".progress")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            if progress.exists() and len(json.loads(progress.read_text())) >= n_versions:
                return
            time.sleep(0.05)

    def stop(self) -> dict:
        self.stop_file.write_text("stop")
        self.proc.wait(timeout=120)
        return json.loads(self.result_file.read_text())


def reference_refresh(tmp_path_factory) -> dict:
    """Wave 2 refreshed by an uninterrupted `eocausal run --json`, with a reader looping throughout."""
    if "reference" in _state:
        return _state["reference"]
    base = baseline(tmp_path_factory)
    study_path, workdir = scenario(base, "reference", wave=2)
    published = workdir / "published" / "warehouse.duckdb"
    reader = Reader(base, published, "reference")
    proc = start_run(base, study_path, workdir, "reference", "--json")
    rc = finish(proc)
    reader.wait_until_seen(2)  # the loop also reads after the swap
    reads = reader.stop()
    result = {"study_path": study_path, "workdir": workdir, "returncode": rc, "reads": reads,
              "stdout": (base.logs / "reference.out").read_text(), "stderr": (base.logs / "reference.err").read_text()}
    _state["reference"] = result
    return result


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def estimate_history(db: Path) -> pd.DataFrame:
    """marts.effect_estimates in a stable order."""
    return query(db, "select * from marts.effect_estimates"
                     " order by study, estimate_version, estimand, estimator, feature_set")


def marts_digests(db: Path) -> dict[str, tuple[int, str]]:
    """Every table and view in `marts`: its row count and a digest of its rows, in full precision.

    Timestamp columns (computed_at: when a version was computed) are left out: two computations
    of the same version differ there and nowhere else.
    """
    import duckdb

    digests = {}
    with duckdb.connect(str(db), read_only=True) as con:
        names = [r[0] for r in con.execute(
            "select table_name from information_schema.tables where table_schema = 'marts' order by 1").fetchall()]
        for name in names:
            columns = con.execute(
                "select column_name, data_type from information_schema.columns"
                " where table_schema = 'marts' and table_name = ? order by ordinal_position", [name]).fetchall()
            kept = ", ".join(quote_identifier(c) for c, t in columns if not t.startswith("TIMESTAMP"))
            digests[name] = con.execute(
                f"select count(*), md5(coalesce(string_agg(r, chr(10) order by r), ''))"
                f" from (select (row({kept}))::varchar as r from marts.{quote_identifier(name)})"
            ).fetchone()
    return digests


def assert_same_warehouse(actual: Path, expected: Path) -> None:
    got, want = marts_digests(actual), marts_digests(expected)
    assert set(got) == set(want), (sorted(got), sorted(want))
    differ = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
    assert not differ, f"marts differ (rows, digest) got vs want: {differ}"


def version_counts(db: Path) -> dict[str, int]:
    df = query(db, "select estimate_version, count(*) as n from marts.effect_estimates group by 1")
    return dict(zip(df["estimate_version"], df["n"].astype(int)))
