"""The fault matrix (tests/faults/matrix.py): every case works or is rejected as its row says, with
the exit code and a message naming the rule and where; none prints a traceback or changes the
published warehouse.

The cases share one copy of the baseline working folder (a case that changed anything there would
fail its own before/after comparison). `EOCAUSAL_WRITE_MATRIX=tests/faults/MATRIX.md` writes the
table with what each case did in this session (tests/faults/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from eocausal import faults
from tests.faults import matrix, support

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_workdir(ops):
    _, workdir = support.scenario(ops, "matrix")
    return workdir


@pytest.fixture(scope="module")
def baseline_survey(ops):
    from eocausal.study import load_study
    from eocausal.survey import load_study_survey

    return load_study_survey(load_study(ops.study_dir / "study.yaml"))[0]


def state(workdir: Path) -> dict:
    published = workdir / "published" / "warehouse.duckdb"
    return {
        "published": support.file_sha256(published),
        "history": support.estimate_history(workdir / "warehouse.duckdb"),
        "estimate_files": sorted(p.name for p in (workdir / "lake" / "effect_estimates").glob("*.parquet")),
    }


def assert_unchanged(before: dict, after: dict, case: str) -> None:
    assert after["published"] == before["published"], f"{case} changed the published warehouse"
    pd.testing.assert_frame_equal(after["history"], before["history"])
    assert after["estimate_files"] == before["estimate_files"], case


def _study_for(case: matrix.Case, ops, tmp_path: Path) -> Path:
    study = tmp_path / "study"
    shutil.copytree(ops.study_dir, study, ignore=shutil.ignore_patterns("eocausal_work"))
    if case.build == "wave2":
        shutil.copyfile(ops.wave2, study / matrix.SURVEY)
    elif case.build == "earthengine":
        doc = matrix.study_doc(study)
        doc["imagery"] = {"source": "earthengine", "periods": [2019], "project": "fault-matrix",
                          "chip_size_px": doc["imagery"]["chip_size_px"]}
        matrix.write_doc(study, doc)
    else:
        case.build(study)
    return study


class _ReadOnly:
    """A copy of the working folder that this process cannot create files in."""

    def __init__(self, folder: Path):
        self.folder = folder
        if os.geteuid() != 0:
            folder.chmod(0o555)
            self.undo = lambda: folder.chmod(0o755)
            return
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root without chattr +i here; workdir_read_only_fs injects the same failure")
        self.undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def _workdir_for(case: matrix.Case, shared: Path, tmp_path: Path):
    if case.workdir == "file":
        (tmp_path / "work").write_text("a file where the working folder should be")
        return tmp_path / "work", None
    if case.workdir == "under_file":
        (tmp_path / "f").write_text("a file")
        return tmp_path / "f" / "work", None
    if case.workdir == "read_only":
        copy = tmp_path / "work"
        shutil.copytree(shared, copy)
        return copy, _ReadOnly(copy)
    return shared, None


@pytest.mark.parametrize("case", matrix.CHEAP_CASES, ids=[c.name for c in matrix.CHEAP_CASES])
def test_case(ops, shared_workdir, baseline_survey, matrix_observations, tmp_path, monkeypatch, capsys, case):
    from assets.runner import run_study
    from eocausal.cli import main

    study = _study_for(case, ops, tmp_path)
    server = None
    if case.served is not None:  # imagery over HTTP for this case: the remote-imagery tests' server
        from tests.imagery.http_server import Faults, FileServer

        (tmp_path / "served").mkdir()
        server = FileServer(tmp_path / "served", Faults(**case.served.faults)).start()
        case.served.setup(study, tmp_path / "served", server.url)
    workdir, read_only = _workdir_for(case, shared_workdir, tmp_path)
    watched = workdir if workdir.is_dir() else shared_workdir
    before = state(watched)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(faults, "_writes", faults.Counter())
    capsys.readouterr()
    try:
        if case.via == "run":
            if case.workdir == "locked":
                from eocausal.workdir import exclusive_workdir

                with exclusive_workdir(shared_workdir):
                    code = main(["run", str(study / "study.yaml"), "--workdir", str(workdir)])
            else:
                code = main(["run", str(study / "study.yaml"), "--workdir", str(workdir)])
            message = capsys.readouterr().err
        elif case.via == "validate":
            code = main(["validate", str(study / "study.yaml")])
            out = capsys.readouterr()
            message = out.err or out.out
        else:  # inputs
            outcome = run_study(study / "study.yaml", workdir, inputs_only=True)
            code = outcome.exit_code
            chips = outcome.metadata.get("image_chips", {})
            message = "\n".join(outcome.errors + outcome.failed_checks) if code else (
                f"inputs pass: {chips.get('n_usable')} units usable, {chips.get('n_excluded')} excluded "
                f"{chips.get('excluded_by_reason') or ''}")
    finally:
        if read_only is not None:
            read_only.undo()
        if server is not None:
            server.stop()
    obs = matrix.observation(case, code, message)
    matrix.save_observation(matrix_observations, case, obs)
    (ops.logs / f"matrix_{case.name}.txt").write_text(f"exit {code}\n{message}")

    assert "Traceback" not in message and 'File "' not in message, f"{case.name}: a traceback:\n{message}"
    if case.expected == "works":
        assert code == 0, f"{case.name} was rejected (exit {code}):\n{message}"
        if case.same_survey:
            from eocausal.study import load_study
            from eocausal.survey import load_study_survey

            df = load_study_survey(load_study(study / "study.yaml"))[0]
            pd.testing.assert_frame_equal(df, baseline_survey, check_dtype=False)
    else:
        assert code == case.code, f"{case.name}: exit {code}, expected {case.code}:\n{message}"
        for words in case.words:
            assert words in message, f"{case.name}: {words!r} not in:\n{message}"
        if case.via == "run":
            assert "full trace: " in message
            log = Path(message.rsplit("full trace: ", 1)[1].split()[0])
            assert log.is_file(), log
    assert_unchanged(before, state(watched), case.name)


def test_second_wave_works(reference, matrix_observations):
    [case] = [c for c in matrix.CASES if c.via == "refresh"]
    obs = matrix.observation(case, reference["returncode"], reference["stderr"])
    obs["message"] = f"exit 0; {len(__import__('json').loads(reference['stdout']))} estimate rows printed"
    matrix.save_observation(matrix_observations, case, obs)
    assert reference["returncode"] == 0


def test_at_least_eighty_kinds():
    assert len(matrix.CASES) >= 80
    kinds = {c.kind for c in matrix.CASES}
    assert {matrix.ENC, matrix.NUM, matrix.PQ, matrix.PATHS, matrix.STUDY, matrix.NAMES, matrix.DESIGN, matrix.IMG,
            matrix.WORK} <= kinds
