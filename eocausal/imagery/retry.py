"""One retry policy for every imagery source that fetches over a network.

:class:`RetryPolicy` is exponential backoff with jitter. :func:`call_with_retries` runs one unit of
work (a chip, a search, a header read) under it: an error the caller's ``classify`` calls
``TRANSIENT`` is retried after a backoff, a ``PERMANENT`` one is returned to the caller as
given up, anything else propagates. Every attempt and every retry (by kind) is counted in a
:class:`RetryStats`, so provenance says what a fetch cost.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

T = TypeVar("T")

TRANSIENT = "transient"
PERMANENT = "permanent"
FATAL = "fatal"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits in [d/2, d], d = min(max, initial * 2**k)."""

    max_attempts: int = 10
    initial_delay_s: float = 0.5
    max_delay_s: float = 32.0
    multiplier: float = 2.0

    def delay(self, retry_number: int, rng: random.Random) -> float:
        ceiling = min(self.max_delay_s, self.initial_delay_s * self.multiplier**retry_number)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class RetryStats:
    """Attempts and retries of a fetch, thread-safe; ``retries`` by kind (http_503, timeout, ...)."""

    attempts: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def count_retry(self, kind: str) -> None:
        with self._lock:
            self.retries[kind] = self.retries.get(kind, 0) + 1

    def count_gave_up(self) -> None:
        with self._lock:
            self.gave_up += 1

    def to_metadata(self) -> dict:
        with self._lock:
            return {"attempts": self.attempts, "retries": dict(sorted(self.retries.items())), "gave_up": self.gave_up}


class GaveUp(Exception):
    """A unit of work failed for good: a permanent error, or the last transient one."""

    def __init__(self, message: str, last: BaseException):
        super().__init__(message)
        self.last = last


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    classify: Callable[[BaseException], str | None],
    kind_of: Callable[[BaseException], str],
    describe: Callable[[BaseException], str],
    stats: RetryStats | None = None,
    sleep: Callable[[float], None] | None = None,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``fn()`` under ``policy``; raises :class:`GaveUp` for a permanent error or when attempts run out.

    ``classify`` returns TRANSIENT, PERMANENT, FATAL or None; FATAL and None re-raise the error as
    it is. ``on_retry`` runs before each backoff (e.g. to drop a connection in a bad state).
    """
    rng = rng or random.Random()
    pause = sleep or time.sleep
    last: BaseException | None = None
    for attempt in range(policy.max_attempts):
        if stats is not None:
            stats.count_attempt()
        try:
            return fn()
        except Exception as exc:  # classified below
            kind = classify(exc)
            if kind not in (TRANSIENT, PERMANENT):
                raise
            if kind == PERMANENT:
                if stats is not None:
                    stats.count_gave_up()
                raise GaveUp(describe(exc), exc) from exc
            last = exc
            if stats is not None:
                stats.count_retry(kind_of(exc))
            if on_retry is not None:
                on_retry(exc)
            if attempt + 1 < policy.max_attempts:
                pause(policy.delay(attempt, rng))
    assert last is not None
    if stats is not None:
        stats.count_gave_up()
    raise GaveUp(f"gave up after {policy.max_attempts} attempts; last error {describe(last)}", last) from last
