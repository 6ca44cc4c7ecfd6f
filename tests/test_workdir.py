"""One `eocausal run` at a time per working folder (eocausal/workdir.py, assets/runner.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eocausal.workdir import LOCK_NAME, WorkdirBusy, exclusive_workdir

REPO = Path(__file__).resolve().parents[1]


def test_a_held_folder_refuses_a_second_holder_and_names_the_first(tmp_path):
    with exclusive_workdir(tmp_path / "w"):
        with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()}.*--workdir"):
            with exclusive_workdir(tmp_path / "w"):
                pass
    with exclusive_workdir(tmp_path / "w"):  # released on exit
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from eocausal.workdir import exclusive_workdir\n"
         "with exclusive_workdir(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            with exclusive_workdir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive_workdir(tmp_path):
                break
        except WorkdirBusy:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_run_study_on_a_busy_folder_stops_before_any_work(tiny_study, tmp_path):
    from assets.runner import run_study

    workdir = tmp_path / "work"
    with exclusive_workdir(workdir):
        outcome = run_study(tiny_study, workdir)
    assert not outcome.success
    assert "another eocausal run" in outcome.errors[0] and str(workdir) in outcome.errors[0]
    assert [p.name for p in workdir.iterdir()] == [LOCK_NAME]  # nothing else written
