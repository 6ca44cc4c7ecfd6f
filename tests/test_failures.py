"""Exit codes, the failure log and the disk faults (eocausal.failures, eocausal.faults.write_point)."""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil

import pytest

import eocausal
from eocausal import failures
from eocausal.faults import FS_FAULT_ENV, FS_FAULT_PATH_ENV, write_point


def _eocausal_classes() -> list[type]:
    for module in pkgutil.walk_packages(eocausal.__path__, "eocausal."):
        if module.name.split(".")[-1].startswith("_") or "triton" in module.name:
            continue
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional extra not installed
            continue

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return [c for c in subclasses(BaseException) if c.__module__.startswith("eocausal")]


def test_every_input_and_credential_error_class_is_classified():
    from eocausal.embed import EmbeddingError
    from eocausal.estimate.transport import TransportError
    from eocausal.imagery.bandfiles import BandFileError
    from eocausal.imagery.geotiff import ImageryError
    from eocausal.quality import DataQualityError
    from eocausal.study import StudyError
    from eocausal.survey import SurveyError

    bases = (StudyError, SurveyError, DataQualityError, ImageryError, BandFileError, EmbeddingError, TransportError,
             failures.InputRejected)
    classes = [c for c in _eocausal_classes() if issubclass(c, bases)]
    assert {"WarehousePathError", "EarthEngineCredentialsError", "BandFileError"} <= {c.__name__ for c in classes}
    wrong = [c.__name__ for c in classes if failures.code_for_names([c.__name__]) == failures.EXIT_FAILED]
    assert wrong == []
    from eocausal.imagery.earthengine import EarthEngineCredentialsError

    assert failures.code_for_names([EarthEngineCredentialsError.__name__]) == failures.EXIT_CREDENTIALS


def test_codes_for_names_and_precedence():
    assert failures.code_for_names(["DagsterExecutionStepExecutionError", "Failure", "DataQualityError"]) == 2
    assert failures.code_for_names(["EarthEngineCredentialsError", "EarthEngineError", "ImageryError"]) == 5
    assert failures.code_for_names(["RuntimeError"]) == 1
    assert failures.worst([]) == 0
    assert failures.worst([1, 2]) == 2
    assert failures.worst([2, 3, 1]) == 3
    assert failures.worst([5, 2]) == 5


def test_exception_names_follow_causes():
    from eocausal.survey import SurveyError

    try:
        try:
            raise SurveyError("bad file")
        except SurveyError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        names = failures.exception_names(outer)
    assert names[0] == "RuntimeError" and "SurveyError" in names and "ValueError" in names
    assert failures.code_for_names(names) == 2


def test_help_lists_every_code():
    text = failures.exit_codes_help()
    for code in failures.EXIT_CODES:
        assert f"  {code} " in text


def test_failure_log_goes_to_an_existing_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(failures.LOG_DIR_ENV, raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        raise ValueError("deep down")
    except ValueError as exc:
        log = failures.write_failure_log(workdir, ["run", "s.yaml"], "survey rejected: rule x", 2, exc=exc)
    assert log.parent == workdir / "logs"
    text = log.read_text()
    assert "eocausal run s.yaml" in text and "survey rejected: rule x" in text and "exit code: 2" in text
    assert "Traceback (most recent call last)" in text and "ValueError: deep down" in text


def test_failure_log_never_creates_a_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(failures.LOG_DIR_ENV, raising=False)
    monkeypatch.setattr(failures.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    log = failures.write_failure_log(tmp_path / "typo" / "work", ["run"], "study file not found", 2)
    assert not (tmp_path / "typo").exists()
    assert log.is_relative_to(tmp_path / "tmp") and "study file not found" in log.read_text()


def test_failure_log_falls_back_when_the_working_folder_refuses_it(tmp_path, monkeypatch):
    monkeypatch.delenv(failures.LOG_DIR_ENV, raising=False)
    monkeypatch.setattr(failures.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "logs").write_text("a file where the logs folder would be")
    log = failures.write_failure_log(workdir, ["run"], "disk full", 3)
    assert log.is_relative_to(tmp_path / "tmp")


def test_failure_log_redacts_credentials_and_keeps_the_newest(tmp_path, monkeypatch):
    monkeypatch.setenv(failures.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setenv("EOCAUSAL_EE_KEY", "sk-very-secret-value-123")
    log = failures.write_failure_log(None, ["run"], "refused with key sk-very-secret-value-123", 5,
                                     traces=["step x:\nsk-very-secret-value-123 in a trace"])
    assert "sk-very-secret-value-123" not in log.read_text() and "[redacted]" in log.read_text()
    for i in range(60):
        (tmp_path / "logs" / f"eocausal-old-{i:03d}.log").write_text("old")
    failures.write_failure_log(None, ["run"], "again", 1)
    assert len(list((tmp_path / "logs").glob("eocausal-*.log"))) == 50


def test_write_point_is_inert_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(FS_FAULT_ENV, raising=False)
    write_point(tmp_path / "x")


def test_write_point_fails_from_the_nth_write_on_and_only_under_the_path(tmp_path, monkeypatch):
    from eocausal import faults

    monkeypatch.setattr(faults, "_writes", faults.Counter())
    monkeypatch.setenv(FS_FAULT_ENV, "ENOSPC@3")
    monkeypatch.setenv(FS_FAULT_PATH_ENV, "cache/chips")
    write_point(tmp_path / "lake" / "survey.parquet")  # not counted
    write_point(tmp_path / "cache/chips/a")
    write_point(tmp_path / "cache/chips/b")
    for name in ("c", "d"):  # the disk stays full
        with pytest.raises(OSError) as caught:
            write_point(tmp_path / "cache/chips" / name)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith(name)
    write_point(tmp_path / "lake" / "survey.parquet")


def test_write_point_refuses_an_unknown_error(monkeypatch, tmp_path):
    monkeypatch.setenv(FS_FAULT_ENV, "EBOGUS")
    with pytest.raises(ValueError, match="ENOSPC"):
        write_point(tmp_path)


def test_disk_problem_reads_errors_and_their_text(tmp_path):
    from eocausal.workdir import disk_problem

    w = tmp_path / "w"
    assert "is out of space: writing" in disk_problem(w, f"[Errno 28] No space left on device: '{w}/lake/s.parquet'")
    assert "is out of space" in disk_problem(w, "[Errno 28] Error writing bytes. Detail: [errno 28] No space left")
    assert "read-only" in disk_problem(w, OSError(errno.EROFS, os.strerror(errno.EROFS), str(w / "lake")))
    # a permission error on an input outside the working folder is not the folder's problem
    assert disk_problem(w, f"[Errno 13] Permission denied: '{tmp_path}/study/imagery/a.tif'") is None
    assert disk_problem(w, "[Errno 2] No such file or directory: 'x'") is None
    assert disk_problem(w, "a message without an errno") is None


def test_a_full_disk_said_without_an_errno_is_recognised(tmp_path, monkeypatch):
    from eocausal import workdir
    from eocausal.workdir import disk_problem

    assert "is out of space" in disk_problem(tmp_path, "(sqlite3.OperationalError) database or disk is full")
    assert "is out of space" in disk_problem(tmp_path, 'IO Error: Could not write "x.duckdb": No space left on device')
    assert "over its disk quota" in disk_problem(tmp_path, "write failed: Disk quota exceeded")
    # a bare I/O error is a full disk only when the working folder's file system is nearly full
    monkeypatch.setattr(workdir, "_nearly_full", lambda folder: False)
    assert disk_problem(tmp_path, "(sqlite3.OperationalError) disk I/O error") is None
    monkeypatch.setattr(workdir, "_nearly_full", lambda folder: True)
    assert "is out of space" in disk_problem(tmp_path, "(sqlite3.OperationalError) disk I/O error")


def test_no_half_written_log_is_left_when_the_disk_is_full(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv(failures.LOG_DIR_ENV, raising=False)
    monkeypatch.setattr(failures.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    real = Path.write_text

    def full_in_workdir(self, *args, **kwargs):
        if self.is_relative_to(workdir):
            real(self, "", encoding="utf-8")
            raise OSError(28, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_in_workdir)
    log = failures.write_failure_log(workdir, ["run"], "disk full", 3)
    assert log.is_relative_to(tmp_path / "tmp")
    assert list((workdir / "logs").glob("eocausal-*.log")) == []
