"""Progress of the long stages (chips, embeddings, estimation, dbt), for whoever shows it.

A stage calls :func:`report` as it goes (``report("chips", 300, 1500, "units")``). Nothing is shown
unless a sink is installed: ``eocausal run`` installs :class:`TerminalProgress` when stdout is a
terminal (not under ``--json``), a notebook may install its own. Each stage's start and end are
also logged (logger ``eocausal.progress``, INFO), so they reach Dagster's run logs.

Sinks are process-wide: the steps of an in-process Dagster run report into the same list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` items of ``stage`` (``total`` None: not known in advance)."""

    stage: str
    done: int
    total: int | None
    unit: str = ""
    detail: str = ""

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def text(self) -> str:
        name = f"{self.stage} [{self.detail}]" if self.detail else self.stage
        count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        share = f"({100 * self.done / self.total:.0f}%)" if self.total else ""
        return " ".join(part for part in (f"{name}:", count, self.unit, share) if part)


Sink = Callable[[Progress], None]
_sinks: list[Sink] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int | None = None, unit: str = "", detail: str = "") -> None:
    """Tell the installed sinks that ``done`` of ``total`` ``unit`` of ``stage`` are done.

    Call it with ``done=0`` when the stage starts and with ``done=total`` when it ends; calls in
    between may be as frequent as convenient (sinks throttle).
    """
    event = Progress(stage, int(done), None if total is None else int(total), unit, detail)
    if event.done == 0 or event.finished:
        log.info(event.text())
    with _lock:
        sinks = list(_sinks)
    for sink in sinks:
        try:
            sink(event)
        except Exception:  # a display problem never stops a stage
            log.debug("progress sink failed", exc_info=True)


@contextmanager
def reporting_to(sink: Sink) -> Iterator[Sink]:
    """Install ``sink`` for the duration of the block."""
    with _lock:
        _sinks.append(sink)
    try:
        yield sink
    finally:
        with _lock:
            _sinks.remove(sink)
        close = getattr(sink, "close", None)
        if close is not None:
            close()


class TerminalProgress:
    """One line per stage on a terminal, rewritten in place (``\\r``), at most every ``interval`` s."""

    def __init__(self, stream: TextIO, interval: float = 0.2):
        self.stream = stream
        self.interval = interval
        self._open: tuple[str, str] | None = None  # the (stage, detail) whose line is unfinished
        self._last = 0.0

    def __call__(self, event: Progress) -> None:
        key = (event.stage, event.detail)
        now = time.monotonic()
        if key == self._open and not event.finished and now - self._last < self.interval:
            return
        if self._open is not None and key != self._open:
            self.stream.write("\n")  # another stage began before this one said it ended
        self._last = now
        self.stream.write(f"\r\x1b[K{event.text()}")
        if event.finished:
            self.stream.write("\n")
            self._open = None
        else:
            self._open = key
        self.stream.flush()

    def close(self) -> None:
        if self._open is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._open = None
