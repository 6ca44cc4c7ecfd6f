"""The imagery checked against the survey before any chip is cut (`eocausal validate`).

For local rasters (``imagery.source: geotiff``, a file or a folder): every file's CRS and the bands
read, every unit's coverage (the units outside every file named), and the nodata share of every
unit's chip window, by the chip stage's own rule (more than ``imagery.max_nodata_share`` nodata:
excluded). Windows are read into memory and dropped: nothing is written, no cache is filled.

For the other sources, what can be known without cutting a chip:

- a remote COG or folder listing (``imagery.path`` an http(s) URL): the files' headers only, read
  as the chip stage reads them (the same :class:`~eocausal.imagery.geotiff.GeoTiffSource`, with its
  retries): CRS, bands, declared nodata, and every unit's coverage by the files' footprints. The
  nodata share of each chip window is known only when its pixels are read (the chip stage excludes
  such units with a record);
- STAC (``imagery.source: stac``): the catalog searched for every period, as the source searches
  it (collection, dates, cloud filter, over the units' bounding box); the items found per period,
  and the units outside the union of the items' footprints. No item in a period is an error naming
  the collection, the dates and the cloud filter;
- Earth Engine: the credentials (the source's own initialisation: a 401 or 403 is
  :class:`ImageryAccessRefused`, naming the credentials variable and what to do) and that the
  collection's Earth Engine ids exist. Coverage is global: no per-unit check.

Units the chip stage would exclude are reported (it excludes them with a record, so they do not
stop a run); the study is rejected only when the units left could not be analysed: none inside the
imagery, or fewer usable units in an arm than ``analysis.folds`` (the survey's design rule, applied
to the imageable units). A catalog, file or service that cannot be reached is an ImageryError (the
caller names it as a rejected input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

_BATCH = 256  # chip windows per read (the chip stage's batch)
_NAMED = 20  # units named in a message before "and N more"


class ImageryRejected(ValueError):
    """The imagery cannot serve the study; the message names the rule and the units or files."""


class ImageryAccessRefused(ImageryRejected):
    """Earth Engine refused the credentials (401/403); the message names them and what to do."""


@dataclass
class ImageryCheck:
    source: str
    n_units: int
    checked: bool  # False: a source whose coverage is known only when chips are fetched
    files: list[str] = field(default_factory=list)
    crs: list[str] = field(default_factory=list)  # distinct CRS of the files
    n_bands: int | None = None
    chip_size_px: int | None = None
    max_nodata_share: float | None = None
    outside: list[str] = field(default_factory=list)  # unit ids outside every file
    nodata: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["unit_id", "nodata_share"]))
    usable_by_arm: dict = field(default_factory=dict)  # treatment -> usable units
    nodata_share: pd.Series | None = None  # per unit id (NaN outside)
    # "windows": every chip window read; "headers": remote files' headers only; "stac"; "earthengine"
    mode: str = "windows"
    declared_nodata: list[str] = field(default_factory=list)  # remote files: nodata as declared
    items_by_period: dict = field(default_factory=dict)  # STAC: period name -> items found
    notes: list[str] = field(default_factory=list)  # what was checked, one line each

    @property
    def n_usable(self) -> int:
        return int(self.n_units - len(self.outside) - len(self.nodata))

    def lines(self) -> list[str]:
        if not self.checked:
            return [f"imagery: {self.source} imagery is fetched per chip; its coverage and nodata are checked as "
                    "chips arrive (units it cannot image are excluded with a record)"]
        if self.mode == "earthengine":
            return [f"imagery: {line}" for line in self.notes]
        if self.mode == "stac":
            out = [f"imagery: {line}" for line in self.notes]
            out.append(f"imagery: {self.n_units - len(self.outside):,} of {self.n_units:,} units inside the items' "
                       "footprints in every period (nodata and clouds are known as chips are composited)")
        else:
            out = [f"imagery: {len(self.files)} file(s) open as GeoTIFF ({_names(self.files, 5)}); "
                   f"CRS {', '.join(self.crs)}; {self.n_bands} band(s) read; chips {self.chip_size_px} px"]
            if self.mode == "headers":
                out.append(f"imagery: headers only (remote files); nodata {', '.join(self.declared_nodata)}; "
                           f"{self.n_units - len(self.outside):,} of {self.n_units:,} units inside the files' "
                           "footprints (each chip window's nodata share is checked as its pixels are read)")
            else:
                out.append(f"imagery: {self.n_units - len(self.outside):,} of {self.n_units:,} units inside the "
                           f"imagery; {self.n_usable:,} usable (nodata share at most {self.max_nodata_share:g} in "
                           "the chip window)")
        if self.outside:
            out.append(f"imagery: warning: {len(self.outside)} unit(s) outside the imagery, to be excluded "
                       f"(outside_coverage): {_names(self.outside)}")
        if len(self.nodata):
            worst = self.nodata.sort_values(["nodata_share", "unit_id"], ascending=[False, True])
            named = [f"{u} ({s:.0%})" for u, s in zip(worst["unit_id"], worst["nodata_share"])]
            out.append(f"imagery: warning: {len(self.nodata)} unit(s) with more than {self.max_nodata_share:g} "
                       f"nodata in their chip window, to be excluded (nodata_share_above_max): {_names(named)}")
        return out

    def message(self) -> str:
        return "\n".join(self.lines())


def _names(items: list[str], limit: int = _NAMED) -> str:
    items = [str(i) for i in items]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def check_imagery(study, survey: pd.DataFrame, source=None, ee_client=None) -> ImageryCheck:
    """Check the study's imagery against its canonical survey (unit_id, lat, lon, treatment).

    Raises :class:`ImageryRejected` when no unit lies inside the imagery, an arm has fewer usable
    units than ``analysis.folds``, a STAC period has no item or an Earth Engine collection does not
    exist; :class:`ImageryAccessRefused` when Earth Engine refuses the credentials; an ImageryError
    (a StacError, an EarthEngineError) when the imagery cannot be reached. Otherwise returns what it
    found (the units to be excluded named). ``source``: an opened GeoTIFF source (default:
    :func:`eocausal.imagery.sources.open_source`); ``ee_client``: the Earth Engine client (default:
    the one ``open_source`` would use)."""
    spec = study.imagery
    if spec.source == "stac":
        return _check_stac(study, survey)
    if spec.source == "earthengine":
        return _check_earthengine(study, survey, ee_client)
    if spec.source != "geotiff":
        return ImageryCheck(spec.source, len(survey), checked=False)
    remote = "://" in str(spec.path)
    if source is None:
        from eocausal.imagery.sources import open_source

        source = open_source(study)  # a remote file's header is read here (with the source's retries)
    infos = list(getattr(source, "_files", ()))
    crs = sorted({_crs_name(getattr(i, "crs_wkt", "")) for i in infos}) if infos else []
    check = ImageryCheck("remote GeoTIFF" if remote else spec.source, len(survey), checked=True,
                         files=list(source.files), crs=crs, n_bands=source.n_bands, chip_size_px=spec.chip_size_px,
                         max_nodata_share=spec.max_nodata_share, mode="headers" if remote else "windows")
    points = list(zip(survey["lon"].to_numpy(dtype=float), survey["lat"].to_numpy(dtype=float)))
    if remote:
        share = _header_coverage(source, infos, points)
        check.declared_nodata = sorted({_nodata_text(i) for i in infos})
    else:
        share = _window_nodata(source, points, spec.chip_size_px)
    _judge(check, study, survey, share, _footprint_text(source, infos))
    return check


def _window_nodata(source, points, size_px: int) -> np.ndarray:
    """Every unit's nodata share of its chip window (NaN outside), reading the windows in batches."""
    share = np.full(len(points), np.nan)
    for start in range(0, len(points), _BATCH):
        chips = source.read_chips(points[start:start + _BATCH], size_px)
        for k, chip in enumerate(chips, start):
            if chip is not None:
                share[k] = 1.0 - float(np.asarray(chip.valid).mean())
    return share


def _header_coverage(source, infos, points) -> np.ndarray:
    """0 for a unit whose pixel lies in some file (by the headers: no pixel read), NaN outside."""
    lons, lats = [p[0] for p in points], [p[1] for p in points]
    inside = np.zeros(len(points), dtype=bool)
    for info in infos:
        pixels = source._pixels_in_file(info, lons, lats)  # the chip stage's own placement
        inside |= np.array([p is not None for p in pixels], dtype=bool)
    return np.where(inside, 0.0, np.nan)


def _nodata_text(info) -> str:
    declared = {v for v in getattr(info, "nodata", ()) if v is not None}
    mode = getattr(info, "mask_mode", "")
    if declared:
        return f"{', '.join(f'{v:g}' for v in sorted(declared))} ({info.name})"
    return f"{'an internal mask' if mode == 'internal_mask' else 'undeclared (zero fill)'} ({info.name})"


def _judge(check: ImageryCheck, study, survey: pd.DataFrame, share: np.ndarray, where_text: str) -> None:
    """The units outside (NaN share) or over the nodata limit, and the rules on the units left."""
    spec = study.imagery
    n_units = len(survey)
    ids = survey["unit_id"].astype(str).to_numpy()
    outside = np.isnan(share)
    too_much = ~outside & (share > spec.max_nodata_share + 1e-12)
    check.outside = ids[outside].tolist()
    check.nodata = pd.DataFrame({"unit_id": ids[too_much], "nodata_share": share[too_much]})
    check.nodata_share = pd.Series(share, index=ids)
    usable = ~outside & ~too_much
    if not usable.any():
        where = "inside the imagery" if outside.all() else "with a usable chip window"
        raise ImageryRejected(
            f"imagery rejected: rule 'units inside the imagery' failed: none of the {n_units:,} units lies {where} "
            f"({where_text}; {len(check.outside)} outside, {len(check.nodata)} with more than "
            f"{spec.max_nodata_share:g} nodata; outside: {_names(check.outside, 10)})"
        )
    if "treatment" in survey.columns:
        arms = survey["treatment"].to_numpy()
        check.usable_by_arm = {int(a): int((usable & (arms == a)).sum()) for a in (0, 1)}
        folds = study.analysis.folds
        short = {a: n for a, n in check.usable_by_arm.items() if n < folds}
        if short:
            detail = ", ".join(f"{'treated' if a == 1 else 'control'} {n}" for a, n in short.items())
            raise ImageryRejected(
                f"imagery rejected: rule 'units per arm >= analysis.folds ({folds}) after imaging' failed: "
                f"usable units {detail} ({len(check.outside)} outside the imagery, {len(check.nodata)} with more "
                f"than {spec.max_nodata_share:g} nodata; outside: {_names(check.outside)})"
            )


# -- STAC ------------------------------------------------------------------------------------------


def _check_stac(study, survey: pd.DataFrame) -> ImageryCheck:
    """Every period's item search, as the source makes it; the units outside the items' footprints."""
    from eocausal.imagery.stac import StacSource, footprint_holds, search_bbox

    spec = study.imagery
    points = list(zip(survey["lon"].to_numpy(dtype=float), survey["lat"].to_numpy(dtype=float)))
    check = ImageryCheck("stac", len(survey), checked=True, chip_size_px=spec.chip_size_px,
                         max_nodata_share=spec.max_nodata_share, mode="stac")
    inside = np.ones(len(points), dtype=bool)
    cloud = (f"eo:cloud_cover <= {spec.max_cloud_cover:g}" if spec.max_cloud_cover is not None
             else "no cloud filter")
    catalog = study.stac_catalog
    if not points:
        return check
    bbox = search_bbox(points, spec.chip_size_px)
    for name in spec.period_names():
        period = spec.period(name)
        source = StacSource.from_spec(spec, period, catalog)
        items = source.items(bbox)  # a StacError (catalog unreachable, no such collection) names the catalog
        check.items_by_period[name] = len(items)
        dates = f"{period.start.isoformat()} to {period.end.isoformat()} (end exclusive)"
        if not items:
            raise ImageryRejected(
                f"imagery rejected: rule 'STAC items in every period' failed: no item of collection "
                f"{spec.collection!r} in period {name!r} ({dates}, {cloud}) over the units (lon "
                f"{bbox[0]:.4f}..{bbox[2]:.4f}, lat {bbox[1]:.4f}..{bbox[3]:.4f}) in catalog {catalog}"
            )
        held = np.array([footprint_holds(items, lon, lat) for lon, lat in points], dtype=bool)
        inside &= held
        check.notes.append(f"STAC period {name!r} ({dates}, {cloud}): {len(items)} item(s) of "
                           f"{spec.collection!r}; {int((~held).sum())} unit(s) outside their footprints")
    share = np.where(inside, 0.0, np.nan)
    _judge(check, study, survey, share, f"the items of {spec.collection!r} in {catalog}")
    return check


# -- Earth Engine ----------------------------------------------------------------------------------


def _check_earthengine(study, survey: pd.DataFrame, ee_client=None) -> ImageryCheck:
    """The credentials (the source's own initialisation) and the collection's Earth Engine ids."""
    from eocausal.imagery.earthengine import EarthEngineSource, refusal_message, refusal_status
    from eocausal.imagery.ee_collections import CLOUD_SCORE_PLUS_ID
    from eocausal.imagery.sources import earthengine_client_from_env

    spec = study.imagery
    client = ee_client if ee_client is not None else earthengine_client_from_env()
    name = spec.period_names()[0]
    if spec.export is not None:  # batch export: no per-chip request to size-check
        from eocausal.imagery.ee_export import EarthEngineExportSource

        source = EarthEngineExportSource.from_spec(spec, spec.period(name), client)
    else:
        source = EarthEngineSource.from_spec(spec, spec.period(name), client)
    project = spec.project or "(from the environment)"
    # What the chip stage does before its first request: missing, unreadable or refused (401/403)
    # credentials are an EarthEngineCredentialsError naming the variable and what to do.
    source._ensure_initialized()
    probe = getattr(client, "collection_exists", None)
    ids = list(source.recipe.ee_ids)
    if source.recipe.cloud_score_threshold is not None:
        ids.append(CLOUD_SCORE_PLUS_ID)  # imagery.cloud_mask: cloud_score_plus links it
    if probe is not None:
        missing = []
        for ee_id in ids:
            try:
                if not probe(ee_id):
                    missing.append(ee_id)
            except Exception as exc:  # noqa: BLE001 - classified: a refusal is named, anything else propagates
                status = refusal_status(exc)
                if status is None:
                    raise
                raise ImageryAccessRefused(
                    "imagery rejected: " + refusal_message(status, f"reading collection {ee_id}", project)) from None
        if missing:
            raise ImageryRejected(
                f"imagery rejected: rule 'Earth Engine collection exists' failed: imagery.collection "
                f"{spec.collection!r} reads {', '.join(missing)}, which Earth Engine does not have (or the project "
                f"{project} cannot see)"
            )
        found = f"collection {spec.collection!r} ({', '.join(ids)}) found"
    else:
        found = f"collection {spec.collection!r} ({', '.join(ids)}) not checked (the client cannot look it up)"
    check = ImageryCheck("earthengine", len(survey), checked=True, chip_size_px=spec.chip_size_px,
                         max_nodata_share=spec.max_nodata_share, mode="earthengine")
    check.notes = [f"Earth Engine credentials accepted (project {project}); {found}; coverage is global: "
                   "no per-unit check (units with no observation in a period are excluded as chips arrive)"]
    return check


def _crs_name(wkt: str) -> str:
    if not wkt:
        return "unknown"
    try:
        from pyproj import CRS

        crs = CRS.from_wkt(wkt)
        epsg = crs.to_epsg()
        return f"EPSG:{epsg} ({crs.name})" if epsg else crs.name
    except Exception:  # noqa: BLE001
        return "unreadable CRS"


def _footprint_text(source, infos) -> str:
    try:
        from rasterio.warp import transform_bounds

        boxes = []
        for info in infos:
            t, w, h = info.transform, info.width, info.height
            xs, ys = (t.c, t.c + w * t.a), (t.f, t.f + h * t.e)
            boxes.append(transform_bounds(info.crs_wkt, "EPSG:4326", min(xs), min(ys), max(xs), max(ys)))
        if boxes:
            west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
            east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
            return f"the imagery covers lon {west:.4f}..{east:.4f}, lat {south:.4f}..{north:.4f}"
    except Exception:  # noqa: BLE001
        pass
    return f"files: {_names(list(source.files), 5)}"
