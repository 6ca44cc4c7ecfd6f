"""The chip store under kills and concurrent writers: resume without refetching, no truncated files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.imagery import chips as chips_module
from eocausal.imagery.chips import _HOST_TAG, extract_chips, load_chips
from tests.imagery.fake_earthengine import FakeEarthEngine
from tests.imagery.test_earthengine import SIZE, aligned_scene, source, units_grid  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
import pandas as pd
from eocausal.imagery.chips import extract_chips
from tests.imagery.fake_earthengine import FakeEarthEngine
from tests.imagery.test_earthengine import SIZE, source
args = json.loads(sys.argv[1])
units = pd.DataFrame(args["units"])
fake = FakeEarthEngine(args["scene"], latency_s=0.03)
print("started", flush=True)
extract_chips(units, source(fake, max_concurrency=4), SIZE, args["cache"], 0.2)
print("finished", flush=True)
"""


def test_a_killed_chip_run_resumes_without_refetching_or_keeping_partial_files(aligned_scene, tmp_path):
    units = units_grid(100)
    cache = tmp_path / "cache"
    args = json.dumps({"units": units.to_dict("list"), "scene": str(aligned_scene), "cache": str(cache)})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(cache.rglob("*.npz"))) < 25:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child stored too few chips in time"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # no cleanup runs
    finally:
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    stored = {p.name for p in cache.rglob("*.npz")}
    assert 25 <= len(stored) < 100, "the kill must land midway"

    fresh = FakeEarthEngine(aligned_scene)
    resumed = extract_chips(units, source(fresh), SIZE, cache, 0.2)

    assert fresh.calls == 100 - len(stored)  # finished chips are not fetched again
    assert resumed.n_cached == len(stored) and (resumed.index["status"] == "ok").all()
    data, _ = load_chips(resumed.index, cache)  # every chip, old and new, is whole
    assert data.shape == (100, 3, SIZE, SIZE)
    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".npz"]
    assert leftovers == []  # the dead writer's temp files are swept


def test_stale_temp_files_are_swept_but_a_live_writers_are_kept(tmp_path):
    shard = tmp_path / "ab"
    shard.mkdir()
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    dead = shard / f".abcdef.{_HOST_TAG}.{dead_pid}.x1.tmp"
    live = shard / f".abcdef.{_HOST_TAG}.{os.getpid()}.x2.tmp"
    foreign = shard / f".abcdef.0000beef.{dead_pid}.x3.tmp"  # another host: cannot tell, keep
    old_foreign = shard / f".abcdef.0000beef.{dead_pid}.x4.tmp"
    chip = shard / "abcdef.npz"
    for p in (dead, live, foreign, old_foreign, chip):
        p.write_bytes(b"x")
    os.utime(old_foreign, (time.time() - 3 * 86400, time.time() - 3 * 86400))

    assert chips_module._sweep_stale_temp_files(tmp_path) == 2

    assert sorted(p.name for p in shard.iterdir()) == sorted([live.name, foreign.name, chip.name])


def test_concurrent_writers_share_one_store_safely(aligned_scene, tmp_path):
    """Two runs over overlapping units at once: both finish, every chip is whole and fetched once or twice."""
    units = units_grid(80)
    cache = tmp_path / "cache"
    fakes = [FakeEarthEngine(aligned_scene, latency_s=0.002), FakeEarthEngine(aligned_scene, latency_s=0.002)]
    results, errors = {}, []

    def run(k: int, subset: pd.DataFrame) -> None:
        try:
            results[k] = extract_chips(subset, source(fakes[k], max_concurrency=4), SIZE, cache, 0.2)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(0, units.iloc[:60])),
               threading.Thread(target=run, args=(1, units.iloc[20:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(list(cache.rglob("*.npz"))) == 80
    assert fakes[0].calls + fakes[1].calls <= 80 + 40  # the overlap at most twice
    again = extract_chips(units, source(FakeEarthEngine(aligned_scene)), SIZE, cache, 0.2)
    assert again.n_cached == 80
    data, valid = load_chips(again.index, cache)
    assert np.isfinite(data).all() and valid.all()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".npz"]
