"""A throwaway PostgreSQL server on loopback for the deployment tests: Debian's postgresql.

:func:`loopback_postgres` finds the server's binaries (``/usr/lib/postgresql/<version>/bin``,
installing Debian's ``postgresql`` with apt when they are missing and this process is root),
initialises a cluster in a temporary folder (trust authentication, listening on 127.0.0.1 only,
a free port, its unix socket in the same temporary folder), starts it, creates the database and
stops it (fast shutdown) on exit. ``initdb`` refuses to run as root: as root the server runs as
the ``postgres`` system user the package creates; otherwise as the current user.

It raises :class:`PostgresUnavailable` when PostgreSQL cannot be installed or started; the test
skips on that, saying why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found, installed or started here."""


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    db_name: str

    def storage_config(self) -> dict:
        """The instance's ``storage`` section (dagster-postgres, psycopg2 URL scheme)."""
        return {"postgres": {"postgres_db": {
            "username": self.user, "password": "", "hostname": self.host, "db_name": self.db_name,
            "port": self.port, "scheme": "postgresql+psycopg2"}}}


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _install() -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and this "
                                  "process cannot install it (apt-get as root): apt-get install -y postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def loopback_postgres(db_name: str = "dagster") -> Iterator[Postgres]:
    """A started server with database ``db_name``; stopped, and its folder removed, on exit."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        _install()
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb exists")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no `postgres` system user to run the "
                                      "server as (initdb refuses root)") from None
    root = Path(tempfile.mkdtemp(prefix="eocausal-pg-"))
    data, sock, log = root / "data", root / "socket", root / "server.log"
    sock.mkdir()
    if as_root:
        os.chmod(root, 0o755)
        for path in (root, sock):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    user = "dagster"
    port = _free_port()

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout, cwd=root)

    started = False
    try:
        out = run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        if out.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {out.stderr.strip()[-800:]}")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=100"
        out = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options,
                  "start", timeout=90)
        if out.returncode != 0:
            tail = log.read_text()[-800:] if log.exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {out.stderr.strip()[-400:]} {tail}")
        started = True
        out = run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db_name)
        if out.returncode != 0:
            raise PostgresUnavailable(f"createdb failed: {out.stderr.strip()[-400:]}")
        yield Postgres("127.0.0.1", port, user, db_name)
    finally:
        if started:
            out = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
            if out.returncode != 0:  # last resort: the postmaster's own pid, nothing else
                pid_file = data / "postmaster.pid"
                if pid_file.exists():
                    try:
                        os.kill(int(pid_file.read_text().split()[0]), 9)
                        time.sleep(1)
                    except (OSError, ValueError):
                        pass
        shutil.rmtree(root, ignore_errors=True)
