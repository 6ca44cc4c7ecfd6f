"""One-file-per-band scenes: Landsat's ``<scene>_B2.TIF``, ``<scene>_SR_B3.TIF`` ... read as one scene.

A folder may hold a product as delivered — one single-band GeoTIFF per band, plus QA and other
auxiliary files. :func:`group_band_files` finds them: files named ``<scene>_B<n>``,
``<scene>_SR_B<n>`` or ``<scene>_ST_B<n>`` (at least two sharing ``<scene>``) form one scene
whose bands are chosen by band *number* (``bands: [4, 3, 2]`` means B4, B3, B2); by default, the
reflective bands (not ``ST_``) on the grid most of them share (so Landsat's 15 m panchromatic B8
does not break a 30 m stack). ``<scene>_QA_PIXEL`` gives each chip a cloud share; any other file
starting ``<scene>_`` (QA_RADSAT, SR_QA_AEROSOL, ST_TRAD, ...) is auxiliary and not imagery.

:class:`BandStack` reads such a scene through the subset of the rasterio dataset interface the
GeoTIFF reader uses, one open file per band.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from eocausal.imagery.ee_collections import LANDSAT_QA_CLOUD_BITS, LANDSAT_QA_FILL_BIT

log = logging.getLogger(__name__)

_BAND_RE = re.compile(r"^(?P<scene>.+?)_(?P<label>(?P<prefix>SR_|ST_)?B(?P<num>\d{1,2}))\.tiff?$", re.IGNORECASE)
_QA_RE = re.compile(r"^(?P<scene>.+?)_QA_PIXEL\.tiff?$", re.IGNORECASE)
# Landsat Collection 2 Level-2 products carry their scaling in the MTL file, not the GeoTIFF:
# applied when the file has no scale/offset tags of its own (USGS C2 L2 product guide).
_L2_PRODUCT_RE = re.compile(r"^L[CO]0[89]_L2S[PR]_", re.IGNORECASE)
_L2_SCALING = {"SR_": (0.0000275, -0.2), "ST_": (0.00341802, 149.0)}
_CLOUD_MASK = sum(1 << b for b in LANDSAT_QA_CLOUD_BITS)


class BandFileError(ValueError):
    """A one-file-per-band scene that cannot be stacked; the message names the files."""


@dataclass(frozen=True)
class BandFileScene:
    name: str  # the shared prefix, e.g. LC08_L2SP_224078_20200518_20200820_02_T1
    band_files: tuple[Path, ...]  # in band order
    band_labels: tuple[str, ...]  # e.g. ("SR_B2", "SR_B3", "SR_B4")
    product_scaling: tuple[tuple[float, float] | None, ...]  # per band, where the product defines one
    qa_file: Path | None


def _band_number(label_match: re.Match) -> int:
    return int(label_match.group("num"))


def group_band_files(files: list[Path], bands: list[int] | None = None) -> tuple[list[Path], list[BandFileScene]]:
    """Split a folder's GeoTIFFs into plain files and one-file-per-band scenes.

    Returns (plain files, scenes); auxiliary files of a scene are in neither (and logged).
    """
    matches: dict[str, list[tuple[Path, re.Match]]] = defaultdict(list)
    for f in files:
        m = _BAND_RE.match(f.name)
        if m:
            matches[m.group("scene")].append((f, m))
    scenes: list[BandFileScene] = []
    claimed: set[Path] = set()
    for scene_name, members in sorted(matches.items()):
        if len(members) < 2:
            continue
        by_number: dict[int, tuple[Path, re.Match]] = {}
        for f, m in members:
            number = _band_number(m)
            if number in by_number:
                raise BandFileError(
                    f"scene {scene_name}: band {number} in two files: {by_number[number][0].name}, {f.name}")
            by_number[number] = (f, m)
        if bands is not None:
            missing = [b for b in bands if b not in by_number]
            if missing:
                raise BandFileError(
                    f"scene {scene_name}: no file for band number(s) {missing}; band files hold {sorted(by_number)} "
                    "(for one-file-per-band scenes, 'bands' names band numbers)"
                )
            chosen = [by_number[b] for b in bands]
        else:
            reflective = [by_number[n] for n in sorted(by_number)
                          if (by_number[n][1].group("prefix") or "").upper() != "ST_"]
            chosen = _on_common_grid(scene_name, reflective or [by_number[n] for n in sorted(by_number)])
        qa = next((f for f in files if (q := _QA_RE.match(f.name)) and q.group("scene") == scene_name), None)
        product = bool(_L2_PRODUCT_RE.match(scene_name))
        scaling = tuple(
            _L2_SCALING.get((m.group("prefix") or "").upper()) if product else None for _, m in chosen
        )
        scenes.append(BandFileScene(
            name=scene_name,
            band_files=tuple(f for f, _ in chosen),
            band_labels=tuple(m.group("label").upper() for _, m in chosen),
            product_scaling=scaling,
            qa_file=qa,
        ))
        prefix = scene_name + "_"
        scene_files = {f for f in files if f.name.startswith(prefix)}
        auxiliary = sorted(scene_files - {f for f, _ in chosen} - ({qa} if qa else set()))
        if auxiliary:
            log.info("scene %s: not read as imagery: %s", scene_name, ", ".join(f.name for f in auxiliary))
        claimed |= scene_files
    plain = [f for f in files if f not in claimed]
    return plain, scenes


def _on_common_grid(scene_name: str, members: list[tuple[Path, re.Match]]) -> list[tuple[Path, re.Match]]:
    """The band files on the grid most of them share (drops e.g. a 15 m panchromatic band)."""
    grids = {}
    for f, _ in members:
        try:
            with rasterio.open(f) as ds:
                grids[f] = (ds.crs.to_wkt() if ds.crs else None, tuple(ds.transform)[:6], ds.width, ds.height)
        except RasterioError as exc:
            raise BandFileError(f"{f}: cannot open as a GeoTIFF (corrupt or not a TIFF): {exc}") from exc
    common, _ = Counter(grids.values()).most_common(1)[0]
    kept = [(f, m) for f, m in members if grids[f] == common]
    dropped = [f.name for f, _ in members if grids[f] != common]
    if dropped:
        log.info("scene %s: bands on another grid left out: %s", scene_name, ", ".join(dropped))
    return kept


def cloudy_from_qa_pixel(qa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cloudy, observed) masks from Landsat Collection 2 QA_PIXEL values."""
    qa = qa.astype(np.uint16, copy=False)
    observed = (qa & (1 << LANDSAT_QA_FILL_BIT)) == 0
    return ((qa & _CLOUD_MASK) != 0) & observed, observed


class BandStack:
    """A one-file-per-band scene read like one multi-band dataset (only what the reader uses)."""

    def __init__(self, band_files: tuple[Path, ...], qa_file: Path | None):
        self._datasets = []
        self._qa = None
        try:
            for f in band_files:
                self._datasets.append(rasterio.open(f))
            if qa_file is not None:
                self._qa = rasterio.open(qa_file)
        except BaseException:
            self.close()
            raise

    def read(self, indexes, window=None, out_dtype=None):
        # Each band file is single-band: position i of the stack is band 1 of file i.
        arrays = [self._datasets[i - 1].read(1, window=window) for i in indexes]
        stacked = np.stack(arrays)
        return stacked.astype(out_dtype) if out_dtype is not None else stacked

    def read_masks(self, index, window=None):
        return self._datasets[index - 1].read_masks(1, window=window)

    def read_qa(self, window=None) -> np.ndarray | None:
        return None if self._qa is None else self._qa.read(1, window=window)

    def close(self) -> None:
        for ds in self._datasets:
            ds.close()
        if self._qa is not None:
            self._qa.close()

    def __enter__(self) -> "BandStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
