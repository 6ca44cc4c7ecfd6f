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


# -- a working folder that cannot be used (eocausal.workdir.WorkdirUnusable) ----------------------


def test_a_file_instead_of_the_folder_is_named(tmp_path):
    from eocausal.workdir import WorkdirUnusable

    (tmp_path / "work").write_text("not a folder")
    with pytest.raises(WorkdirUnusable, match=rf"working folder {tmp_path / 'work'} is a file, not a folder"):
        with exclusive_workdir(tmp_path / "work"):
            pass
    with pytest.raises(WorkdirUnusable, match=rf"cannot be created: {tmp_path / 'work'} is a file"):
        with exclusive_workdir(tmp_path / "work" / "inner"):
            pass


@pytest.mark.parametrize("fault, words", [("EROFS", "is read-only (a read-only file system)"),
                                          ("EACCES", "is read-only (permission denied)"),
                                          ("ENOSPC", "is out of space"), ("EDQUOT", "is over its disk quota")])
def test_an_unwritable_folder_is_named_before_any_work(tmp_path, monkeypatch, fault, words):
    from eocausal.workdir import WorkdirUnusable

    monkeypatch.setenv("EOCAUSAL_FS_FAULT", fault)
    with pytest.raises(WorkdirUnusable) as caught:
        with exclusive_workdir(tmp_path / "w"):
            pass
    message = str(caught.value)
    assert f"working folder {tmp_path / 'w'} {words}" in message and "--workdir" in message
    assert "\n" not in message
    assert list((tmp_path / "w").iterdir()) == []  # no lock, no probe left behind


def _make_read_only(folder: Path):
    """A folder this process cannot write into (chmod for a user; root needs the immutable flag)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("root without chattr +i on this file system: the injected faults cover this case")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_really_read_only_folder_is_named(tmp_path):
    from eocausal.workdir import WorkdirUnusable

    folder = tmp_path / "ro"
    folder.mkdir()
    undo = _make_read_only(folder)
    try:
        with pytest.raises(WorkdirUnusable, match=rf"working folder {folder} is read-only"):
            with exclusive_workdir(folder):
                pass
        with pytest.raises(WorkdirUnusable, match=rf"folder {folder} is read-only.*{folder / 'sub'} cannot be created"):
            with exclusive_workdir(folder / "sub"):
                pass
    finally:
        undo()


def _hold_in_child(workdir, role: str):
    """Another process holding ``workdir`` in ``role`` until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from eocausal.workdir import exclusive_workdir\n"
         "with exclusive_workdir(sys.argv[1], role=sys.argv[2]):\n    print('held', flush=True); time.sleep(60)",
         str(workdir), role],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_tile_runs_share_the_folder_and_eocausal_run_excludes_them(tmp_path):
    """Tile runs of one study run side by side, and beside its study-job runs; `eocausal run`
    (role "all") is refused while any of them holds the folder, and refuses them while it runs."""
    workdir = tmp_path / "w"
    tile = _hold_in_child(workdir, "tile")
    try:
        with exclusive_workdir(workdir, role="tile"):  # a second tile run
            pass
        with exclusive_workdir(workdir, role="run"):  # a study-job run (the queue keeps those to one)
            pass
        with pytest.raises(WorkdirBusy, match="a tile run, e.g. pid"):
            with exclusive_workdir(workdir, role="all"):
                pass
    finally:
        tile.kill()
        tile.wait()
    with exclusive_workdir(workdir, role="all"):
        with pytest.raises(WorkdirBusy):
            _locked_elsewhere(workdir, "tile")


def _locked_elsewhere(workdir, role: str) -> None:
    code = ("import sys; from eocausal.workdir import exclusive_workdir\n"
            "with exclusive_workdir(sys.argv[1], role=sys.argv[2]): pass")
    result = subprocess.run([sys.executable, "-c", code, str(workdir), role], cwd=REPO, capture_output=True, text=True)
    if "WorkdirBusy" in result.stderr:
        raise WorkdirBusy(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
