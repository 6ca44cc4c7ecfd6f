"""Earth Engine retries at the HTTP layer: earthengine-api's real request path, a fake transport.

:class:`EarthEngineApi` initialises the real ``ee`` package with a fake httplib2-style transport
that answers discovery and the algorithm list from the documents earthengine-api ships for its
own tests, and computePixels with real pixels (the fake client's renderer) or a 429 storm. The
attempts per chip are counted on the wire: with ``ee``'s retries off, each of our attempts is one
HTTP request, so the fetch statistics see every 429; with ``ee``'s default 5 retries (the old
behaviour) each attempt of ours hid up to 6 requests.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from pathlib import Path

import httplib2
import pytest

from eocausal.imagery import earthengine as eem
from eocausal.imagery.earthengine import CompositeRecipe, EarthEngineApi, EarthEngineSource
from eocausal.imagery.retry import RetryPolicy
from eocausal.imagery.sources import ChipFailure
from tests.imagery.fake_earthengine import FakeEarthEngine

pytestmark = pytest.mark.ee_http

RECIPE = CompositeRecipe(collection="landsat8_sr", ee_ids=("LANDSAT/LC08/C02/T1_L2",), bands=("SR_B2", "SR_B3", "SR_B4"),
                         scale=0.0000275, offset=-0.2, mask="landsat_qa_pixel", start="2020-01-01", end="2021-01-01")
# Points inside the demo crop (lon, lat).
POINTS = [(-54.62, -25.30), (-54.60, -25.32), (-54.58, -25.28), (-54.64, -25.35), (-54.61, -25.40)]


class FakeTransport:
    """httplib2.Http's ``request`` interface; computePixels answers 429 while ``storm(n)`` says so,
    n = the how-many-th request for that chip (1-based)."""

    def __init__(self, storm):
        import ee

        tests = Path(ee.__file__).parent / "tests"
        self._discovery = (tests / "cloud_api_discovery_document.json").read_bytes()
        self._algorithms = (tests / "algorithms.json").read_bytes()
        self._renderer = FakeEarthEngine()
        self._storm = storm
        self._lock = threading.Lock()
        self.per_chip: Counter = Counter()
        self.statuses: Counter = Counter()
        self.timeout = None
        self.connections = {}

    def request(self, uri, method="GET", body=None, headers=None, redirections=5, connection_type=None):
        if "$discovery/rest" in uri:
            return self._answer(200, self._discovery)
        if "/algorithms" in uri:
            return self._answer(200, self._algorithms)
        if ":computePixels" in uri:
            grid = json.loads(body)["grid"]
            key = (grid["affineTransform"]["translateX"], grid["affineTransform"]["translateY"])
            with self._lock:
                self.per_chip[key] += 1
                n = self.per_chip[key]
            if self._storm(n):
                body = b'{"error": {"code": 429, "message": "Too many concurrent aggregations.", ' \
                       b'"status": "RESOURCE_EXHAUSTED"}}'
                return self._answer(429, body)
            return self._answer(200, self._renderer.render(RECIPE, grid), "image/tiff")
        return self._answer(404, b'{"error": {"code": 404, "message": "not found"}}')

    def _answer(self, status, content, ctype="application/json"):
        with self._lock:
            self.statuses[status] += 1
        return httplib2.Response({"status": status, "content-type": ctype}), content


@pytest.fixture
def fake_credentials(monkeypatch):
    from google.oauth2.credentials import Credentials

    monkeypatch.setattr(eem, "load_credentials", lambda: (Credentials(token="fake-token"), "fake-project"))


def run(storm, *, ee_max_retries: int = 0, max_attempts: int = 10):
    transport = FakeTransport(storm)
    api = EarthEngineApi(http_transport=transport, ee_max_retries=ee_max_retries)
    source = EarthEngineSource(RECIPE, "2020", api, scale_m=30.0, max_concurrency=2,
                               retry=RetryPolicy(max_attempts=max_attempts), sleep=lambda s: None, seed=0)
    chips = source.read_chips(POINTS, 16)
    return chips, source.stats, transport, api


def test_attempts_per_chip_under_a_429_storm_are_ours_and_all_counted(fake_credentials, monkeypatch):
    # Each chip's first 4 requests answer 429, the 5th its pixels.
    chips, stats, transport, api = run(lambda n: n <= 4)
    assert all(c is not None and not isinstance(c, ChipFailure) for c in chips)
    assert sorted(transport.per_chip.values()) == [5] * len(POINTS)  # on the wire: 5 per chip
    assert stats.requests == 5 * len(POINTS)  # ours: the same 5 per chip
    assert stats.retries == {"http_429": 4 * len(POINTS)}  # every 429 counted
    assert stats.http["compute_pixels"] == 5 * len(POINTS)
    assert stats.http["by_status"]["429"] == 4 * len(POINTS) == transport.statuses[429]
    # The chips are the fake's pixels through the real decoding path.
    assert chips[0].data.shape == (3, 16, 16) and chips[0].valid.any()


def test_a_storm_that_never_ends_costs_max_attempts_per_chip_not_six_times_that(fake_credentials, monkeypatch):
    chips, stats, transport, _ = run(lambda n: True, max_attempts=10)
    assert all(isinstance(c, ChipFailure) and "gave up after 10 attempts" in c.detail for c in chips)
    assert sorted(transport.per_chip.values()) == [10] * len(POINTS)
    assert stats.requests == stats.http["compute_pixels"] == 10 * len(POINTS)
    assert stats.retries == {"http_429": 10 * len(POINTS)} and stats.failed == len(POINTS)

    # The old stacking, for the record: ee's default 5 retries inside each of our attempts.
    import time

    monkeypatch.setattr(time, "sleep", lambda s: None)  # googleapiclient's own backoff
    monkeypatch.setattr(random, "random", lambda: 0.0)
    chips, stats, transport, _ = run(lambda n: True, ee_max_retries=5, max_attempts=10)
    assert sorted(transport.per_chip.values()) == [60] * len(POINTS)  # 10 x (1 + 5) per chip
    assert stats.requests == 10 * len(POINTS)  # our count saw a sixth of them ...
    assert stats.http["compute_pixels"] == 60 * len(POINTS)  # ... the wire count sees them all
