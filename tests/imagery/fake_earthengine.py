"""A fake Earth Engine client: real pixels from a local scene, served on the requested grid.

It stands in for :class:`eocausal.imagery.earthengine.EarthEngineApi` at the client boundary.
``compute_pixels`` reprojects a local GeoTIFF (by default the shipped Landsat-8 crop) onto the
requested chip grid and answers with GeoTIFF bytes laid out as Earth Engine's would be: the
composite bands (scaled like Collection-2 surface reflectance), then ``valid``, ``clear_obs`` and
``total_obs``. Faults are injected the way the real client surfaces them: rate limits and
server errors as ``ee.EEException`` raised while handling a ``googleapiclient`` ``HttpError``
(exactly what ``ee.data`` does), timeouts as ``TimeoutError``, and truncated bytes.

Also usable as ``EOCAUSAL_EE_CLIENT=tests.imagery.fake_earthengine:shared_fake`` to run a
whole study through Dagster against it (configure :data:`SHARED` first).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.io import MemoryFile
from pyproj import Transformer

from eocausal.imagery.earthengine import CompositeRecipe, QUALITY_BANDS, grid_transform

DEMO_CROP = Path(__file__).resolve().parents[2] / "eocausal" / "data" / "demo" / "landsat8_itaipu_crop.tif"

# Collection-2 L2 scaling, applied to the crop's DNs so values look like reflectance.
_SCALE, _OFFSET = 0.0000275, -0.2
_OBSERVATIONS = 12  # e.g. monthly acquisitions in a year's period
_CLOUD_BLOCK_M = 900.0  # clouds cover every 7th block of this size, 3 of 12 observations


@dataclass
class Faults:
    """What goes wrong, and how often. Rates are per call; decisions come from a seeded RNG."""

    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    rate_truncated: float = 0.0
    # Calls numbered [start, start + length) (1-based) all answer 429: a burst.
    burst_429: tuple[int, int] | None = None
    # Grids whose translate (x, y) is in this set answer a permanent 400.
    reject_origins: set[tuple[float, float]] = field(default_factory=set)
    # Raise KeyboardInterrupt on this call (1-based): a run stopped midway.
    interrupt_at_call: int | None = None
    # initialize() answers this HTTP status (401: credentials refused, 403: permission denied).
    init_status: int | None = None
    # Earth Engine ids collection_exists() says are not there.
    missing_ids: set[str] = field(default_factory=set)


def http_error(status: int, message: str):
    """The exception ee.data raises for an HTTP error: EEException, with the HttpError as context."""
    import ee
    import httplib2
    from googleapiclient.errors import HttpError

    body = ('{"error": {"code": %d, "message": "%s"}}' % (status, message)).encode()
    try:
        raise HttpError(httplib2.Response({"status": status}), body)
    except HttpError as exc:
        try:
            raise ee.EEException(exc._get_reason())
        except ee.EEException as translated:
            return translated


class FakeEarthEngine:
    """Counts calls; thread-safe; never touches the network."""

    def __init__(self, scene: Path = DEMO_CROP, latency_s: float = 0.0, faults: Faults | None = None, seed: int = 0):
        self.scene = Path(scene)
        self.latency_s = latency_s
        self.faults = faults or Faults()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.calls = 0
        self.answered = 0
        self.initialize_calls = 0
        self.calls_by_origin: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        with rasterio.open(self.scene) as src:
            self._data = src.read()
            self._crs = src.crs
            self._transform = src.transform
        # The scene's DNs and its valid mask (the crop's zero fill is nodata) as one float stack,
        # made once: each call warps only the window its grid needs.
        valid = ~np.all(self._data == 0, axis=0)
        self._stack = np.concatenate([self._data.astype(np.float32), valid[None].astype(np.float32)])

    # -- the client interface -----------------------------------------------------------------

    def initialize(self, *, project, high_volume, timeout_s) -> None:
        with self._lock:
            self.initialize_calls += 1
            self.last_init = {"project": project, "high_volume": high_volume, "timeout_s": timeout_s}
        if self.faults.init_status == 401:
            raise http_error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token")
        if self.faults.init_status == 403:
            raise http_error(403, "Caller does not have required permission to use project fault-matrix")

    def collection_exists(self, ee_id: str) -> bool:
        return ee_id not in self.faults.missing_ids

    def compute_pixels(self, recipe: CompositeRecipe, grid: dict) -> bytes:
        t = grid["affineTransform"]
        origin = (t["translateX"], t["translateY"])
        with self._lock:
            self.calls += 1
            call = self.calls
            self.calls_by_origin[origin] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            roll = self._rng.random()
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            f = self.faults
            if f.interrupt_at_call is not None and call == f.interrupt_at_call:
                raise KeyboardInterrupt("run stopped midway")
            if origin in f.reject_origins:
                raise http_error(400, "Image.select: Pattern 'SR_B9' did not match any bands.")
            if f.burst_429 and f.burst_429[0] <= call < f.burst_429[0] + f.burst_429[1]:
                raise http_error(429, "Too Many Requests: concurrent request quota exceeded")
            # One roll per call, split into bands of probability: each fault is exclusive.
            edge = f.rate_429
            if roll < edge:
                raise http_error(429, "Too Many Requests: concurrent request quota exceeded")
            edge += f.rate_5xx
            if roll < edge:
                raise http_error(503, "The service is currently unavailable.")
            edge += f.rate_timeout
            if roll < edge:
                raise TimeoutError("The read operation timed out")
            payload = self.render(recipe, grid)
            edge += f.rate_truncated
            if roll < edge:
                return payload[: len(payload) // 3]
            with self._lock:
                self.answered += 1
            return payload
        finally:
            with self._lock:
                self.in_flight -= 1

    # -- pixels -------------------------------------------------------------------------------

    def _transformer(self, crs: str) -> Transformer:
        # pyproj transformers are not thread-safe: one per thread and CRS.
        cache = self._local.__dict__.setdefault("transformers", {})
        if crs not in cache:
            cache[crs] = Transformer.from_crs(crs, self._crs.to_wkt(), always_xy=True)
        return cache[crs]

    def render(self, recipe: CompositeRecipe, grid: dict) -> bytes:
        """GeoTIFF bytes of the scene on the grid: bands, valid, clear_obs, total_obs (float32)."""
        width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
        transform: Affine = grid_transform(grid)
        crs = grid["crsCode"]
        n_scene = self._data.shape[0]
        # Nearest-neighbour resampling, as Earth Engine's default: each grid pixel centre is
        # projected into the scene and takes the scene pixel it falls in (0 outside the scene).
        # Over one chip the projection is affine to well under a millimetre: project three
        # corners, interpolate the rest.
        corners_x = [transform.c + transform.a * 0.5, transform.c + transform.a * (width - 0.5), transform.c + transform.a * 0.5]
        corners_y = [transform.f + transform.e * 0.5, transform.f + transform.e * 0.5, transform.f + transform.e * (height - 0.5)]
        sx, sy = self._transformer(crs).transform(corners_x, corners_y)
        inv = ~self._transform
        scene_col = [inv.a * x + inv.b * y + inv.c for x, y in zip(sx, sy)]
        scene_row = [inv.d * x + inv.e * y + inv.f for x, y in zip(sx, sy)]
        u = np.arange(width)[None, :] / max(width - 1, 1)
        v = np.arange(height)[:, None] / max(height - 1, 1)
        col_f = scene_col[0] + u * (scene_col[1] - scene_col[0]) + v * (scene_col[2] - scene_col[0])
        row_f = scene_row[0] + u * (scene_row[1] - scene_row[0]) + v * (scene_row[2] - scene_row[0])
        col = np.floor(col_f).astype(np.int64).ravel()
        row = np.floor(row_f).astype(np.int64).ravel()
        inside = (row >= 0) & (row < self._stack.shape[1]) & (col >= 0) & (col < self._stack.shape[2])
        warped = np.zeros((n_scene + 1, height * width), dtype=np.float32)
        warped[:, inside] = self._stack[:, row[inside], col[inside]]
        warped = warped.reshape(n_scene + 1, height, width)
        dn, seen = warped[:n_scene], warped[n_scene] > 0
        bands = [np.where(seen, dn[j % n_scene] * _SCALE + _OFFSET, 0.0) for j in range(len(recipe.bands))]
        # Cloud blocks in the grid's own coordinates: some chips cloudier than others.
        cols = transform.c + transform.a * (np.arange(width) + 0.5)
        rows = transform.f + transform.e * (np.arange(height) + 0.5)
        block = (np.floor(rows / _CLOUD_BLOCK_M)[:, None] + np.floor(cols / _CLOUD_BLOCK_M)[None, :]) % 7 == 0
        total = np.where(seen, _OBSERVATIONS, 0).astype(np.float32)
        clear = np.where(block, total - 3, total).astype(np.float32)
        stack = np.stack([*bands, seen.astype(np.float32), clear, total]).astype(np.float32)
        assert stack.shape[0] == len(recipe.bands) + len(QUALITY_BANDS)
        with MemoryFile() as mem:
            with mem.open(
                driver="GTiff", width=width, height=height, count=stack.shape[0], dtype="float32",
                crs=crs, transform=transform,
            ) as dst:
                dst.write(stack)
            return mem.read()


# The instance EOCAUSAL_EE_CLIENT=tests.imagery.fake_earthengine:shared_fake hands out.
SHARED: dict[str, FakeEarthEngine] = {}


def shared_fake() -> FakeEarthEngine:
    try:
        return SHARED["client"]
    except KeyError:
        raise RuntimeError("set tests.imagery.fake_earthengine.SHARED['client'] before running the study") from None


def refusing_401() -> FakeEarthEngine:
    """``EOCAUSAL_EE_CLIENT=tests.imagery.fake_earthengine:refusing_401``: credentials refused at initialisation."""
    return FakeEarthEngine(faults=Faults(init_status=401))


def refusing_403() -> FakeEarthEngine:
    """``EOCAUSAL_EE_CLIENT=tests.imagery.fake_earthengine:refusing_403``: permission denied at initialisation."""
    return FakeEarthEngine(faults=Faults(init_status=403))


def answering() -> FakeEarthEngine:
    """``EOCAUSAL_EE_CLIENT=tests.imagery.fake_earthengine:answering``: a fake that accepts everything."""
    return FakeEarthEngine()
