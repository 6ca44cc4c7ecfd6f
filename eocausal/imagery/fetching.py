"""Bounded concurrent fetching, shared by the streaming sources (STAC, Earth Engine).

``as_completed_bounded`` runs ``work(i)`` for every index on a thread pool, keeping at most twice
the pool's size submitted (so a million units are not queued up front), and yields ``(i, result)``
in the order results arrive. However the consumer stops — done, an exception from ``work`` (raised
at the consumer), or an early close — the ``stop`` event is set, queued work is cancelled and the
workers are joined before the generator returns. ``work`` should check ``stop`` between attempts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


def as_completed_bounded(work: Callable[[int], T], n: int, max_concurrency: int, stop: threading.Event,
                         thread_name_prefix: str) -> Iterator[tuple[int, T]]:
    executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=thread_name_prefix)
    pending: dict[Future, int] = {}
    next_index = 0
    try:
        while next_index < n or pending:
            while next_index < n and len(pending) < 2 * max_concurrency:
                pending[executor.submit(work, next_index)] = next_index
                next_index += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                yield i, future.result()  # an error in work propagates from here
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)


def chip_request(points, size_px) -> tuple[list[tuple[float, float]], int]:
    """A remote source's chip request checked and normalised: ((lon, lat) floats, an int size),
    or ValueError for a size that is not a positive integer."""
    if int(size_px) != size_px or size_px < 1:
        raise ValueError(f"size_px must be a positive integer, got {size_px!r}")
    return [(float(lon), float(lat)) for lon, lat in points], int(size_px)
