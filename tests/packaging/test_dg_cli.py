"""The dg CLI sees the project as a dg project: `dg list defs` lists every declared study's assets,
jobs and sensors, and `dg check defs` passes (what a developer runs before `dg dev`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DG = Path(sys.executable).with_name("dg")


def _dg(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parents[1]), "DAGSTER_DISABLE_TELEMETRY": "true"}
    env.pop("EOCAUSAL_STUDY", None)
    return subprocess.run([str(DG), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not DG.exists() and shutil.which("dg") is None, reason="the dg CLI (dagster-dg-cli, dev extra)")
def test_dg_lists_every_study_and_checks_the_definitions():
    listed = _dg("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout[listed.stdout.index("{"):])
    keys = {a["asset_key"] for a in defs["assets"]}
    for study in ("eocausal_demo", "eocausal_demo_seed7"):
        assert {f"{study}/survey", f"{study}/effect_estimates", f"{study}/marts/effect_estimates"} <= keys
    assert "catalog" in keys
    jobs = {j["name"] for j in defs["jobs"]}
    assert {"eocausal_demo__study_job", "eocausal_demo_seed7__study_job", "catalog_job"} <= jobs
    checked = _dg("check", "defs")
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
