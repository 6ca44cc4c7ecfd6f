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
from contextlib import contextmanager
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
    # Export tasks whose description contains a key end FAILED with the value as Earth Engine's error.
    fail_exports: dict[str, str] = field(default_factory=dict)
    # Export tasks whose description contains one of these never leave RUNNING (a stuck task).
    stuck_exports: set[str] = field(default_factory=set)
    # start_export answers this HTTP status once per task before accepting it (429: queue full, retried).
    start_status_once: int | None = None


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

    def __init__(self, scene: Path = DEMO_CROP, latency_s: float = 0.0, faults: Faults | None = None, seed: int = 0,
                 export_root: Path | None = None, export_polls: tuple[int, int] = (1, 1)):
        self.scene = Path(scene)
        # Batch exports: the folder standing for Cloud Storage (export_root/<bucket>/<object>), and how
        # many polls a task answers READY, then RUNNING, before it writes its COG and says COMPLETED.
        self.export_root = None if export_root is None else Path(export_root)
        self.export_polls = export_polls
        self.tasks: dict[str, dict] = {}
        self.export_log: list[tuple[str, str]] = []  # (event, task id or object): started, polled, completed...
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

    # -- batch export ---------------------------------------------------------------------------

    def _bucket_path(self, bucket: str, object_name: str) -> Path:
        if self.export_root is None:
            raise RuntimeError("FakeEarthEngine(export_root=...) is needed for exports")
        return self.export_root / bucket / object_name

    def start_export(self, recipe: CompositeRecipe, grid: dict, bucket: str, object_name: str,
                     description: str) -> str:
        with self._lock:
            refuse = self.faults.start_status_once
            key = (bucket, object_name)
            if refuse is not None and key not in getattr(self, "_refused", set()):
                self.__dict__.setdefault("_refused", set()).add(key)
                raise http_error(refuse, "Too many tasks already in the queue (3000). Please wait for some to finish.")
            task_id = f"FAKE{len(self.tasks) + 1:06d}"
            self.tasks[task_id] = {"recipe": recipe, "grid": grid, "bucket": bucket, "object": object_name,
                                   "description": description, "polls": 0, "state": "READY"}
            self.export_log.append(("started", task_id))
        return f"projects/fake/operations/{task_id}"

    def export_status(self, task_id: str) -> dict:
        task_id = task_id.rsplit("/", 1)[-1]
        write = False
        with self._lock:
            task = self.tasks[task_id]
            task["polls"] += 1
            self.export_log.append(("polled", task_id))
            if task["state"] in ("COMPLETED", "FAILED"):
                return self._task_answer(task_id, task)
            ready, running = self.export_polls
            failure = next((m for k, m in self.faults.fail_exports.items() if k in task["description"]), None)
            stuck = any(k in task["description"] for k in self.faults.stuck_exports)
            if task["polls"] <= ready:
                task["state"] = "READY"
            elif task["polls"] <= ready + running or stuck:
                task["state"] = "RUNNING"
            elif failure is not None:
                task["state"], task["error"] = "FAILED", failure
            else:
                task["state"] = "COMPLETED"
                write = True
            if task["state"] != "COMPLETED":
                return self._task_answer(task_id, task)
        if write:
            self._write_cog(task)
            self.export_log.append(("completed", task_id))
        return self._task_answer(task_id, task)

    @staticmethod
    def _task_answer(task_id: str, task: dict) -> dict:
        out = {"id": task_id, "state": task["state"], "description": task["description"]}
        if task["state"] == "FAILED":
            out["error_message"] = task["error"]
        return out

    def _write_cog(self, task: dict) -> None:
        """The export's output: the composite on the task's grid, as a real Cloud-Optimised GeoTIFF."""
        from rasterio.shutil import copy as rio_copy

        dest = self._bucket_path(task["bucket"], task["object"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        payload = self.render(task["recipe"], task["grid"])
        partial = dest.with_name(f".{dest.name}.part")
        with MemoryFile(payload) as mem, mem.open() as src:
            rio_copy(src, partial, driver="COG", compress="deflate", blocksize=256)
        partial.replace(dest)

    def export_exists(self, bucket: str, object_name: str) -> bool:
        return self._bucket_path(bucket, object_name).exists()

    def fetch_export(self, bucket: str, object_name: str) -> str:
        path = self._bucket_path(bucket, object_name)
        if not path.exists():
            raise http_error(404, f"No such object: {bucket}/{object_name}")
        self.export_log.append(("fetched", object_name))
        return str(path)

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


# -- an evaluator of the composite expression ---------------------------------------------------
#
# Earth Engine's server evaluates the serialized expression graph; this evaluates the subset of
# algorithms build_composite uses, pixel by pixel with numpy, over a fake catalog of tiny images
# (every image of the catalog on the same small pixel grid). Enough to check what a mask recipe
# keeps, not a model of Earth Engine's projections or median approximation.


@contextmanager
def offline_ee():
    """The real ``ee`` module initialised from its shipped algorithm list, without credentials or network."""
    import ee
    from ee import apitestcase

    saved = (ee.data._install_cloud_api_resource, ee.data.getAlgorithms)
    ee.data._install_cloud_api_resource = lambda: None
    ee.data.getAlgorithms = apitestcase.GetAlgorithms
    ee.Reset()
    try:
        # What ee.Initialize does, minus credentials and network (ee.Initialize itself is refused).
        ee.data.initialize(credentials=None, project="offline-test")
        ee.ApiFunction.initialize()
        for cls in ee._DYNAMIC_CLASSES:
            cls.initialize()
        ee._InitializeGeneratedClasses()
        ee._InitializeUnboundMethods()
        yield ee
    finally:
        ee.Reset()
        ee.data._install_cloud_api_resource, ee.data.getAlgorithms = saved


@dataclass
class FakeImage:
    """Bands in order: name -> (values, mask) of one small pixel grid; properties as EE's."""

    bands: dict[str, tuple[np.ndarray, np.ndarray]]
    properties: dict = field(default_factory=dict)


def fake_image(index: str, date: str, **bands) -> FakeImage:
    """An image with ``system:index`` and ``system:time_start``; each band an array (all pixels valid)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in bands.items()}
    return FakeImage({k: (a, np.ones(a.shape, bool)) for k, a in arrays.items()},
                     {"system:index": index, "system:time_start": _ms(date)})


def _ms(date: str) -> float:
    from datetime import datetime, timezone

    return datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp() * 1000.0


def _binary(op):
    def apply(image1: FakeImage, image2: FakeImage) -> FakeImage:
        a, b = list(image1.bands.items()), list(image2.bands.items())
        if len(b) == 1:
            b = b * len(a)
        if len(a) == 1 and len(b) > 1:
            a = a * len(b)
        assert len(a) == len(b), "band counts differ"
        out = {}
        for (name, (va, ma)), (_, (vb, mb)) in zip(a, b):
            out[name] = (np.asarray(op(va, vb), dtype=np.float64), np.broadcast_to(ma & mb, np.broadcast(va, vb).shape))
        return FakeImage(out, dict(image1.properties))
    return apply


def _remap(image, **kw):
    (name, (v, m)), = image.bands.items()
    out = np.full(v.shape, np.nan if kw.get("defaultValue") is None else kw["defaultValue"], dtype=np.float64)
    for f, t in zip(kw["from"], kw["to"]):
        out[v == f] = t
    mask = m & ~np.isnan(out)
    return FakeImage({name: (np.nan_to_num(out), mask)}, dict(image.properties))


def _reduce_collection(kind):
    def apply(collection: list[FakeImage]) -> FakeImage:
        names = list(collection[0].bands)
        out = {}
        for name in names:
            vals = np.stack([np.broadcast_to(im.bands[name][0], im.bands[name][1].shape) for im in collection])
            masks = np.stack([im.bands[name][1] for im in collection])
            masked = np.where(masks, vals, np.nan)
            any_valid = masks.any(axis=0)
            with np.errstate(all="ignore"):
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    red = np.nanmedian(masked, axis=0) if kind == "median" else np.nansum(masked, axis=0)
            out[name] = (np.nan_to_num(red), any_valid)
        return FakeImage(out)
    return apply


def _update_mask(image, mask):
    (mv, mm), = mask.bands.values()
    keep = mm & (mv != 0)
    return FakeImage({k: (v, m & keep) for k, (v, m) in image.bands.items()}, dict(image.properties))


def _link_collection(input, imageCollection, linkedBands=None, linkedProperties=None, matchPropertyName=None):
    key = matchPropertyName or "system:index"
    match = [im for im in imageCollection if im.properties.get(key) == input.properties.get(key)]
    if not match:
        return input  # no match: the image as it was
    bands = dict(input.bands)
    for name in linkedBands or []:
        bands[name] = match[0].bands[name]
    props = dict(input.properties)
    for name in linkedProperties or []:
        props[name] = match[0].properties[name]
    return FakeImage(bands, props)


def _unmask(input, value=None, sameFootprint=True):
    (fill, _), = value.bands.values()
    return FakeImage({k: (np.where(m, v, fill), np.ones(m.shape, bool)) for k, (v, m) in input.bands.items()},
                     dict(input.properties))


def _image_reduce(image, reducer):
    assert reducer == "min"
    vals = np.stack([np.where(m, v, np.inf) for v, m in image.bands.values()])
    masks = np.stack([m for _, m in image.bands.values()])
    return FakeImage({"min": (np.where(masks.all(axis=0), vals.min(axis=0), 0.0), masks.all(axis=0))})


def _select(input, bandSelectors, newNames=None):
    names = list(bandSelectors)
    missing = [n for n in names if n not in input.bands]
    if missing:
        raise KeyError(f"Image.select: Pattern {missing[0]!r} did not match any bands.")
    return FakeImage({(newNames or names)[i]: input.bands[n] for i, n in enumerate(names)}, dict(input.properties))


_ALGORITHMS = {
    "Image.add": _binary(np.add),
    "Image.multiply": _binary(np.multiply),
    "Image.gt": _binary(lambda a, b: (a > b).astype(float)),
    "Image.gte": _binary(lambda a, b: (a >= b).astype(float)),
    "Image.eq": _binary(lambda a, b: (a == b).astype(float)),
    "Image.neq": _binary(lambda a, b: (a != b).astype(float)),
    "Image.and": _binary(lambda a, b: ((a != 0) & (b != 0)).astype(float)),
    "Image.bitwiseAnd": _binary(lambda a, b: np.bitwise_and(a.astype(np.int64), np.int64(b)).astype(float)),
    "Image.constant": lambda value: FakeImage({"constant": (np.asarray(float(value)), np.ones((), bool))}),
    "Image.select": _select,
    "Image.rename": lambda input, names: FakeImage(dict(zip(names, input.bands.values())), dict(input.properties)),
    "Image.addBands": lambda dstImg, srcImg, names=None, overwrite=False: FakeImage(
        {**dstImg.bands, **srcImg.bands}, dict(dstImg.properties)),
    "Image.remap": _remap,
    "Image.updateMask": _update_mask,
    "Image.mask": lambda image: FakeImage({k: (m.astype(float), np.ones(m.shape, bool)) for k, (v, m) in image.bands.items()}),
    "Image.reduce": _image_reduce,
    "Reducer.min": lambda: "min",
    "Image.unmask": _unmask,
    "Image.toFloat": lambda value: value,
    "Image.linkCollection": _link_collection,
    "reduce.median": _reduce_collection("median"),
    "reduce.sum": _reduce_collection("sum"),
    "Collection.map": lambda collection, baseAlgorithm: [baseAlgorithm(im) for im in collection],
    "Collection.filter": lambda collection, filter: [im for im in collection if filter(im)],
    "DateRange": lambda start, end=None: (_ms(start), _ms(end)),
    "Filter.dateRangeContains": lambda leftValue, rightField: (
        lambda im: leftValue[0] <= im.properties[rightField] < leftValue[1]),
}


class FakeEarthEngineServer:
    """Evaluates serialized expressions (``ee.serializer.encode``) against a fake catalog.

    ``catalog`` maps an ImageCollection id to its images. :data:`CLOUD_SCORE_PLUS_ID` is in the
    default catalog next to a tiny Sentinel-2 collection (see :func:`tiny_sentinel2_catalog`).
    """

    def __init__(self, catalog: dict[str, list[FakeImage]]):
        self.catalog = catalog
        self.algorithms_called: Counter = Counter()

    def evaluate(self, encoded: dict) -> FakeImage:
        values = encoded["values"]

        def node(value, env):
            if "constantValue" in value:
                return value["constantValue"]
            if "valueReference" in value:
                return node(values[value["valueReference"]], env)
            if "argumentReference" in value:
                return env[value["argumentReference"]]
            if "arrayValue" in value:
                return [node(v, env) for v in value["arrayValue"]["values"]]
            if "dictionaryValue" in value:
                return {k: node(v, env) for k, v in value["dictionaryValue"]["values"].items()}
            if "functionDefinitionValue" in value:
                definition = value["functionDefinitionValue"]
                return lambda *args: node(values[definition["body"]],
                                          {**env, **dict(zip(definition["argumentNames"], args))})
            call = value["functionInvocationValue"]
            name = call["functionName"]
            args = {k: node(v, env) for k, v in call["arguments"].items()}
            self.algorithms_called[name] += 1
            if name == "ImageCollection.load":
                if args["id"] not in self.catalog:
                    raise KeyError(f"ImageCollection.load: collection {args['id']!r} not found")
                return list(self.catalog[args["id"]])
            if name not in _ALGORITHMS:
                raise NotImplementedError(f"the fake server does not evaluate {name}")
            return _ALGORITHMS[name](**args)

        return node(values[encoded["result"]], {})
