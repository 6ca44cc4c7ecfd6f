"""eocausal.faults.rendezvous: processes meet (ordering, not timing); one alone gives up, saying so.

The Postgres deployment test (tests/packaging/test_postgres_backfill.py) uses it to show two runs
alive at once; here the point itself is checked with plain processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eocausal.faults import RENDEZVOUS_COUNT_ENV, RENDEZVOUS_DIR_ENV, RENDEZVOUS_TIMEOUT_ENV, rendezvous

_CALL = "from eocausal.faults import rendezvous; rendezvous('p'); print('met')"


def _env(folder, count: int, timeout_s: float) -> dict[str, str]:
    return {**os.environ, RENDEZVOUS_DIR_ENV: str(folder), RENDEZVOUS_COUNT_ENV: str(count),
            RENDEZVOUS_TIMEOUT_ENV: str(timeout_s)}


def test_inert_without_the_variables(monkeypatch):
    monkeypatch.delenv(RENDEZVOUS_DIR_ENV, raising=False)
    monkeypatch.delenv(RENDEZVOUS_COUNT_ENV, raising=False)
    rendezvous("p")  # returns at once


def test_two_processes_meet(tmp_path):
    # Generous bound: the first process waits for the second to start (interpreter start-up on a busy machine).
    procs = [subprocess.Popen([sys.executable, "-c", _CALL], env=_env(tmp_path, 2, 300), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.strip() == "met" for out, _ in outs)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(f"p.{p.pid}" for p in procs)


def test_one_alone_gives_up_naming_who_came(tmp_path, monkeypatch):
    for name, value in _env(tmp_path, 2, 0.5).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=rf"rendezvous 'p': 1 of 2 processes came .*p\.{os.getpid()}"):
        rendezvous("p")
