"""How `eocausal` reports a rejection or a failure: the reason, an exit code that says what kind of
problem it was (eocausal.failures), the path of a log with the full trace, never a stack trace.

In-process and without the pipeline (a stand-in runner where one is reached); tests/faults/
test_cli_rejections.py drives every kind through the real command in a subprocess.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from eocausal import failures
from eocausal.cli import main
from tests.test_cli import study_folder


def _log_of(err: str) -> Path:
    found = re.search(r"full trace: (\S+\.log)", err)
    assert found, err
    return Path(found.group(1))


def _outcome(study_path, code, errors, traces=()):
    return types.SimpleNamespace(success=False, workdir=Path(study_path).parent / "eocausal_work",
                                 estimates=pd.DataFrame(), metadata={}, errors=errors, failed_checks=[],
                                 log_path=None, exit_code=code, traces=list(traces))


@pytest.fixture
def fake_runner(monkeypatch):
    """assets.runner replaced: returns the outcome a test sets (or raises what it sets)."""
    state = types.SimpleNamespace(outcome=None, raises=None, calls=[])

    def run_study(study_path, workdir=None, **options):
        state.calls.append(study_path)
        if state.raises is not None:
            raise state.raises
        return state.outcome(study_path)

    module = types.ModuleType("assets.runner")
    module.run_study = run_study
    monkeypatch.setitem(sys.modules, "assets.runner", module)
    try:  # the command line finds the orchestration layer by entry point (eocausal.launch)
        import eocausal.launch

        monkeypatch.setattr(eocausal.launch, "find_launcher", lambda: module)
    except ImportError:
        pass
    return state


def _assert_clean(err: str, code_line: int):
    assert "Traceback" not in err and 'File "' not in err
    assert f"exit code {code_line} - " in err
    assert "nothing already published was changed" in err


def test_study_file_rejection_exits_2_with_the_rule_and_a_log(tmp_path, capsys, fake_runner):
    study = study_folder(tmp_path)
    study.write_text(study.read_text().replace("folds: 3", "folds: 1"))
    assert main(["run", str(study)]) == failures.EXIT_INPUT
    err = capsys.readouterr().err
    _assert_clean(err, 2)
    assert "analysis.folds: Input should be greater than or equal to 2" in err
    log = _log_of(err).read_text()
    assert "analysis.folds" in log and "exit code: 2" in log
    assert fake_runner.calls == []


def test_survey_rejection_from_validate_exits_2_with_a_log(tmp_path, capsys):
    study = study_folder(tmp_path, change=lambda df: df.__setitem__("lat", ["north"] + list(df["lat"][1:])))
    assert main(["validate", str(study)]) == failures.EXIT_INPUT
    err = capsys.readouterr().err
    _assert_clean(err, 2)
    assert "survey rejected:" in err and "rule 'lat numeric' failed; on 1 row(s): rows 0" in err
    assert "Traceback (most recent call last)" in _log_of(err).read_text()


def test_imagery_that_does_not_open_is_rejected_before_the_pipeline(tmp_path, capsys, fake_runner):
    study = study_folder(tmp_path)
    (tmp_path / "imagery" / "scene.tif").write_bytes(b"II*\x00 not really a tiff")
    assert main(["run", str(study)]) == failures.EXIT_INPUT
    err = capsys.readouterr().err
    _assert_clean(err, 2)
    assert "imagery rejected:" in err and "scene.tif" in err
    assert fake_runner.calls == []


def test_working_folder_that_is_a_file_exits_3_before_the_pipeline(tmp_path, capsys, fake_runner):
    study = study_folder(tmp_path)
    (tmp_path / "work").write_text("a file")
    assert main(["run", str(study), "--workdir", str(tmp_path / "work")]) == failures.EXIT_WORKDIR
    err = capsys.readouterr().err
    _assert_clean(err, 3)
    first = err.splitlines()[0]
    assert first == (f"eocausal: working folder {tmp_path / 'work'} is a file, not a folder: give the run a "
                     "folder with --workdir (or move the file away)")
    assert fake_runner.calls == []


@pytest.mark.parametrize("fault", ["EROFS", "ENOSPC"])
def test_read_only_or_full_working_folder_exits_3_in_one_line(tmp_path, capsys, fake_runner, monkeypatch, fault):
    study = study_folder(tmp_path)
    monkeypatch.setenv("EOCAUSAL_FS_FAULT", fault)
    assert main(["run", str(study), "--workdir", str(tmp_path / "work")]) == failures.EXIT_WORKDIR
    err = capsys.readouterr().err
    _assert_clean(err, 3)
    assert len(err.strip().splitlines()) == 2  # the reason, then the exit code and the log
    assert f"working folder {tmp_path / 'work'} is " in err
    assert fake_runner.calls == []


@pytest.mark.parametrize("code, errors, words", [
    (failures.EXIT_BUSY, ["another eocausal run (pid 1, started ...) is using the working folder /w: wait"],
     "is using the working folder"),
    (failures.EXIT_WORKDIR, ["survey: working folder /w is out of space: writing /w/lake/survey.parquet failed"],
     "is out of space"),
    (failures.EXIT_CREDENTIALS, ["image_chips: EOCAUSAL_EE_SERVICE_ACCOUNT_KEY names a file that does not exist"],
     "names a file that does not exist"),
    (failures.EXIT_INPUT, ["image_chips: /s/imagery/scene.tif: no CRS (the file is not georeferenced)"],
     "input rejected."),
    (failures.EXIT_FAILED, ["effect_estimates: something broke"], "the run did not complete."),
])
def test_failures_inside_the_run_exit_with_their_kind(tmp_path, capsys, fake_runner, code, errors, words):
    study = study_folder(tmp_path)
    fake_runner.outcome = lambda path: _outcome(path, code, errors, traces=["step x:\nthe whole trace"])
    assert main(["run", str(study)]) == code
    err = capsys.readouterr().err
    _assert_clean(err, code)
    assert words in err
    log = _log_of(err).read_text()
    assert "the whole trace" in log and errors[0] in log


def test_an_unexpected_error_exits_1_without_a_traceback(tmp_path, capsys, fake_runner):
    study = study_folder(tmp_path)
    fake_runner.raises = KeyError("surprise")
    assert main(["run", str(study)]) == failures.EXIT_FAILED
    err = capsys.readouterr().err
    _assert_clean(err, 1)
    assert "unexpected error: KeyError: 'surprise'" in err
    assert "raise state.raises" in _log_of(err).read_text()


def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["run", "--help"], ["validate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "exit codes:" in out
        for code in failures.EXIT_CODES:
            assert re.search(rf"^  {code}\s", out, re.MULTILINE), (argv, code)


def test_a_full_disk_met_by_sqlite_exits_3(tmp_path, capsys, fake_runner):
    import sqlite3

    study = study_folder(tmp_path)
    fake_runner.raises = sqlite3.OperationalError("database or disk is full")
    assert main(["run", str(study)]) == failures.EXIT_WORKDIR
    err = capsys.readouterr().err
    _assert_clean(err, 3)
    assert "is out of space" in err


def test_an_error_in_a_finaliser_goes_to_a_log_not_the_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    study = study_folder(tmp_path)
    assert main(["validate", str(study)]) == 0
    capsys.readouterr()

    def gen():
        try:
            yield 1
        finally:
            yield 2  # a generator that ignores GeneratorExit, as dagster-dbt's did on a full disk

    g = gen()
    next(g)
    del g  # Python reports "Exception ignored in: <generator ...>" through sys.unraisablehook
    import gc

    gc.collect()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err
    logs = list(Path(failures.failure_log_dir(None)).glob("eocausal-*-ignored.log"))
    assert logs and "generator ignored GeneratorExit" in logs[0].read_text()
