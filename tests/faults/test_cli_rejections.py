"""Each kind of rejection through the real `eocausal` command, as a user meets it (a subprocess):
study file, survey, imagery (before and inside the graph), working folder (a file, a full disk),
the working-folder lock, Earth Engine credentials.

Each must print the rule and where, then the exit code and the path of a log holding the full
trace; no traceback on the terminal; the exit code of its kind (eocausal.failures); and the
published warehouse byte-for-byte as it was.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults import matrix, support

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(ops):
    _, folder = support.scenario(ops, "cli_rejections")
    return folder


def _earthengine(study: Path) -> None:
    doc = matrix.study_doc(study)
    doc["imagery"] = {"source": "earthengine", "periods": [2019], "project": "cli-rejections", "chip_size_px": 32}
    matrix.write_doc(study, doc)


KINDS = [
    # (kind, how the study changes, extra environment, --workdir ("shared" or "file"), exit code, words)
    ("study_file", matrix.study_text(lambda t: t.replace("covariates:", "covariates: [oops")), {}, "shared", 2,
     ["study.yaml: not valid YAML", "line"]),
    ("survey", lambda s: matrix.rewrite(s, matrix.set_cell("asset_index", [5], "high")), {}, "shared", 2,
     ["survey rejected", "rule 'outcome numeric' failed", "rows 5", "'high'"]),
    ("imagery_before_the_graph", lambda s: matrix.scene(s).write_text("not an image\n"), {}, "shared", 2,
     ["imagery rejected", "scene.tif", "not a TIFF"]),
    ("imagery_in_the_graph", matrix.rewrite_scene(data=lambda a: a * 0), {}, "shared", 2,
     ["input rejected.", "chip_usability", "nodata_share_above_max", "rows 0, 1, 2"]),
    ("working_folder_a_file", lambda s: None, {}, "file", 3, ["is a file, not a folder", "--workdir"]),
    ("working_folder_full", lambda s: None, {"EOCAUSAL_FS_FAULT": "ENOSPC", "EOCAUSAL_FS_FAULT_PATH": "/lake/"},
     "shared", 3, ["survey: working folder", "is out of space", "lake/survey.parquet"]),
    ("lock", lambda s: None, {}, "locked", 4, ["another eocausal run", "is using the working folder"]),
    ("credentials", _earthengine, {"EOCAUSAL_EE_SERVICE_ACCOUNT_KEY": "/nonexistent/key.json"}, "shared", 5,
     ["EOCAUSAL_EE_SERVICE_ACCOUNT_KEY names a file that does not exist"]),
]


@pytest.mark.parametrize("kind, change, env, where, code, words", KINDS, ids=[k[0] for k in KINDS])
def test_each_kind_of_rejection_through_the_command(ops, workdir, tmp_path, kind, change, env, where, code, words):
    from eocausal.workdir import exclusive_workdir

    study = tmp_path / "study"
    shutil.copytree(ops.study_dir, study, ignore=shutil.ignore_patterns("eocausal_work"))
    change(study)
    target = workdir
    if where == "file":
        target = tmp_path / "work"
        target.write_text("a file")
    published_sha = support.file_sha256(workdir / "published" / "warehouse.duckdb")
    command = [support.EOCAUSAL, "run", str(study / "study.yaml"), "--workdir", str(target)]
    run_env = support.secret_env(ops, EOCAUSAL_LOG_DIR="", **env)
    if where == "locked":
        with exclusive_workdir(workdir):
            done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600)
    else:
        done = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600)
    (ops.logs / f"cli_rejection_{kind}.err").write_text(done.stderr)

    err = done.stderr
    assert done.returncode == code, f"{kind}: exit {done.returncode}:\n{err}"
    assert "Traceback" not in err and 'File "' not in err, f"{kind}: a traceback on the terminal:\n{err}"
    assert done.stdout == ""
    for text in words:
        assert text in err, f"{kind}: {text!r} not in:\n{err}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"eocausal: exit code {code} - ") and "nothing already published was changed" in last
    log = Path(re.search(r"full trace: (\S+\.log)$", last).group(1))
    assert log.is_file()
    assert "trace:" in log.read_text() and str(study / "study.yaml") in log.read_text()
    if where != "file":
        assert log.parent == workdir / "logs"  # the working folder exists: its logs folder holds the trace
    assert support.file_sha256(workdir / "published" / "warehouse.duckdb") == published_sha
