"""Earth Engine imagery: a cloud-free median composite per period, fetched one chip per unit.

For each unit the chip is a fixed grid: ``chip_size_px`` square pixels of ``scale_m`` metres in
the study's CRS (by default the unit's own UTM zone), aligned to multiples of ``scale_m`` from the
CRS origin, with the unit's pixel at ``[size // 2, size // 2]`` — the same convention as the
GeoTIFF source. One ``ee.data.computePixels`` request per chip returns a GeoTIFF with the
composite's bands followed by three quality bands:

- ``valid``: 1 where every band of the composite has a value (some clear observation), else 0;
- ``clear_obs``: how many clear (cloud-, shadow- and fill-free) observations the period had;
- ``total_obs``: how many observations it had at all.

A chip whose ``total_obs`` is 0 everywhere has no imagery in the period at that place and is
treated as outside coverage. The chip's cloud share is ``1 - sum(clear_obs) / sum(total_obs)``.

The network boundary is an :class:`EarthEngineClient` — ``initialize(...)`` and
``compute_pixels(recipe, grid) -> GeoTIFF bytes`` — so that tests answer with real pixels from a
local scene and inject faults, and nothing else in this module talks to Earth Engine.
Requests run on a bounded thread pool (<= 40 in flight, Earth Engine's concurrency quota), spaced
to a request rate, retried with exponential backoff and jitter on rate limits (429), server
errors (5xx), timeouts and corrupt responses; any other 4xx fails that unit with its reason;
authentication or permission errors (401/403) stop the run.

Large studies can use batch exports instead (``imagery.export``): one Cloud-Optimised GeoTIFF per
block of units, the same chips cut from it locally (:mod:`eocausal.imagery.ee_export`).

Credentials come from the environment only: ``EOCAUSAL_EE_SERVICE_ACCOUNT_KEY`` (path to a
service-account JSON key file), else Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``
or ``gcloud auth application-default login``). They are never logged or written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

import numpy as np
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from eocausal.imagery.ee_collections import (
    CLOUD_MASK_CLOUD_SCORE_PLUS,
    CLOUD_SCORE_PLUS_BAND,
    CLOUD_SCORE_PLUS_ID,
    LANDSAT_QA_CLOUD_BITS,
    LANDSAT_QA_FILL_BIT,
    MASK_LANDSAT_QA_PIXEL,
    MASK_S2_CLOUD_SCORE_PLUS,
    MASK_S2_SCL,
    MASK_VIIRS_CF_CVG,
    S2_SCL_CLEAR_CLASSES,
    S2_SCL_NO_DATA_CLASS,
    collection,
)
from eocausal.imagery.fetching import as_completed_bounded, chip_request
from eocausal.imagery.geotiff import Chip, ImageryError
from eocausal.imagery.retry import RetryPolicy
from eocausal.imagery.sources import ChipFailure

if TYPE_CHECKING:
    from eocausal.study import ImagerySpec, PeriodSpec

log = logging.getLogger(__name__)

# Bump when the composite recipe or the chip decoding changes: cached chips are keyed on it.
READER_VERSION = "earthengine-chip/1"

HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
# computePixels refuses requests above 48 MiB of uncompressed pixels; stay far below it.
REQUEST_BYTES_LIMIT = 48 * 1024 * 1024
REQUEST_BYTES_BUDGET = 16 * 1024 * 1024
QUALITY_BANDS = ("valid", "clear_obs", "total_obs")

KEY_FILE_ENV = "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY"
PROJECT_ENVS = ("EOCAUSAL_EE_PROJECT", "GOOGLE_CLOUD_PROJECT")
# Least privilege: read Earth Engine, bill the Cloud project. No Drive scope; cloud-platform also lets
# imagery.export look up and download its COGs from the study's Cloud Storage bucket.
SCOPES = ("https://www.googleapis.com/auth/earthengine", "https://www.googleapis.com/auth/cloud-platform")

REASON_FETCH_FAILED = "fetch_failed"


class EarthEngineError(ImageryError):
    """Earth Engine cannot be used for this run (authentication, permissions, configuration)."""


class EarthEngineCredentialsError(EarthEngineError):
    """No usable credentials in the environment."""


class ChipDecodeError(ValueError):
    """A response that is not the GeoTIFF that was asked for (truncated, wrong grid or bands)."""


# -- the recipe and the grid --------------------------------------------------------------------


@dataclass(frozen=True)
class CompositeRecipe:
    """Everything that decides a composite's pixels (hashable: clients cache expressions by it)."""

    collection: str
    ee_ids: tuple[str, ...]
    bands: tuple[str, ...]
    scale: float
    offset: float
    mask: str
    start: str  # ISO date, inclusive
    end: str  # ISO date, exclusive
    # Cloud Score+ only (mask sentinel2_cloud_score_plus): clear where cs_cdf >= this.
    cloud_score_threshold: float | None = None

    @property
    def output_bands(self) -> tuple[str, ...]:
        return self.bands + QUALITY_BANDS

    def to_json(self) -> dict:
        out = asdict(self)
        # Left out when unused, so the recipes (and chip keys) of existing studies stay as they were.
        if out["cloud_score_threshold"] is None:
            del out["cloud_score_threshold"]
        return out


def utm_crs_code(lon: float, lat: float) -> str:
    """The EPSG code of the WGS84 UTM zone holding a point (326zz north, 327zz south)."""
    zone = min(max(int(math.floor((lon + 180.0) / 6.0)) + 1, 1), 60)
    return f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"


def chip_grids(
    points: list[tuple[float, float]], size_px: int, scale_m: float, crs: str
) -> list[dict]:
    """computePixels ``grid`` objects, one per (lon, lat): the unit's pixel at [size // 2, size // 2].

    Pixels are aligned to multiples of ``scale_m`` from the CRS origin, so the grid of a unit is
    fixed by (crs, scale, size, coordinates) and the same on every run.
    """
    codes = [utm_crs_code(lon, lat) if crs.lower() == "utm" else crs for lon, lat in points]
    half = size_px // 2
    grids: list[dict | None] = [None] * len(points)
    for code in sorted(set(codes)):
        idx = [i for i, c in enumerate(codes) if c == code]
        try:
            transformer = Transformer.from_crs("EPSG:4326", CRS.from_user_input(code), always_xy=True)
        except Exception as exc:  # pyproj raises CRSError and ProjError
            raise ImageryError(f"imagery.crs {code!r} is not a usable CRS: {exc}") from exc
        xs, ys = transformer.transform([points[i][0] for i in idx], [points[i][1] for i in idx])
        for i, x, y in zip(idx, np.atleast_1d(xs), np.atleast_1d(ys)):
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ImageryError(f"point {points[i]} cannot be projected to {code}")
            col = math.floor(x / scale_m)
            row_top = math.floor(y / scale_m) + 1  # north-up: the pixel's top edge
            grids[i] = {
                "dimensions": {"width": size_px, "height": size_px},
                "affineTransform": {
                    "scaleX": scale_m,
                    "shearX": 0.0,
                    "translateX": (col - half) * scale_m,
                    "shearY": 0.0,
                    "scaleY": -scale_m,
                    "translateY": (row_top + half) * scale_m,
                },
                "crsCode": code,
            }
    return grids  # type: ignore[return-value]


def grid_transform(grid: dict) -> Affine:
    t = grid["affineTransform"]
    return Affine(t["scaleX"], t["shearX"], t["translateX"], t["shearY"], t["scaleY"], t["translateY"])


def build_composite(ee: Any, recipe: CompositeRecipe) -> Any:
    """The ``ee.Image`` for a recipe: scaled median of clear pixels + valid/clear_obs/total_obs bands.

    Needs an initialised ``ee`` module (the real API, or the library's offline test algorithms).
    """
    merged = ee.ImageCollection(recipe.ee_ids[0])
    for ee_id in recipe.ee_ids[1:]:
        merged = merged.merge(ee.ImageCollection(ee_id))
    merged = merged.filterDate(recipe.start, recipe.end)
    if recipe.mask == MASK_S2_CLOUD_SCORE_PLUS:
        if recipe.cloud_score_threshold is None:
            raise ValueError("a Cloud Score+ recipe needs cloud_score_threshold")
        # Each S2 image gains the cs_cdf band of the Cloud Score+ image with its system:index.
        merged = merged.linkCollection(ee.ImageCollection(CLOUD_SCORE_PLUS_ID), [CLOUD_SCORE_PLUS_BAND])
    bands = list(recipe.bands)

    def prepare(image):
        if recipe.mask == MASK_LANDSAT_QA_PIXEL:
            qa = image.select("QA_PIXEL")
            cloud_bits = sum(1 << b for b in LANDSAT_QA_CLOUD_BITS)
            observed = qa.bitwiseAnd(1 << LANDSAT_QA_FILL_BIT).eq(0)
            clear = qa.bitwiseAnd(cloud_bits).eq(0).And(observed)
        elif recipe.mask == MASK_S2_SCL:
            scl = image.select("SCL")
            observed = scl.neq(S2_SCL_NO_DATA_CLASS)
            clear = scl.remap(list(S2_SCL_CLEAR_CLASSES), [1] * len(S2_SCL_CLEAR_CLASSES), 0)
        elif recipe.mask == MASK_S2_CLOUD_SCORE_PLUS:
            observed = image.select("SCL").neq(S2_SCL_NO_DATA_CLASS)
            clear = image.select(CLOUD_SCORE_PLUS_BAND).gte(recipe.cloud_score_threshold).And(observed)
        elif recipe.mask == MASK_VIIRS_CF_CVG:
            # A month with no cloud-free coverage has no usable radiance.
            cover = image.select("cf_cvg")
            observed = cover.gte(0)
            clear = cover.gt(0)
        else:
            raise ValueError(f"unknown mask recipe {recipe.mask!r}")
        values = image.select(bands).multiply(recipe.scale).add(recipe.offset).updateMask(clear)
        return values.addBands(clear.rename("clear_obs")).addBands(observed.rename("total_obs"))

    prepared = merged.map(prepare)
    composite = prepared.select(bands).median().rename(bands)
    valid = composite.mask().reduce(ee.Reducer.min()).gt(0).rename("valid")
    clear_obs = prepared.select("clear_obs").sum().rename("clear_obs")
    total_obs = prepared.select("total_obs").sum().rename("total_obs")
    # Outside every footprint nothing has a value: fill with 0 there too (sameFootprint=False),
    # so every response has the full grid and validity is carried by the explicit bands.
    return (
        composite.unmask(0, False)
        .toFloat()
        .addBands(valid.unmask(0, False).toFloat())
        .addBands(clear_obs.unmask(0, False).toFloat())
        .addBands(total_obs.unmask(0, False).toFloat())
    )


def decode_chip(payload: bytes, grid: dict, recipe: CompositeRecipe, source_label: str) -> Chip | None:
    """A chip from computePixels' GeoTIFF bytes; None when the period has no imagery there.

    Raises :class:`ChipDecodeError` for bytes that are not the requested grid and bands
    (e.g. a truncated response), so that the caller asks again instead of caching them.
    """
    n = len(recipe.bands)
    width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
    if not isinstance(payload, (bytes, bytearray, memoryview)) or len(payload) == 0:
        raise ChipDecodeError(f"empty or non-bytes response ({type(payload).__name__})")
    try:
        with MemoryFile(bytes(payload)) as mem, mem.open() as ds:
            if ds.count != n + len(QUALITY_BANDS) or (ds.width, ds.height) != (width, height):
                raise ChipDecodeError(
                    f"response has {ds.count} bands of {ds.width}x{ds.height} px; "
                    f"asked for {n + len(QUALITY_BANDS)} bands of {width}x{height} px"
                )
            if not ds.transform.almost_equals(grid_transform(grid), precision=1e-6 * abs(ds.transform.a)):
                raise ChipDecodeError(f"response grid {tuple(ds.transform)[:6]} differs from the requested grid")
            raw = ds.read(out_dtype=np.float32)
    except RasterioError as exc:
        raise ChipDecodeError(f"response is not a readable GeoTIFF ({len(payload)} bytes): {exc}") from exc
    return chip_from_stack(raw, n, source_label)


def chip_from_stack(raw: np.ndarray, n_bands: int, source_label: str) -> Chip | None:
    """A chip from the composite's pixels on its grid: ``n_bands`` bands, then valid/clear_obs/total_obs.

    Shared by the interactive path (:func:`decode_chip`) and the batch-export path (chips cut
    from exported COGs), so the same pixels give the same chip. None = no imagery in the period.
    """
    n = n_bands
    if raw.shape[0] != n + len(QUALITY_BANDS):
        raise ChipDecodeError(
            f"{raw.shape[0]} bands; expected {n} composite bands and {len(QUALITY_BANDS)} quality bands")
    raw = raw.astype(np.float32, copy=False)
    values, quality = raw[:n], raw[n:]
    total = np.nan_to_num(quality[2], nan=0.0)
    if not (total > 0).any():
        return None
    clear = np.nan_to_num(quality[1], nan=0.0)
    valid = (quality[0] > 0.5) & np.isfinite(values).all(axis=0)
    values = np.where(valid[None], values, 0.0).astype(np.float32)
    cloud_share = float(1.0 - clear.sum() / total.sum())
    return Chip(data=values, valid=valid, source_file=source_label, cloud_share=min(max(cloud_share, 0.0), 1.0))


# -- the client boundary ------------------------------------------------------------------------


class EarthEngineClient(Protocol):
    """What the source needs from Earth Engine. The real one is :class:`EarthEngineApi`."""

    def initialize(self, *, project: str | None, high_volume: bool, timeout_s: float) -> None: ...

    def compute_pixels(self, recipe: CompositeRecipe, grid: dict) -> bytes: ...


def _project_from_environment() -> str | None:
    for name in PROJECT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _require_client() -> None:
    """The Earth Engine client is an optional part (the `earthengine` extra): say how to get it."""
    try:
        import ee  # noqa: F401
        import google.auth  # noqa: F401
    except ImportError:
        raise EarthEngineError(
            "imagery.source 'earthengine' needs the Earth Engine client, which is not installed: "
            "pip install 'eocausal[earthengine]'"
        ) from None


def load_credentials() -> tuple[Any, str | None]:
    """(credentials, project id or None) from the environment; never logs or returns secrets as text.

    Order: the service-account key file named by ``EOCAUSAL_EE_SERVICE_ACCOUNT_KEY``, else
    Application Default Credentials. Raises :class:`EarthEngineCredentialsError` with what to set.
    """
    _require_client()
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.oauth2 import service_account

    key_file = os.environ.get(KEY_FILE_ENV, "").strip()
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as fh:
                info = json.load(fh)
            credentials = service_account.Credentials.from_service_account_info(info, scopes=list(SCOPES))
        except FileNotFoundError:
            raise EarthEngineCredentialsError(f"{KEY_FILE_ENV} names a file that does not exist") from None
        except (OSError, ValueError, KeyError, TypeError):
            # The message of a parse error may quote the key; say only what is wrong.
            raise EarthEngineCredentialsError(
                f"{KEY_FILE_ENV} does not name a readable service-account JSON key file"
            ) from None
        return credentials, info.get("project_id") if isinstance(info, dict) else None
    try:
        credentials, project = google.auth.default(scopes=list(SCOPES))
    except DefaultCredentialsError:
        raise EarthEngineCredentialsError(
            "no Earth Engine credentials in the environment: set "
            f"{KEY_FILE_ENV} to a service-account JSON key file, or set up Application Default "
            "Credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`); "
            "and name the Cloud project with imagery.project or EOCAUSAL_EE_PROJECT"
        ) from None
    return credentials, project


class CountingHttp:
    """An httplib2-style transport that counts every HTTP request it carries, by status.

    Wraps the transport ``ee`` would use (or a given one), so the fetch statistics see each
    attempt on the wire: with ``ee``'s own retries off, one computePixels attempt of ours is one
    HTTP request, and a 429 is never absorbed out of sight.
    """

    def __init__(self, inner: Any):
        self._inner = inner
        self._lock = threading.Lock()
        self.requests = 0
        self.compute_pixels = 0
        self.by_status: dict[str, int] = {}

    def request(self, uri, method="GET", body=None, headers=None, redirections=5, connection_type=None):
        try:
            response, content = self._inner.request(uri, method, body=body, headers=headers,
                                                    redirections=redirections, connection_type=connection_type)
        except Exception:
            self._count(uri, "error")
            raise
        self._count(uri, str(getattr(response, "status", "unknown")))
        return response, content

    def _count(self, uri: str, status: str) -> None:
        with self._lock:
            self.requests += 1
            if ":computePixels" in str(uri):
                self.compute_pixels += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "compute_pixels": self.compute_pixels,
                    "by_status": dict(sorted(self.by_status.items()))}

    def __getattr__(self, name):  # timeout, connections ... of the wrapped transport
        return getattr(self._inner, name)


def _default_transport(timeout_s: float) -> Any:
    """The transport ``ee`` builds when given none: its requests-based httplib2 adapter."""
    import requests
    from ee import _cloud_api_utils

    return _cloud_api_utils._Http(requests.Session(), timeout_s)


class EarthEngineApi:
    """The real client: ``ee.Initialize`` with environment credentials, ``ee.data.computePixels``.

    ``ee``'s own retries are turned off (``ee.data.setMaxRetries(0)``: googleapiclient would
    otherwise retry each 429/5xx up to 5 times inside one of our attempts, bypassing our rate
    limiter and our counts); the source's :class:`RetryPolicy` is the only one. Every HTTP request
    goes through a :class:`CountingHttp` (``http_transport`` overrides the transport inside it).
    """

    def __init__(self, http_transport: Any = None, ee_max_retries: int = 0) -> None:
        self._composites: dict[CompositeRecipe, Any] = {}
        self._lock = threading.Lock()
        self._ee = None
        self._transport = http_transport
        self._ee_max_retries = int(ee_max_retries)  # 0; tests set ee's default (5) to show the stacking
        self.http: CountingHttp | None = None

    def http_counts(self) -> dict | None:
        return None if self.http is None else self.http.snapshot()

    def initialize(self, *, project: str | None, high_volume: bool, timeout_s: float) -> None:
        _require_client()
        import ee

        credentials, credential_project = load_credentials()
        project = project or _project_from_environment() or credential_project
        if not project:
            raise EarthEngineCredentialsError(
                "no Google Cloud project for Earth Engine: set imagery.project in the study, or "
                "EOCAUSAL_EE_PROJECT (or GOOGLE_CLOUD_PROJECT) in the environment"
            )
        self.http = CountingHttp(self._transport if self._transport is not None else _default_transport(timeout_s))
        try:
            ee.data.setMaxRetries(self._ee_max_retries)  # one retry policy: ours
            # Initialisation (discovery, algorithms) is retried here, under the same classification.
            for attempt in range(_INIT_RETRY.max_attempts):
                try:
                    ee.Initialize(credentials=credentials, project=project,
                                  url=HIGH_VOLUME_URL if high_volume else None, http_transport=self.http)
                    break
                except Exception as exc:  # noqa: BLE001 - classified
                    if classify_error(exc) != TRANSIENT or attempt + 1 == _INIT_RETRY.max_attempts:
                        raise
                    time.sleep(_INIT_RETRY.delay(attempt, random.Random()))
            ee.data.setDeadline(int(timeout_s * 1000))
        except ee.EEException as exc:
            raise EarthEngineError(f"Earth Engine initialisation failed for project {project!r}: {exc}") from None
        self._ee = ee
        log.info("Earth Engine initialised (project %s, %s endpoint)", project,
                 "high-volume" if high_volume else "standard")

    def collection_exists(self, ee_id: str) -> bool:
        """Whether Earth Engine has the asset ``ee_id`` (metadata only: ``ee.data.getAsset``)."""
        if self._ee is None:
            raise EarthEngineError("EarthEngineApi.collection_exists called before initialize()")
        try:
            self._ee.data.getAsset(ee_id)
        except self._ee.EEException as exc:
            text = str(exc).lower()
            if _http_status(exc) == 404 or "not found" in text or "does not exist" in text:
                return False
            raise
        return True

    def _composite(self, recipe: CompositeRecipe) -> Any:
        with self._lock:
            image = self._composites.get(recipe)
            if image is None:
                image = self._composites[recipe] = build_composite(self._ee, recipe)
            return image

    def compute_pixels(self, recipe: CompositeRecipe, grid: dict) -> bytes:
        if self._ee is None:
            raise EarthEngineError("EarthEngineApi.compute_pixels called before initialize()")
        request = {"expression": self._composite(recipe), "fileFormat": "GEO_TIFF", "grid": grid}
        return self._ee.data.computePixels(request)

    # -- batch export (imagery.export; see eocausal.imagery.ee_export) ---------------------------

    def export_task(self, recipe: CompositeRecipe, grid: dict, bucket: str, object_name: str,
                    description: str) -> Any:
        """The (unstarted) ``ee.batch`` task exporting the composite on ``grid`` as one Cloud-Optimised GeoTIFF.

        ``crs`` + ``crsTransform`` + ``dimensions`` give exactly the pixel grid computePixels gets
        (the client folds them into ``clipToBoundsAndScale`` on the grid's projection);
        ``fileDimensions`` at least the image's size keeps the output one file.
        """
        if self._ee is None:
            raise EarthEngineError("EarthEngineApi.export_task called before initialize()")
        width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
        t = grid["affineTransform"]
        shard = 256
        return self._ee.batch.Export.image.toCloudStorage(
            image=self._composite(recipe),
            description=description[:100],
            bucket=bucket,
            fileNamePrefix=object_name[:-4] if object_name.endswith(".tif") else object_name,
            dimensions=f"{width}x{height}",
            crs=grid["crsCode"],
            crsTransform=[t["scaleX"], t["shearX"], t["translateX"], t["shearY"], t["scaleY"], t["translateY"]],
            maxPixels=int(width) * int(height) + 1,
            shardSize=shard,
            fileDimensions=[-(-int(width) // shard) * shard, -(-int(height) // shard) * shard],
            fileFormat="GeoTIFF",
            formatOptions={"cloudOptimized": True},
        )

    def start_export(self, recipe: CompositeRecipe, grid: dict, bucket: str, object_name: str,
                     description: str) -> str:
        """Starts the export task; returns its operation name (what :meth:`export_status` takes)."""
        task = self.export_task(recipe, grid, bucket, object_name, description)
        task.start()
        return task.name or task.id

    def export_status(self, task_id: str) -> dict:
        """``{"state": READY | RUNNING | COMPLETED | FAILED | CANCELLED ..., "error_message": ...}``."""
        if self._ee is None:
            raise EarthEngineError("EarthEngineApi.export_status called before initialize()")
        from ee import _cloud_api_utils

        operation = self._ee.data.getOperation(task_id)
        return _cloud_api_utils.convert_operation_to_task(operation)

    def _storage_session(self) -> Any:
        from google.auth.transport.requests import AuthorizedSession

        credentials, _ = load_credentials()
        return AuthorizedSession(credentials)

    def export_exists(self, bucket: str, object_name: str) -> bool:
        """Whether the bucket already holds the object (an export finished by an earlier run)."""
        from urllib.parse import quote

        url = f"https://storage.googleapis.com/storage/v1/b/{quote(bucket, safe='')}/o/{quote(object_name, safe='')}"
        response = self._storage_session().get(url, timeout=60)
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return True

    def fetch_export(self, bucket: str, object_name: str) -> str:
        """A local copy of an exported COG (downloaded once into ``EOCAUSAL_EE_EXPORT_DIR``, default a
        temp folder), for the GeoTIFF source to cut chips from."""
        import tempfile
        from pathlib import Path
        from urllib.parse import quote

        root = Path(os.environ.get("EOCAUSAL_EE_EXPORT_DIR", "") or Path(tempfile.gettempdir()) / "eocausal-ee-exports")
        target = root / bucket / object_name
        if target.exists():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        url = (f"https://storage.googleapis.com/storage/v1/b/{quote(bucket, safe='')}/o/"
               f"{quote(object_name, safe='')}?alt=media")
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        with self._storage_session().get(url, timeout=600, stream=True) as response:
            response.raise_for_status()
            with open(partial, "wb") as fh:
                for block in response.iter_content(1 << 20):
                    fh.write(block)
        os.replace(partial, target)
        return str(target)


# -- retries ------------------------------------------------------------------------------------

TRANSIENT = "transient"
PERMANENT = "permanent"
FATAL = "fatal"

_TRANSIENT_WORDS = (
    "too many requests", "too many concurrent", "rate limit", "quota exceeded", "resource exhausted",
    "resource_exhausted",
    "timed out", "timeout", "deadline", "internal error", "backend error", "service unavailable",
    "unavailable", "temporarily", "try again", "connection reset", "bad gateway",
)
_FATAL_WORDS = (
    "not initialized", "unauthenticated", "permission denied", "permission_denied", "not authorized",
    "credentials", "not signed up", "has not been used in project", "is disabled",
)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an error: its own, or that of the error it was raised from."""
    seen: set[int] = set()
    cursor: BaseException | None = exc
    while cursor is not None and id(cursor) not in seen:
        seen.add(id(cursor))
        for attr in ("status_code", "status", "code"):
            value = getattr(cursor, attr, None)
            if isinstance(value, int) and 100 <= value <= 599:
                return value
        resp = getattr(cursor, "resp", None)  # googleapiclient.errors.HttpError
        status = getattr(resp, "status", None)
        if status is not None:
            try:
                return int(status)
            except (TypeError, ValueError):
                pass
        cursor = cursor.__cause__ or cursor.__context__
    return None


def classify_error(exc: BaseException) -> str | None:
    """TRANSIENT (retry), PERMANENT (fail this unit), FATAL (stop the run); None = not a fetch error.

    ``ee`` turns HTTP errors into ``EEException`` with only a message; the HttpError it came
    from stays on ``__context__``, and its status decides. Without a status, the message does.
    """
    if isinstance(exc, ChipDecodeError):
        return TRANSIENT
    status = _http_status(exc)
    if status is not None:
        if status in (408, 429) or status >= 500:
            return TRANSIENT
        if status in (401, 403):
            return FATAL
        if 400 <= status < 500:
            return PERMANENT
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return TRANSIENT
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if module.startswith("google.auth"):
        return FATAL  # e.g. RefreshError: a revoked or malformed key fails every request alike
    if module.startswith(("requests", "urllib3", "httplib2", "http.client", "socket", "ssl")):
        return TRANSIENT
    if name == "EEException" or module.startswith(("ee", "googleapiclient", "google")):
        text = str(exc).lower()
        if any(w in text for w in _FATAL_WORDS):
            return FATAL
        if any(w in text for w in _TRANSIENT_WORDS):
            return TRANSIENT
        return PERMANENT
    return None


def refusal_status(exc: BaseException) -> int | None:
    """401 or 403 when ``exc`` is Earth Engine refusing the credentials or the project, else None."""
    status = _http_status(exc)
    if status in (401, 403):
        return status
    if classify_error(exc) == FATAL:
        text = str(exc).lower()
        return 401 if ("unauthenticated" in text or "credentials" in text) else 403
    return None


def refusal_message(status: int, when: str, project: str) -> str:
    """One line: which credentials Earth Engine refused (the variable, never the key) and what to do."""
    if os.environ.get(KEY_FILE_ENV, "").strip():
        creds = f"the service-account key file named by {KEY_FILE_ENV}"
    else:
        creds = ("Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth "
                 f"application-default login`; or set {KEY_FILE_ENV} to a service-account key file)")
    if status == 401:
        return (f"rule 'Earth Engine credentials accepted' failed: Earth Engine answered HTTP 401 (unauthenticated) "
                f"{when} for project {project}: {creds} were refused (expired, revoked or not a key): create a new "
                "key or log in again")
    return (f"rule 'Earth Engine credentials accepted' failed: Earth Engine answered HTTP 403 (permission denied) "
            f"{when} for project {project}: {creds} are valid but not allowed: register the Cloud project for Earth "
            "Engine and grant the account the Earth Engine resource viewer and service usage consumer roles, or name "
            "the right project in imagery.project or EOCAUSAL_EE_PROJECT")


# Delays suit Earth Engine's quotas; from_spec takes max_attempts from the study.
DEFAULT_RETRY = RetryPolicy()
_INIT_RETRY = RetryPolicy(max_attempts=5, initial_delay_s=1.0, max_delay_s=16.0)


class _RateLimiter:
    """Spaces request starts at least 1/rate apart (Earth Engine's per-project request quota)."""

    def __init__(self, per_second: float):
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def slot(self) -> float:
        """Seconds to wait before the caller may start its request."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
            return start - now


@dataclass
class FetchStats:
    requests: int = 0  # our computePixels attempts (ee's own retries are off: one HTTP request each)
    chips: int = 0
    retries: dict[str, int] = field(default_factory=dict)  # by kind: http_429, http_5xx, timeout, ...
    failed: int = 0
    seconds: float = 0.0
    # Every HTTP request on the wire (initialisation included), by status, where the client counts them.
    http: dict | None = None

    def count_retry(self, kind: str) -> None:
        self.retries[kind] = self.retries.get(kind, 0) + 1

    def to_metadata(self) -> dict:
        return {
            "requests": self.requests,
            "chips": self.chips,
            "retries": dict(sorted(self.retries.items())),
            "failed": self.failed,
            **({"http": self.http} if self.http is not None else {}),
            "seconds": round(self.seconds, 3),
            "chips_per_s": round(self.chips / self.seconds, 2) if self.seconds > 0 else None,
        }


def _retry_kind(exc: BaseException) -> str:
    if isinstance(exc, ChipDecodeError):
        return "bad_response"
    status = _http_status(exc)
    if status == 429:
        return "http_429"
    if status is not None:
        return "http_5xx" if status >= 500 else f"http_{status}"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc).lower() or "deadline" in str(exc).lower():
        return "timeout"
    return type(exc).__name__


def _describe(exc: BaseException) -> str:
    status = _http_status(exc)
    text = " ".join(str(exc).split())[:300]
    return f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}"


# -- the source ---------------------------------------------------------------------------------


class EarthEngineSource:
    """Chips of one period's composite of one collection, fetched from Earth Engine per unit."""

    def __init__(
        self,
        recipe: CompositeRecipe,
        period_name: str,
        client: EarthEngineClient,
        *,
        scale_m: float,
        crs: str = "utm",
        max_concurrency: int = 32,
        max_requests_per_second: float = 50.0,
        retry: RetryPolicy = RetryPolicy(),
        request_timeout_s: float = 120.0,
        high_volume: bool = False,
        project: str | None = None,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
    ):
        if not 1 <= max_concurrency <= 40:
            raise ValueError(f"max_concurrency must be in [1, 40] (Earth Engine's quota), got {max_concurrency}")
        if scale_m <= 0:
            raise ValueError(f"scale_m must be positive, got {scale_m}")
        self.recipe = recipe
        self.period_name = period_name
        self.client = client
        self.scale_m = float(scale_m)
        self.crs = crs
        self.max_concurrency = int(max_concurrency)
        self.max_requests_per_second = float(max_requests_per_second)
        self.retry = retry
        self.request_timeout_s = float(request_timeout_s)
        self.high_volume = bool(high_volume)
        self.project = project
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._initialized = False
        self._init_lock = threading.Lock()
        self.stats = FetchStats()
        if crs.lower() != "utm":
            try:
                CRS.from_user_input(crs)
            except Exception as exc:
                raise ImageryError(f"imagery.crs {crs!r} is not a usable CRS: {exc}") from exc

    @classmethod
    def from_spec(cls, spec: "ImagerySpec", period: "PeriodSpec", client: EarthEngineClient,
                  **kwargs) -> "EarthEngineSource":
        coll = collection(spec.collection)
        bands = tuple(spec.band_names) if spec.band_names else coll.default_bands
        cloud_score_plus = spec.cloud_mask == CLOUD_MASK_CLOUD_SCORE_PLUS
        if cloud_score_plus and coll.mask != MASK_S2_SCL:  # the study contract says so too
            raise ImageryError(
                f"imagery.cloud_mask 'cloud_score_plus' applies to Sentinel-2 collections only, not {coll.name!r}")
        recipe = CompositeRecipe(
            collection=coll.name,
            ee_ids=coll.ee_ids,
            bands=bands,
            scale=coll.scale,
            offset=coll.offset,
            mask=MASK_S2_CLOUD_SCORE_PLUS if cloud_score_plus else coll.mask,
            start=period.start.isoformat(),
            end=period.end.isoformat(),
            cloud_score_threshold=spec.cloud_score_threshold if cloud_score_plus else None,
        )
        source = cls(
            recipe,
            period.name,
            client,
            scale_m=spec.scale_m or coll.native_scale_m,
            crs=spec.crs,
            max_concurrency=spec.max_concurrency,
            max_requests_per_second=spec.max_requests_per_second,
            retry=replace(DEFAULT_RETRY, max_attempts=spec.max_attempts),
            request_timeout_s=spec.request_timeout_s,
            high_volume=spec.high_volume,
            project=spec.project,
            **kwargs,
        )
        source.check_request_size(spec.chip_size_px)
        return source

    # -- metadata -----------------------------------------------------------------------------

    @property
    def n_bands(self) -> int:
        return len(self.recipe.bands)

    @property
    def source_label(self) -> str:
        return f"earthengine:{self.recipe.collection}/{self.period_name}"

    def request_bytes(self, size_px: int) -> int:
        """Uncompressed bytes of one chip request (float32, composite + quality bands)."""
        return size_px * size_px * len(self.recipe.output_bands) * 4

    def check_request_size(self, size_px: int) -> None:
        size = self.request_bytes(size_px)
        if size > REQUEST_BYTES_BUDGET:
            raise ImageryError(
                f"one {size_px} px chip of {len(self.recipe.output_bands)} float32 bands is {size / 2**20:.1f} MiB "
                f"per request; keep it under {REQUEST_BYTES_BUDGET // 2**20} MiB (Earth Engine refuses "
                f"{REQUEST_BYTES_LIMIT // 2**20} MiB): use fewer bands or a smaller chip_size_px"
            )

    def fingerprint(self) -> str:
        """A hash of what decides a chip's pixels: recipe (collection, bands, dates), scale, CRS."""
        config = {
            "reader": READER_VERSION,
            "recipe": self.recipe.to_json(),
            "scale_m": self.scale_m,
            "crs": self.crs.lower() if self.crs.lower() == "utm" else self.crs,
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def provenance(self) -> dict:
        """What was fetched and how, for asset metadata (no credentials, no project secrets)."""
        return {
            "source": "earthengine",
            "recipe": self.recipe.to_json(),
            "period": self.period_name,
            "scale_m": self.scale_m,
            "crs": self.crs,
            "endpoint": "high-volume" if self.high_volume else "standard",
            "max_concurrency": self.max_concurrency,
            "fetch": self.stats.to_metadata(),
        }

    # -- fetching -----------------------------------------------------------------------------

    def _ensure_initialized(self) -> None:
        # Lazily: a fully cached re-run needs no credentials and makes no calls.
        with self._init_lock:
            if not self._initialized:
                try:
                    self.client.initialize(
                        project=self.project, high_volume=self.high_volume, timeout_s=self.request_timeout_s
                    )
                except EarthEngineError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified: a refusal is named, anything else propagates
                    status = refusal_status(exc)
                    if status is None:
                        raise
                    raise EarthEngineCredentialsError(
                        refusal_message(status, "at initialisation", self.project or "(from the environment)")
                    ) from None
                self._initialized = True

    def read_chips(self, points: Iterable[tuple[float, float]], size_px: int) -> list[Chip | ChipFailure | None]:
        points = [(float(lon), float(lat)) for lon, lat in points]
        out: list[Chip | ChipFailure | None] = [None] * len(points)
        for i, result in self.iter_chips(points, size_px):
            out[i] = result
        return out

    def iter_chips(
        self, points: list[tuple[float, float]], size_px: int
    ) -> Iterator[tuple[int, Chip | ChipFailure | None]]:
        """(index, chip) in the order chips arrive; None = no imagery there in the period.

        At most ``max_concurrency`` requests are in flight. If the consumer stops early (an
        exception, a kill), pending requests are cancelled and workers stop before their next
        attempt.
        """
        points, size_px = chip_request(points, size_px)
        if not points:
            return
        self.check_request_size(size_px)
        grids = chip_grids(points, size_px, self.scale_m, self.crs)
        self._ensure_initialized()
        limiter = _RateLimiter(self.max_requests_per_second)
        stop = threading.Event()
        started = time.perf_counter()
        def work(i: int) -> Chip | ChipFailure | None:
            return self._fetch_one(grids[i], limiter, stop)

        try:
            # a FATAL error propagates from the iteration
            with closing(as_completed_bounded(work, len(points), self.max_concurrency, stop, "ee-chip")) as results:
                for i, result in results:
                    if isinstance(result, ChipFailure):
                        self.stats.failed += 1
                    else:
                        self.stats.chips += 1
                    yield i, result
        finally:
            stop.set()
            self.stats.seconds += time.perf_counter() - started
            counts = getattr(self.client, "http_counts", None)
            if callable(counts):
                self.stats.http = counts()

    def _pause(self, seconds: float, stop: threading.Event) -> None:
        if seconds <= 0:
            return
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            stop.wait(seconds)

    def _fetch_one(self, grid: dict, limiter: _RateLimiter, stop: threading.Event) -> Chip | ChipFailure | None:
        last: BaseException | None = None
        for attempt in range(self.retry.max_attempts):
            if stop.is_set():
                raise EarthEngineError("chip fetching stopped")
            self._pause(limiter.slot(), stop)
            try:
                with self._rng_lock:
                    self.stats.requests += 1
                payload = self.client.compute_pixels(self.recipe, grid)
                return decode_chip(payload, grid, self.recipe, self.source_label)
            except Exception as exc:  # classified below; unknown errors are re-raised
                kind = classify_error(exc)
                if kind is None:
                    raise
                if kind == FATAL:
                    raise EarthEngineError(f"Earth Engine refused the request: {_describe(exc)}") from None
                if kind == PERMANENT:
                    return ChipFailure(REASON_FETCH_FAILED, _describe(exc))
                last = exc
                with self._rng_lock:
                    self.stats.count_retry(_retry_kind(exc))
                    delay = self.retry.delay(attempt, self._rng)
                if attempt + 1 < self.retry.max_attempts:
                    self._pause(delay, stop)
        assert last is not None
        return ChipFailure(
            REASON_FETCH_FAILED, f"gave up after {self.retry.max_attempts} attempts; last error {_describe(last)}"
        )

    def __repr__(self) -> str:
        return (f"EarthEngineSource({self.recipe.collection!r}, period={self.period_name!r}, "
                f"bands={list(self.recipe.bands)})")
