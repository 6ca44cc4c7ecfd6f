"""The imagery checked against the survey before any chip is cut (`eocausal validate`).

For local rasters (``imagery.source: geotiff``, a file, a folder or an ``https://`` COG): every
file's CRS and the bands read, every unit's coverage (the units outside every file named), and the
nodata share of every unit's chip window, by the chip stage's own rule (more than
``imagery.max_nodata_share`` nodata: excluded). Windows are read into memory and dropped: nothing
is written, no cache is filled. Units the chip stage would exclude are reported (it excludes them
with a record, so they do not stop a run); the study is rejected only when the units left could
not be analysed: none inside the imagery, or fewer usable units in an arm than
``analysis.folds`` (the survey's design rule, applied to the imageable units).

Earth Engine and STAC imagery is composed and fetched per chip: its coverage is known only as the
chips arrive, and asking for it here would need credentials a cached re-run does not; for those
sources the check says so and passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

_BATCH = 256  # chip windows per read (the chip stage's batch)
_NAMED = 20  # units named in a message before "and N more"


class ImageryRejected(ValueError):
    """The imagery cannot serve the study; the message names the rule and the units or files."""


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

    @property
    def n_usable(self) -> int:
        return int(self.n_units - len(self.outside) - len(self.nodata))

    def lines(self) -> list[str]:
        if not self.checked:
            return [f"imagery: {self.source} imagery is fetched per chip; its coverage and nodata are checked as "
                    "chips arrive (units it cannot image are excluded with a record)"]
        out = [f"imagery: {len(self.files)} file(s) open as GeoTIFF ({_names(self.files, 5)}); "
               f"CRS {', '.join(self.crs)}; {self.n_bands} band(s) read; chips {self.chip_size_px} px",
               f"imagery: {self.n_units - len(self.outside):,} of {self.n_units:,} units inside the imagery; "
               f"{self.n_usable:,} usable (nodata share at most {self.max_nodata_share:g} in the chip window)"]
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


def check_imagery(study, survey: pd.DataFrame, source=None) -> ImageryCheck:
    """Check the study's imagery against its canonical survey (unit_id, lat, lon, treatment).

    Raises :class:`ImageryRejected` when no unit lies inside the imagery or an arm has fewer usable
    units than ``analysis.folds``; otherwise returns what it found (the units to be excluded named).
    ``source``: an opened chip source (default: :func:`eocausal.imagery.sources.open_source`)."""
    spec = study.imagery
    n_units = len(survey)
    if spec.source != "geotiff":
        return ImageryCheck(spec.source, n_units, checked=False)
    if "://" in str(spec.path):  # a remote COG: its windows are read over the network when chips are cut
        return ImageryCheck("remote GeoTIFF", n_units, checked=False)
    if source is None:
        from eocausal.imagery.sources import open_source

        source = open_source(study)
    infos = list(getattr(source, "_files", ()))
    crs = sorted({_crs_name(getattr(i, "crs_wkt", "")) for i in infos}) if infos else []
    check = ImageryCheck(spec.source, n_units, checked=True, files=list(source.files), crs=crs,
                         n_bands=source.n_bands, chip_size_px=spec.chip_size_px, max_nodata_share=spec.max_nodata_share)
    ids = survey["unit_id"].astype(str).to_numpy()
    points = list(zip(survey["lon"].to_numpy(dtype=float), survey["lat"].to_numpy(dtype=float)))
    share = np.full(n_units, np.nan)
    for start in range(0, n_units, _BATCH):
        chips = source.read_chips(points[start:start + _BATCH], spec.chip_size_px)
        for k, chip in enumerate(chips, start):
            if chip is not None:
                share[k] = 1.0 - float(np.asarray(chip.valid).mean())
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
            f"({_footprint_text(source, infos)}; {len(check.outside)} outside, {len(check.nodata)} with more than "
            f"{spec.max_nodata_share:g} nodata)"
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
