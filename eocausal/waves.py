"""Survey waves that land in a folder (DESIGN §2): each new file is validated; a bad one is
quarantined with its validation report, the newest good one becomes the study's survey.

A wave is a complete survey table in the study's own columns and file format (the suffix of the
study's survey file). Writers drop a wave atomically: write it elsewhere, or as NAME.part, and
rename it into the folder; hidden files and partial names are never read.

Folders (beside study.yaml unless told otherwise)::

    landing/              new waves; accepted waves stay here, the history of the study's waves
    landing/quarantine/   rejected waves, each with <file>.report.json naming rules, rows and units

Validation is the survey suite the ``survey`` asset applies (:func:`eocausal.survey.load_survey`),
so a wave accepted here passes there. Nothing here knows about Dagster: the sensor in
``sensors/survey_waves.py`` decides what is new (its cursor) and calls these functions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from eocausal import atomic
from eocausal.quality import DataQualityError
from eocausal.study import Study, StudyError
from eocausal.survey import SurveyError, load_survey

LANDING_FOLDER = "landing"
QUARANTINE_FOLDER = "quarantine"
# Names a writer uses while a file is still being written.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".filepart", ".swp")


def landing_folder(study: Study) -> Path:
    return study.root.resolve() / LANDING_FOLDER


def file_stamp(path: Path) -> str:
    """Identifies one version of a file in the folder: a rewrite in place gives a new stamp."""
    st = path.lstat()
    return f"{st.st_mtime_ns}:{st.st_size}"


def new_waves(landing: Path, handled: Mapping[str, str]) -> list[Path]:
    """Top-level files in ``landing`` whose (name, stamp) is not in ``handled``, oldest first."""
    if not landing.is_dir():
        return []
    found = []
    for entry in landing.iterdir():
        name = entry.name
        if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
            continue
        if entry.is_dir() and not entry.is_symlink():
            continue  # quarantine/ and anything else an operator keeps here
        if handled.get(name) == file_stamp(entry):
            continue
        found.append(entry)
    return sorted(found, key=lambda p: (p.lstat().st_mtime_ns, p.name))


@dataclass
class WaveCheck:
    """The verdict on one wave file (no side effects made yet)."""

    path: Path
    sha256: str
    accepted: bool
    message: str
    failures: list[dict] = field(default_factory=list)  # rule, column, n_rows, rows, unit_ids
    n_rows: int | None = None
    checked_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def report(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "accepted": self.accepted,
            "checked_at": self.checked_at,
            "n_rows": self.n_rows,
            "message": self.message,
            "failures": self.failures,
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rejected(path: Path, sha: str, rule: str, message: str) -> WaveCheck:
    return WaveCheck(path, sha, False, message,
                     [{"rule": rule, "column": None, "n_rows": 0, "rows": [], "unit_ids": []}])


def check_wave(path: Path, study: Study) -> WaveCheck:
    """Validate one wave against the study's survey contract and the survey suite."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        # A link could pull a file from anywhere into the study.
        return _rejected(path, "", "wave is a regular file",
                         f"{path.name}: not a regular file (links and folders are not read)")
    sha = _sha256(path)
    expected = study.survey_path.suffix.lower()
    if path.suffix.lower() != expected:
        return _rejected(
            path, sha, f"format matches the study's survey file ({expected})",
            f"{path.name}: a wave must have the survey file's format {expected!r}, got {path.suffix or 'no suffix'!r}",
        )
    try:
        df, report = load_survey(path, study.survey, outcome_may_be_missing=study.analysis.outcome_imputation,
                                 folds=study.analysis.folds, max_units_per_tile=study.imagery.max_units_per_tile)
    except DataQualityError as exc:
        meta = exc.report.to_metadata()
        return WaveCheck(path, sha, False, f"{path.name} rejected: {exc}", meta["failures"], exc.report.n_rows)
    except (SurveyError, StudyError) as exc:
        return _rejected(path, sha, "readable survey table", f"{path.name} rejected: {exc}")
    return WaveCheck(path, sha, True, f"{path.name} accepted: {report.message()}", [], len(df))


def _stamp_name(name: str, when: str) -> str:
    compact = when.replace("-", "").replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    return f"{compact}_{name}"


def _write_json_atomic(path: Path, payload: dict) -> None:
    atomic.write_json(path, payload, default=str, indent=2)


def quarantine_wave(check: WaveCheck, landing: Path) -> Path:
    """Move a rejected wave to landing/quarantine/ beside its report; returns the report's path.

    The report is written first, so a crash in between leaves the file in landing/ (looked at
    again on the next scan) rather than a quarantined file without its reason.
    """
    folder = Path(landing) / QUARANTINE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _stamp_name(check.path.name, check.checked_at)
    n = 1
    while target.exists():  # the same name rejected twice within a second keeps both
        n += 1
        target = folder / _stamp_name(f"{n}_{check.path.name}", check.checked_at)
    report_path = target.with_name(target.name + ".report.json")
    _write_json_atomic(report_path, {**check.report(), "quarantined_as": target.name})
    os.replace(check.path, target)
    return report_path


def install_wave(check: WaveCheck, study: Study) -> Path:
    """Make an accepted wave the study's survey file (atomic replace); the wave stays in landing/."""
    if not check.accepted:
        raise ValueError(f"{check.path.name} was not accepted: {check.message}")
    target = study.survey_path
    with atomic.atomic_path(target) as tmp:
        shutil.copyfile(check.path, tmp)
        if _sha256(tmp) != check.sha256:
            raise OSError(f"{check.path.name} changed while it was being installed; it will be checked again")
    return target
