"""STAC imagery: a clear-pixel median composite per period, read chip by chip from COG assets.

A study names a catalog (a STAC API's URL, a static catalog's URL, or a static catalog on disk
relative to the study file), a collection, periods, an optional cloud filter on ``eo:cloud_cover``
and the band asset keys. For one period, :class:`StacSource`:

1. searches once for the collection's items in the period over the units' bounding box (a STAC
   API's item search through pystac-client; a static catalog is walked with pystac and filtered the
   same way), keeping those at or under the cloud filter;
2. for each unit, takes as the chip grid the native grid of the first band asset of the first item
   (by time, then id) whose footprint holds the unit — ``chip_size_px`` square, the unit's pixel at
   ``[size // 2, size // 2]``, exactly as the GeoTIFF source centres a chip;
3. reads every item overlapping the chip onto that grid — a windowed read where the asset is on
   the grid (or on a coarser grid of whole multiples, e.g. Sentinel-2's 20 m bands on its 10 m
   grid: each coarse pixel repeated), a nearest-neighbour warp otherwise — and masks each
   observation with the collection's mask asset (Sentinel-2 L2A ``SCL``, Landsat Collection 2
   ``QA_PIXEL``; auto-detected by key, or none);
4. composites the clear observations by their per-pixel median. A pixel with no clear observation
   is nodata; a unit no item's footprint holds is outside coverage. The cloud share is the share of
   observations masked as cloud/shadow (None when no item has a mask asset).

Values are scaled to physical units when the catalog says how (``raster:bands`` scale/offset);
else Sentinel-2 L2A digital numbers become reflectance with the BOA add-offset of processing
baseline 04.00+ (``s2:processing_baseline``); else the file's own scale/offset tags apply; else
raw values. Validity follows the GeoTIFF source's rules: the asset's nodata (``raster:bands`` or
the file's), else an undeclared zero fill.

Reads go through GDAL (``/vsicurl/`` for http(s) hrefs) on a bounded thread pool, each chip retried
with our backoff on 5xx, 429, timeouts and truncated reads (:mod:`eocausal.imagery.remote`); a chip
that still fails is a :class:`~eocausal.imagery.sources.ChipFailure` (recorded, not cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from eocausal.imagery.bandfiles import aligned_factor, cloudy_from_qa_pixel, cloudy_from_scl
from eocausal.imagery.fetching import as_completed_bounded, chip_request
from eocausal.imagery.geotiff import Chip, ImageryError, valid_mask
from eocausal.imagery.remote import (
    DEFAULT_REMOTE_RETRY,
    classify_remote_error,
    describe,
    gdal_env,
    gdal_path,
    is_url,
    retry_kind,
)
from eocausal.imagery.retry import GaveUp, RetryPolicy, RetryStats, call_with_retries
from eocausal.imagery.signing import PLANETARY_COMPUTER_HOST, SasSigner, without_signature
from eocausal.imagery.sources import ChipFailure

if TYPE_CHECKING:
    from eocausal.study import ImagerySpec, PeriodSpec

log = logging.getLogger(__name__)

# Bump when the composite or the chip decoding changes: cached chips are keyed on it.
READER_VERSION = "stac-chip/1"

MASK_SCL = "s2_scl"
MASK_QA_PIXEL = "landsat_qa_pixel"
_AUTO_MASK_KEYS = {"scl": MASK_SCL, "qa_pixel": MASK_QA_PIXEL}
# Default band assets, tried in order: the first set an item has entirely.
_DEFAULT_BANDS = (("blue", "green", "red"), ("B02", "B03", "B04"), ("B2", "B3", "B4"))
# Sentinel-2 L2A from processing baseline 04.00 (25 January 2022): DN = 10000 * reflectance + 1000.
_S2_QUANTIFICATION = 10000.0
_S2_BOA_ADD_OFFSET = -1000.0
# Margin of the item search around the units: half a chip of 60 m pixels, in degrees (generous).
_SEARCH_MARGIN_M = 60.0
REASON_FETCH_FAILED = "fetch_failed"


class StacError(ImageryError):
    """A catalog, collection or item that cannot be used; the message names it and the rule."""


# -- items ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    crs_wkt: str
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)


@dataclass(frozen=True)
class AssetRef:
    key: str
    href: str  # a local path or an http(s) URL
    grid: Grid | None  # from the projection extension; None = read from the file's header
    scales: tuple[float, ...] | None  # per band, from raster:bands (None: not in the catalog)
    offsets: tuple[float, ...] | None
    nodata: float | None


@dataclass(frozen=True)
class StacItem:
    id: str
    when: datetime
    bbox: tuple[float, float, float, float]
    cloud_cover: float | None
    bands: tuple[AssetRef, ...]
    mask: AssetRef | None
    mask_kind: str | None
    s2_baseline: str | None  # Sentinel-2 processing baseline, e.g. "04.00"
    boa_offset_applied: bool


def _item_time(props: dict) -> datetime:
    text = props.get("datetime") or props.get("start_datetime")
    if not text:
        raise ValueError("no datetime or start_datetime")
    when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _proj_grid(fields: dict, fallback: dict) -> Grid | None:
    def get(key):
        return fields.get(key, fallback.get(key))

    transform, shape = get("proj:transform"), get("proj:shape")
    code, epsg, wkt = get("proj:code"), get("proj:epsg"), get("proj:wkt2")
    if transform is None or shape is None or (code is None and epsg is None and wkt is None):
        return None
    crs = CRS.from_user_input(code if code else (f"EPSG:{int(epsg)}" if epsg is not None else wkt))
    t = [float(v) for v in transform][:6]
    return Grid(crs.to_wkt(), Affine(*t), int(shape[1]), int(shape[0]))


def _asset_ref(key: str, asset, item_props: dict) -> AssetRef:
    fields = dict(asset.extra_fields)
    bands = fields.get("raster:bands") or []
    scales = offsets = None
    nodata = None
    if bands:
        if any("scale" in b or "offset" in b for b in bands):
            scales = tuple(float(b.get("scale", 1.0)) for b in bands)
            offsets = tuple(float(b.get("offset", 0.0)) for b in bands)
        nd = bands[0].get("nodata")
        if nd is not None and not (isinstance(nd, str)):
            nodata = float(nd)
        elif isinstance(nd, str) and nd.lower() == "nan":
            nodata = float("nan")
    href = asset.get_absolute_href() or asset.href
    return AssetRef(key, str(href), _proj_grid(fields, item_props), scales, offsets, nodata)


def _mask_for(item_assets: dict, mask_asset: str | None) -> tuple[str | None, str | None]:
    """(asset key, kind) of an item's mask asset: the one named, else auto-detected by key."""
    if mask_asset == "none":
        return None, None
    if mask_asset not in (None, "auto"):
        kind = _AUTO_MASK_KEYS.get(mask_asset.lower())
        if kind is None:
            raise StacError(
                f"imagery.mask_asset {mask_asset!r}: unknown mask; the composite reads a Sentinel-2 'SCL' "
                "or a Landsat 'QA_PIXEL' asset (give 'none' for no cloud mask)"
            )
        return mask_asset, kind
    for key in item_assets:
        kind = _AUTO_MASK_KEYS.get(key.lower())
        if kind is not None:
            return key, kind
    return None, None


def item_from_pystac(item, band_keys: tuple[str, ...] | None, mask_asset: str | None) -> StacItem:
    """A :class:`StacItem` from a pystac Item; errors name the item and the missing asset."""
    assets = item.assets
    if band_keys is None:
        band_keys = next((keys for keys in _DEFAULT_BANDS if all(k in assets for k in keys)), None)
        if band_keys is None:
            raise StacError(
                f"item {item.id}: no default band assets ({' / '.join(','.join(k) for k in _DEFAULT_BANDS)}); "
                f"name them in imagery.band_names (asset keys); the item has {sorted(assets)}"
            )
    missing = [k for k in band_keys if k not in assets]
    if missing:
        raise StacError(f"item {item.id}: no asset {missing} (imagery.band_names); the item has {sorted(assets)}")
    mask_key, mask_kind = _mask_for(assets, mask_asset)
    if mask_key is not None and mask_key not in assets:
        raise StacError(f"item {item.id}: no mask asset {mask_key!r} (imagery.mask_asset); it has {sorted(assets)}")
    props = item.properties
    try:
        when = _item_time(props)
    except ValueError as exc:
        raise StacError(f"item {item.id}: {exc}") from None
    bbox = item.bbox
    if not bbox or len(bbox) < 4:
        raise StacError(f"item {item.id}: no bbox")
    if len(bbox) == 6:
        bbox = [bbox[0], bbox[1], bbox[3], bbox[4]]
    cloud = props.get("eo:cloud_cover")
    baseline = props.get("s2:processing_baseline")
    return StacItem(
        id=item.id,
        when=when,
        bbox=tuple(float(v) for v in bbox[:4]),  # type: ignore[arg-type]
        cloud_cover=None if cloud is None else float(cloud),
        bands=tuple(_asset_ref(k, assets[k], props) for k in band_keys),
        mask=None if mask_key is None else _asset_ref(mask_key, assets[mask_key], props),
        mask_kind=mask_kind,
        s2_baseline=None if baseline is None else str(baseline),
        boa_offset_applied=bool(props.get("earthsearch:boa_offset_applied", False)),
    )


def _baseline_at_least(baseline: str, target: float) -> bool:
    try:
        return float(baseline) >= target
    except ValueError:
        return False


# -- the source ----------------------------------------------------------------------------------


@dataclass
class StacFetchStats:
    chips: int = 0
    failed: int = 0
    seconds: float = 0.0
    items: int = 0
    search: RetryStats = field(default_factory=RetryStats)
    reads: RetryStats = field(default_factory=RetryStats)

    def to_metadata(self) -> dict:
        return {
            "chips": self.chips, "failed": self.failed, "items": self.items, "seconds": round(self.seconds, 3),
            "search": self.search.to_metadata(), "reads": self.reads.to_metadata(),
        }


class _Readers(threading.local):
    """One thread's open datasets (rasterio datasets are not shared between threads)."""

    def __init__(self):
        self.open: OrderedDict[str, object] = OrderedDict()
        self.expiry: dict[str, float] = {}  # href -> when the token it was opened with expires


class StacSource:
    """Chips of one period's clear-pixel median composite of a STAC collection."""

    def __init__(
        self,
        catalog: str | Path,
        collection: str,
        period_name: str,
        start: date,
        end: date,
        *,
        band_keys: list[str] | None = None,
        mask_asset: str | None = None,
        max_cloud_cover: float | None = None,
        max_items: int = 2000,
        max_concurrency: int = 8,
        retry: RetryPolicy = DEFAULT_REMOTE_RETRY,
        request_timeout_s: float = 30.0,
        sleep: Callable[[float], None] | None = None,
        seed: int | None = None,
        max_open_datasets: int = 32,
        sign: str | None = None,
        signer: "SasSigner | None" = None,
    ):
        if end <= start:
            raise ValueError(f"period {period_name!r}: end {end} must be after start {start}")
        self.catalog = str(catalog)
        self.collection = collection
        self.period_name = period_name
        self.start, self.end = start, end
        self.band_keys = tuple(band_keys) if band_keys else None
        self.mask_asset = mask_asset
        self.max_cloud_cover = max_cloud_cover
        self.max_items = int(max_items)
        self.max_concurrency = int(max_concurrency)
        self.retry = retry
        self.request_timeout_s = float(request_timeout_s)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._max_open = int(max_open_datasets)
        self.stats = StacFetchStats()
        self._items: list[StacItem] | None = None
        self._items_bbox: tuple[float, float, float, float] | None = None
        self._lock = threading.Lock()
        self._grids: dict[str, Grid] = {}
        self._file_scaling: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple]] = {}
        self._all_open: list = []
        # imagery.sign: planetary_computer (None = auto: the catalog is on Planetary Computer).
        self.sign = sign if sign is not None else (
            "planetary_computer" if urlparse(self.catalog).hostname == PLANETARY_COMPUTER_HOST else "none")
        if self.sign not in ("none", "planetary_computer"):
            raise ValueError(f"imagery.sign must be 'none' or 'planetary_computer', got {sign!r}")
        self._signer = signer or (SasSigner(timeout_s=self.request_timeout_s)
                                  if self.sign == "planetary_computer" else None)

    @classmethod
    def from_spec(cls, spec: "ImagerySpec", period: "PeriodSpec", catalog: str | Path, **kwargs) -> "StacSource":
        return cls(
            catalog, spec.collection, period.name, period.start, period.end,
            band_keys=spec.band_names, mask_asset=spec.mask_asset, max_cloud_cover=spec.max_cloud_cover,
            max_items=spec.max_items, max_concurrency=min(spec.max_concurrency, 16),
            retry=RetryPolicy(max_attempts=spec.max_attempts, initial_delay_s=DEFAULT_REMOTE_RETRY.initial_delay_s,
                              max_delay_s=DEFAULT_REMOTE_RETRY.max_delay_s),
            request_timeout_s=spec.request_timeout_s, sign=spec.sign, **kwargs,
        )

    # -- metadata -----------------------------------------------------------------------------

    @property
    def source_label(self) -> str:
        return f"stac:{self.collection}/{self.period_name}"

    def fingerprint(self) -> str:
        """A hash of what decides a chip's pixels: catalog, collection, period, filter, assets, mask.

        Like an Earth Engine composite's, it does not hash the items themselves (that would need a
        search on every run): a past period's items are taken as fixed.
        """
        config = {
            "reader": READER_VERSION, "catalog": self.catalog, "collection": self.collection,
            "start": self.start.isoformat(), "end": self.end.isoformat(), "bands": self.band_keys,
            "mask": self.mask_asset, "max_cloud_cover": self.max_cloud_cover,
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def provenance(self) -> dict:
        return {
            "source": "stac", "catalog": self.catalog, "collection": self.collection, "period": self.period_name,
            "start": self.start.isoformat(), "end": self.end.isoformat(), "bands": list(self.band_keys or []),
            "mask_asset": self.mask_asset, "max_cloud_cover": self.max_cloud_cover,
            "item_ids": [i.id for i in self._items or []][:1000], "fetch": self.stats.to_metadata(),
        }

    # -- search -------------------------------------------------------------------------------

    def items(self, bbox: tuple[float, float, float, float]) -> list[StacItem]:
        """The period's items over ``bbox`` (WGS84), searched once and reused for a bbox inside it."""
        with self._lock:
            if self._items is not None and self._items_bbox is not None and _contains(self._items_bbox, bbox):
                return self._items
        found = self._with_retries(lambda: self._search(bbox), self.stats.search)
        found.sort(key=lambda i: (i.when, i.id))
        with self._lock:
            self._items, self._items_bbox = found, bbox
            self.stats.items = len(found)
        log.info("STAC %s %s: %d items in period %s", self.catalog, self.collection, len(found), self.period_name)
        return found

    def _with_retries(self, fn, stats: RetryStats):
        try:
            return call_with_retries(
                fn, policy=self.retry, classify=classify_remote_error, kind_of=retry_kind, describe=describe,
                stats=stats, sleep=self._sleep, rng=self._rng,
            )
        except GaveUp as exc:
            raise StacError(f"STAC catalog {self.catalog}: {exc}") from None

    def _datetime_range(self) -> tuple[datetime, datetime]:
        start = datetime(self.start.year, self.start.month, self.start.day, tzinfo=timezone.utc)
        end = datetime(self.end.year, self.end.month, self.end.day, tzinfo=timezone.utc)
        return start, end

    def _keep(self, item: StacItem, bbox) -> bool:
        start, end = self._datetime_range()
        if not (start <= item.when < end):
            return False
        if not _intersects(item.bbox, bbox):
            return False
        cap = self.max_cloud_cover
        if cap is not None and item.cloud_cover is not None and item.cloud_cover > cap:
            return False
        return True

    def _search(self, bbox) -> list[StacItem]:
        raw_items = self._search_api(bbox) if is_url(self.catalog) else None
        if raw_items is None:
            raw_items = self._walk_static()
        out = []
        for raw in raw_items:
            if raw.collection_id not in (None, self.collection) and is_url(self.catalog):
                continue
            item = item_from_pystac(raw, self.band_keys, self.mask_asset)
            if self._keep(item, bbox):
                out.append(item)
                if len(out) > self.max_items:
                    raise StacError(
                        f"STAC catalog {self.catalog}: more than imagery.max_items={self.max_items} items of "
                        f"{self.collection!r} in period {self.period_name!r} over the units; narrow the period or "
                        "the cloud filter, or raise max_items"
                    )
        return out

    def _search_api(self, bbox):
        """Items from a STAC API's item search; None when the URL is a static catalog."""
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO

        # No urllib3 retries inside pystac-client: ours wrap the whole search.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a static catalog advertises no conformance classes
            client = Client.open(self.catalog, stac_io=StacApiIO(max_retries=0, timeout=self.request_timeout_s))
            if not client.conforms_to("ITEM_SEARCH"):
                return None
        start, end = self._datetime_range()
        last = end - timedelta(milliseconds=1)  # STAC ranges are inclusive; periods end-exclusive
        query = None
        if self.max_cloud_cover is not None and client.conforms_to("QUERY"):
            query = {"eo:cloud_cover": {"lte": self.max_cloud_cover}}
        search = client.search(
            collections=[self.collection], bbox=list(bbox), query=query,
            datetime=f"{start.strftime('%Y-%m-%dT%H:%M:%SZ')}/{last.strftime('%Y-%m-%dT%H:%M:%S.%fZ')[:-4]}Z",
            max_items=self.max_items + 1, limit=min(self.max_items + 1, 250),
        )
        return list(search.items())

    def _walk_static(self):
        """The collection's items of a static catalog (a catalog.json on disk or over http)."""
        import pystac

        try:
            if is_url(self.catalog):
                from pystac_client import Client
                from pystac_client.stac_api_io import StacApiIO

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "no conformance classes": it is a static catalog
                    root = Client.open(self.catalog, stac_io=StacApiIO(max_retries=0, timeout=self.request_timeout_s))
            else:
                root = pystac.read_file(self.catalog)
        except (FileNotFoundError, NotADirectoryError):
            raise StacError(f"STAC catalog {self.catalog}: no such file") from None
        except (json.JSONDecodeError, pystac.STACError, pystac.STACTypeError, KeyError, TypeError) as exc:
            raise StacError(f"STAC catalog {self.catalog}: not a STAC catalog ({type(exc).__name__}: {exc})") from None
        if isinstance(root, pystac.Collection) and root.id == self.collection:
            coll = root
        elif isinstance(root, pystac.Catalog):
            coll = next((c for c in root.get_all_collections() if c.id == self.collection), None)
        else:
            coll = None
        if coll is None:
            known = [c.id for c in root.get_all_collections()] if isinstance(root, pystac.Catalog) else []
            raise StacError(f"STAC catalog {self.catalog}: no collection {self.collection!r}; it has {known}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pystac-client's "falling back to pystac" for a static catalog
            return list(coll.get_items(recursive=True))

    # -- chips --------------------------------------------------------------------------------

    def read_chips(self, points: Iterable[tuple[float, float]], size_px: int) -> list[Chip | ChipFailure | None]:
        points = [(float(lon), float(lat)) for lon, lat in points]
        out: list[Chip | ChipFailure | None] = [None] * len(points)
        for i, result in self.iter_chips(points, size_px):
            out[i] = result
        return out

    def read_chip(self, lon: float, lat: float, size_px: int) -> Chip | ChipFailure | None:
        return self.read_chips([(lon, lat)], size_px)[0]

    def iter_chips(
        self, points: list[tuple[float, float]], size_px: int
    ) -> Iterator[tuple[int, Chip | ChipFailure | None]]:
        """(index, chip) as chips are composited; None = no item observes the unit in the period."""
        points, size_px = chip_request(points, size_px)
        if not points:
            return
        items = self.items(search_bbox(points, size_px))
        started = time.perf_counter()
        readers = _Readers()
        stop = threading.Event()
        def work(i: int) -> Chip | ChipFailure | None:
            return self._chip_with_retries(items, points[i][0], points[i][1], size_px, readers, stop)

        try:
            with closing(as_completed_bounded(work, len(points), self.max_concurrency, stop, "stac-chip")) as results:
                for i, result in results:
                    if isinstance(result, ChipFailure):
                        self.stats.failed += 1
                    else:
                        self.stats.chips += 1
                    yield i, result
        finally:
            stop.set()
            with self._lock:
                opened, self._all_open = self._all_open, []
            for ds in opened:
                try:
                    ds.close()
                except Exception:  # closing a dataset whose connection failed
                    pass
            self.stats.seconds += time.perf_counter() - started

    def _chip_with_retries(self, items, lon, lat, size_px, readers: _Readers, stop) -> Chip | ChipFailure | None:
        if stop.is_set():
            raise StacError("chip reading stopped")
        readers.stop = stop
        try:
            with gdal_env(self.request_timeout_s):
                return self._chip(items, lon, lat, size_px, readers)
        except GaveUp as exc:
            return ChipFailure(REASON_FETCH_FAILED, f"({lon:.6f}, {lat:.6f}): {without_signature(str(exc))}")

    def _retrying(self, fn, href: str, readers: _Readers):
        """One asset's open or read, retried on its own (a failed connection is dropped and reopened)."""
        def drop(_exc):
            ds = readers.open.pop(href, None)
            if ds is not None:
                try:
                    ds.close()
                except Exception:  # a dataset whose connection failed
                    pass

        if self._signer is not None:
            # The token first, outside the retries: a refusing endpoint stops the run, named.
            self._signer.sign(href)
        stop = getattr(readers, "stop", None)
        return call_with_retries(
            fn, policy=self.retry, classify=classify_remote_error, kind_of=retry_kind, describe=describe,
            stats=self.stats.reads, sleep=self._sleep or (stop.wait if stop is not None else None),
            rng=random.Random(hash(href)), on_retry=drop,
        )

    # -- reading one chip ---------------------------------------------------------------------

    def _open(self, href: str, readers: _Readers):
        ds = readers.open.get(href)
        if ds is not None and self._signer is not None and self._signer.expired(readers.expiry.get(href, 0.0)):
            readers.open.pop(href)  # opened with a token that is expiring: open again, signed anew
            ds.close()
            ds = None
        if ds is not None:
            readers.open.move_to_end(href)
            return ds
        url = href
        if self._signer is not None:
            url, readers.expiry[href] = self._signer.sign(href)
        try:
            ds = rasterio.open(gdal_path(url))
        except RasterioError as exc:
            raise ImageryError(f"{href}: cannot open: {without_signature(str(exc))}") from None
        readers.open[href] = ds
        with self._lock:
            self._all_open.append(ds)
        while len(readers.open) > self._max_open:
            _, old = readers.open.popitem(last=False)
            old.close()
        return ds

    def _grid(self, asset: AssetRef, readers: _Readers) -> Grid:
        if asset.grid is not None:
            return asset.grid
        with self._lock:
            grid = self._grids.get(asset.href)
        if grid is None:
            ds = self._retrying(lambda: self._open(asset.href, readers), asset.href, readers)
            if ds.crs is None or ds.transform.is_identity:
                raise StacError(f"{asset.href} (asset {asset.key}): not georeferenced")
            grid = Grid(ds.crs.to_wkt(), ds.transform, ds.width, ds.height)
            with self._lock:
                self._grids[asset.href] = grid
        return grid

    def _chip(self, items: list[StacItem], lon: float, lat: float, size_px: int, readers: _Readers) -> Chip | None:
        near = [it for it in items if _bbox_holds(it.bbox, lon, lat)]
        if not near:
            return None
        ref: Grid | None = None
        row = col = 0
        for it in near:
            grid = self._grid(it.bands[0], readers)
            pixel = _pixel(grid, lon, lat)
            if pixel is not None:
                ref, (row, col) = grid, pixel
                break
        if ref is None:
            return None
        half = size_px // 2
        chip_t = ref.transform @ Affine.translation(col - half, row - half)
        chip_grid = Grid(ref.crs_wkt, chip_t, size_px, size_px)
        west, south, east, north = transform_bounds(
            ref.crs_wkt, "EPSG:4326", *_bounds(chip_grid), densify_pts=5)
        observations, total_obs, clear_obs, any_mask = [], 0, 0, False
        n_channels = None
        for it in items:
            if not _intersects(it.bbox, (west, south, east, north)):
                continue
            values, observed, clear = self._observe(it, chip_grid, readers)
            if n_channels is None:
                n_channels = values.shape[0]
            elif values.shape[0] != n_channels:
                raise StacError(f"item {it.id}: {values.shape[0]} bands where other items have {n_channels}")
            if not observed.any():
                continue
            any_mask |= it.mask is not None
            total_obs += int(observed.sum())
            clear_obs += int(clear.sum())
            values[:, ~clear] = np.nan
            observations.append(values)
        if not observations:
            # Inside an item's footprint, but nothing observed (its nodata fill): a chip with no
            # valid pixel, excluded for its nodata share as the GeoTIFF source's would be.
            n = n_channels or len(items[0].bands)
            return Chip(data=np.zeros((n, size_px, size_px), np.float32), valid=np.zeros((size_px, size_px), bool),
                        source_file=self.source_label, cloud_share=None)
        stack = np.stack(observations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no clear observation
            composite = stack[0] if len(observations) == 1 else np.nanmedian(stack, axis=0)
        valid = np.isfinite(composite).all(axis=0)
        data = np.where(valid[None], composite, 0.0).astype(np.float32)
        cloud = (1.0 - clear_obs / total_obs) if any_mask and total_obs else None
        return Chip(data=data, valid=valid, source_file=self.source_label, cloud_share=cloud)

    def _observe(self, item: StacItem, grid: Grid, readers: _Readers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values float32 [C,H,W] scaled, observed bool, clear bool) of one item on the chip grid."""
        raws, nodata, scales, offsets = [], [], [], []
        inside = np.ones((grid.height, grid.width), dtype=bool)
        for asset in item.bands:
            raw, asset_inside, ds_info = self._read_onto(asset, grid, readers)
            inside &= asset_inside
            raws.append(raw)
            file_scales, file_offsets, file_nodata = ds_info
            count = raw.shape[0]
            nd = asset.nodata if asset.nodata is not None else file_nodata
            nodata += [nd] * count
            if asset.scales is not None:
                sc = list(asset.scales) + [asset.scales[-1]] * (count - len(asset.scales))
                of = list(asset.offsets or ()) + [0.0] * (count - len(asset.offsets or ()))
            elif item.s2_baseline is not None:
                new_baseline = _baseline_at_least(item.s2_baseline, 4.0) and not item.boa_offset_applied
                add = _S2_BOA_ADD_OFFSET if new_baseline else 0.0
                sc = [1.0 / _S2_QUANTIFICATION] * count
                of = [add / _S2_QUANTIFICATION] * count
            else:
                sc, of = list(file_scales[:count]), list(file_offsets[:count])
            scales += sc[:count]
            offsets += of[:count]
        raw = np.concatenate(raws)
        use_nodata = nodata if any(v is not None for v in nodata) else None
        valid = valid_mask(raw, use_nodata) & inside
        values = raw.astype(np.float32)
        if any(s != 1.0 for s in scales) or any(o != 0.0 for o in offsets):
            values = (values * np.asarray(scales, np.float32)[:, None, None]
                      + np.asarray(offsets, np.float32)[:, None, None])
        observed, clear = valid, valid.copy()
        if item.mask is not None:
            qa, qa_inside, _ = self._read_onto(item.mask, grid, readers)
            qa = qa[0]
            if item.mask_kind == MASK_SCL:
                cloudy, seen = cloudy_from_scl(qa)
            else:
                cloudy, seen = cloudy_from_qa_pixel(qa)
            observed = valid & seen & qa_inside
            clear = observed & ~cloudy
        return values, observed, clear

    def _read_onto(self, asset: AssetRef, grid: Grid, readers: _Readers):
        """(raw [C,H,W], inside bool [H,W], (file scales, offsets, nodata)) of an asset on ``grid``."""
        return self._retrying(lambda: self._read_onto_once(asset, grid, readers), asset.href, readers)

    def _read_onto_once(self, asset: AssetRef, grid: Grid, readers: _Readers):
        ds = self._open(asset.href, readers)
        info = self._file_scaling.get(asset.href)
        if info is None:
            nd = ds.nodatavals[0] if ds.nodatavals else None
            info = (tuple(float(s) for s in ds.scales), tuple(float(o) for o in ds.offsets), nd)
            self._file_scaling[asset.href] = info
        src_grid = Grid(ds.crs.to_wkt() if ds.crs else "", ds.transform, ds.width, ds.height)
        factor = _aligned_factor(src_grid, grid)
        try:
            if factor is not None:
                raw, inside = _read_aligned(ds, src_grid, grid, factor)
            else:
                with WarpedVRT(ds, crs=CRS.from_wkt(grid.crs_wkt), transform=grid.transform, width=grid.width,
                               height=grid.height, resampling=Resampling.nearest, add_alpha=True) as vrt:
                    arr = vrt.read()
                raw, inside = arr[:-1], arr[-1] > 0
        except RasterioError as exc:
            raise ImageryError(f"{asset.href} (asset {asset.key}): cannot read pixels: {exc}") from exc
        return raw, inside, info

    def __repr__(self) -> str:
        return f"StacSource({self.catalog!r}, collection={self.collection!r}, period={self.period_name!r})"


# -- geometry helpers ----------------------------------------------------------------------------


def search_bbox(points: list[tuple[float, float]], size_px: int) -> tuple[float, float, float, float]:
    """The WGS84 bbox a period's item search covers for these (lon, lat) units and chip size."""
    margin = size_px / 2 * _SEARCH_MARGIN_M / 111_000.0
    lons, lats = [p[0] for p in points], [p[1] for p in points]
    return (max(min(lons) - margin, -180.0), max(min(lats) - margin, -90.0),
            min(max(lons) + margin, 180.0), min(max(lats) + margin, 90.0))


def footprint_holds(items: list[StacItem], lon: float, lat: float) -> bool:
    """Whether (lon, lat) lies in the union of the items' footprints (their bboxes, as chips are found)."""
    return any(_bbox_holds(it.bbox, lon, lat) for it in items)


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _intersects(a, b) -> bool:
    return not (a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1])


def _bbox_holds(bbox, lon, lat) -> bool:
    return bbox[0] <= lon <= bbox[2] and bbox[1] <= lat <= bbox[3]


def _bounds(grid: Grid) -> tuple[float, float, float, float]:
    t = grid.transform
    xs = [t.c, t.c + t.a * grid.width]
    ys = [t.f, t.f + t.e * grid.height]
    return min(xs), min(ys), max(xs), max(ys)


def _pixel(grid: Grid, lon: float, lat: float) -> tuple[int, int] | None:
    xs, ys = warp_transform("EPSG:4326", grid.crs_wkt, [lon], [lat])
    x, y = xs[0], ys[0]
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    inv = ~grid.transform
    col = math.floor(inv.a * x + inv.b * y + inv.c)
    row = math.floor(inv.d * x + inv.e * y + inv.f)
    return (row, col) if 0 <= row < grid.height and 0 <= col < grid.width else None


def _aligned_factor(src: Grid, dst: Grid) -> int | None:
    """k when ``src`` is ``dst``'s CRS with pixels k times as large on the same lattice (k=1: the same)."""
    if not src.crs_wkt or CRS.from_wkt(src.crs_wkt) != CRS.from_wkt(dst.crs_wkt):
        return None
    return aligned_factor(src.transform, dst.transform)


def _read_aligned(ds, src: Grid, dst: Grid, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Read ``dst``'s pixels from a source on the same lattice with k-times larger pixels (k=1: the same)."""
    # dst pixel (r, c) lies in src pixel ((r + row0) // k, (c + col0) // k), offsets in dst pixels.
    col0 = int(round((dst.transform.c - src.transform.c) / dst.transform.a))
    row0 = int(round((dst.transform.f - src.transform.f) / dst.transform.e))
    h, w = dst.height, dst.width
    s_r0, s_c0 = math.floor(row0 / k), math.floor(col0 / k)
    s_r1, s_c1 = math.floor((row0 + h - 1) / k) + 1, math.floor((col0 + w - 1) / k) + 1
    r_lo, r_hi = max(s_r0, 0), min(s_r1, src.height)
    c_lo, c_hi = max(s_c0, 0), min(s_c1, src.width)
    count = ds.count
    coarse = np.zeros((count, s_r1 - s_r0, s_c1 - s_c0), dtype=ds.dtypes[0])
    inside_coarse = np.zeros((s_r1 - s_r0, s_c1 - s_c0), dtype=bool)
    if r_lo < r_hi and c_lo < c_hi:
        block = ds.read(window=Window(c_lo, r_lo, c_hi - c_lo, r_hi - r_lo))
        coarse[:, r_lo - s_r0:r_hi - s_r0, c_lo - s_c0:c_hi - s_c0] = block
        inside_coarse[r_lo - s_r0:r_hi - s_r0, c_lo - s_c0:c_hi - s_c0] = True
    if k > 1:
        coarse = np.repeat(np.repeat(coarse, k, axis=1), k, axis=2)
        inside_coarse = np.repeat(np.repeat(inside_coarse, k, axis=0), k, axis=1)
    dr, dc = row0 - s_r0 * k, col0 - s_c0 * k
    return coarse[:, dr:dr + h, dc:dc + w], inside_coarse[dr:dr + h, dc:dc + w]
