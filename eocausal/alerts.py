"""Alert records: one JSON file per failed run, for whoever watches the pipeline.

A record says which run failed, when, what triggered it (survey wave, schedule), and which step
failed with what message. It is written atomically and named by run id, so re-evaluating the
same failure rewrites the same record instead of adding a second one. Messages pass through
:func:`eocausal.credentials.redact`: an alert must never carry a credential.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eocausal import atomic
from eocausal.credentials import redact

ALERTS_FOLDER = "alerts"
_MAX_MESSAGE_CHARS = 4000  # a stack trace does not belong in an alert; its head does


@dataclass
class FailedStep:
    step: str
    message: str


@dataclass
class RunFailureAlert:
    run_id: str
    job: str
    failed_at: str  # ISO 8601, UTC
    message: str
    failed_steps: list[FailedStep] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # the run's eocausal/* tags: what triggered it
    kind: str = "run_failure"

    def to_json(self) -> dict:
        record = asdict(self)
        record["message"] = _clean(self.message)
        record["failed_steps"] = [{"step": s.step, "message": _clean(s.message)} for s in self.failed_steps]
        record["tags"] = {k: redact(str(v)) for k, v in self.tags.items()}
        return record


def _clean(message: str) -> str:
    message = redact(message or "").strip()
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + " [truncated]"
    return message


def alert_path(folder: Path, run_id: str) -> Path:
    safe = "".join(c for c in run_id if c.isalnum() or c in "-_")
    return Path(folder) / f"run_failure_{safe}.json"


def write_alert(folder: Path, alert: RunFailureAlert) -> Path:
    """Write (or rewrite) the alert record of one run; returns its path."""
    path = alert_path(folder, alert.run_id)
    return atomic.write_json(path, alert.to_json(), indent=2, sort_keys=True)


def read_alerts(folder: Path) -> list[dict]:
    """Every alert record in a folder, oldest first."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in Path(folder).glob("run_failure_*.json")]
    return sorted(records, key=lambda r: r.get("failed_at", ""))
