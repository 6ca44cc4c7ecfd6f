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

from eocausal.imagery.ee_collections import (
    LANDSAT_QA_CLOUD_BITS,
    LANDSAT_QA_FILL_BIT,
    S2_SCL_CLEAR_CLASSES,
    S2_SCL_NO_DATA_CLASS,
)

log = logging.getLogger(__name__)

_BAND_RE = re.compile(r"^(?P<scene>.+?)_(?P<label>(?P<prefix>SR_|ST_)?B(?P<num>\d{1,2}))\.tiff?$", re.IGNORECASE)
_QA_RE = re.compile(r"^(?P<scene>.+?)_QA_PIXEL\.tiff?$", re.IGNORECASE)
# Landsat Collection 2 Level-2 products carry their scaling in the MTL file, not the GeoTIFF:
# applied when the file has no scale/offset tags of its own (USGS C2 L2 product guide).
_L2_PRODUCT_RE = re.compile(r"^L[CO]0[89]_L2S[PR]_", re.IGNORECASE)
_L2_SCALING = {"SR_": (0.0000275, -0.2), "ST_": (0.00341802, 149.0)}
_CLOUD_MASK = sum(1 << b for b in LANDSAT_QA_CLOUD_BITS)

QA_LANDSAT = "landsat_qa_pixel"
QA_S2_SCL = "s2_scl"

# Sentinel-2 L2A band files as delivered (IMG_DATA/R10m/T21JYM_20220315T133231_B02_10m.jp2) or
# converted to GeoTIFF, with or without the resolution suffix. Checked before the Landsat pattern,
# which a name like T21JYM_20220315T133231_B02.tif would also match.
_S2_RE = re.compile(
    r"^(?P<scene>(?:L2A_)?T\d{2}[A-Z]{3}_\d{8}T\d{6})_(?P<label>B(?:0?[1-9]|1[0-2]|8A)|SCL)"
    r"(?:_(?P<res>\d{2})m)?\.(?:tiff?|jp2)$",
    re.IGNORECASE,
)
_S2_DEFAULT_BANDS = ("B02", "B03", "B04", "B08")  # blue, green, red, NIR: the 10 m bands
# Band order of the BOA_ADD_OFFSET list in MTD_MSIL2A.xml (band_id 0..12).
_S2_BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_S2_QUANTIFICATION = 10000.0
_S2_BASELINE_04_OFFSET = -1000.0
_S2_BASELINE_04_DATE = "20220125"  # processing baseline 04.00 came into operation (ESA)
_S2_BASELINE_RE = re.compile(r"_N(\d{2})(\d{2})(?:_|$)")


def is_s2_band_file(name: str) -> bool:
    return bool(_S2_RE.match(name))


def s2_label(label: str) -> str:
    """B2 -> B02, b8a -> B8A, scl -> SCL."""
    label = label.upper()
    if re.fullmatch(r"B\d", label):
        return f"B0{label[1]}"
    return label


def _s2_scenes(files: list, bands: list[int] | None, band_names: list[str] | None) -> tuple[list[BandFileScene], set]:
    """Sentinel-2 L2A scenes among ``files`` (one per tile and sensing time) and the files they claim."""
    groups: dict[str, list[tuple[object, re.Match]]] = defaultdict(list)
    for f in files:
        m = _S2_RE.match(f.name)
        if m:
            groups[m.group("scene").upper().removeprefix("L2A_")].append((f, m))
    scenes: list[BandFileScene] = []
    claimed: set = set()
    for scene_name, members in sorted(groups.items()):
        # Each label at its finest resolution (a SAFE product holds B02 at 10, 20 and 60 m).
        best: dict[str, tuple[int, object]] = {}
        for f, m in members:
            label = s2_label(m.group("label"))
            res = int(m.group("res") or 0)
            if label not in best or (res and res < best[label][0]):
                best[label] = (res, f)
        if band_names is not None:
            wanted = [s2_label(b) for b in band_names]
        elif bands is not None:
            wanted = [f"B{b:02d}" for b in bands]
        else:
            wanted = [b for b in _S2_DEFAULT_BANDS if b in best]
        missing = [b for b in wanted if b not in best]
        if missing or not wanted:
            raise BandFileError(
                f"Sentinel-2 scene {scene_name}: no file for band(s) {missing or list(_S2_DEFAULT_BANDS)}; "
                f"its band files hold {sorted(k for k in best if k != 'SCL')} (name bands with imagery.band_names, "
                "e.g. [B02, B03, B04, B8A])"
            )
        band_files = tuple(best[b][1] for b in wanted)
        offsets = _s2_boa_offsets(scene_name, [f for f, _ in members], wanted)
        scaling = tuple((1.0 / _S2_QUANTIFICATION, off / _S2_QUANTIFICATION) for off in offsets)
        scl = best.get("SCL", (0, None))[1]
        scenes.append(BandFileScene(
            name=scene_name, band_files=band_files, band_labels=tuple(wanted), product_scaling=scaling,
            qa_file=scl, qa_kind=QA_S2_SCL, multi_resolution=True,  # type: ignore[arg-type]
        ))
        claimed |= {f for f, _ in members}
    return scenes, claimed


def _s2_metadata(files: list) -> "Path | None":
    """MTD_MSIL2A.xml of a product: beside the band files, or up the SAFE tree (IMG_DATA/R10m -> root)."""
    local = [f for f in files if isinstance(f, Path)]
    if not local:
        return None
    folder = local[0].parent
    for candidate in [folder, *list(folder.parents)[:5]]:
        found = candidate / "MTD_MSIL2A.xml"
        if found.is_file():
            return found
    return None


def _s2_boa_offsets(scene_name: str, files: list, labels: list[str]) -> list[float]:
    """Per band, the BOA add-offset in DN: from MTD_MSIL2A.xml, else the processing baseline in the
    product's name (_N0400_), else by sensing date (baseline 04.00 from 25 January 2022, logged)."""
    meta = _s2_metadata(files)
    if meta is not None:
        import xml.etree.ElementTree as ET

        try:
            root = ET.parse(meta).getroot()
        except ET.ParseError as exc:
            raise BandFileError(f"{meta}: not readable XML: {exc}") from None
        by_id = {}
        for el in root.iter():
            if el.tag.endswith("BOA_ADD_OFFSET") and el.get("band_id") is not None:
                by_id[int(el.get("band_id"))] = float(el.text or 0)
        if not by_id:
            return [0.0] * len(labels)  # a baseline before 04.00: no offset in the metadata
        return [by_id.get(_S2_BAND_IDS.index(b), 0.0) if b in _S2_BAND_IDS else 0.0 for b in labels]
    local = [f for f in files if isinstance(f, Path)]
    names = [p.name for f in local for p in [f, *list(f.parents)[:6]]] + [getattr(f, "url", "") for f in files]
    for name in names:
        m = _S2_BASELINE_RE.search(name)
        if m:
            baseline = int(m.group(1)) + int(m.group(2)) / 100
            return [_S2_BASELINE_04_OFFSET if baseline >= 4.0 else 0.0] * len(labels)
    sensing = scene_name.split("_")[1][:8]
    offset = _S2_BASELINE_04_OFFSET if sensing >= _S2_BASELINE_04_DATE else 0.0
    log.warning(
        "Sentinel-2 scene %s: no MTD_MSIL2A.xml and no processing baseline (_Nxxxx_) in its path; BOA add-offset "
        "%g assumed from the sensing date (baseline 04.00 from 2022-01-25; older data reprocessed later has it too)",
        scene_name, offset,
    )
    return [offset] * len(labels)


class BandFileError(ValueError):
    """A one-file-per-band scene that cannot be stacked; the message names the files."""


@dataclass(frozen=True)
class BandFileScene:
    name: str  # the shared prefix, e.g. LC08_L2SP_224078_20200518_20200820_02_T1
    band_files: tuple[Path, ...]  # in band order
    band_labels: tuple[str, ...]  # e.g. ("SR_B2", "SR_B3", "SR_B4")
    product_scaling: tuple[tuple[float, float] | None, ...]  # per band, where the product defines one
    qa_file: Path | None
    qa_kind: str = QA_LANDSAT
    # Sentinel-2: bands of several resolutions, read on the finest chosen band's grid.
    multi_resolution: bool = False


def _band_number(label_match: re.Match) -> int:
    return int(label_match.group("num"))


def group_band_files(files: list[Path], bands: list[int] | None = None,
                     band_names: list[str] | None = None) -> tuple[list[Path], list[BandFileScene]]:
    """Split a folder's GeoTIFFs into plain files and one-file-per-band scenes.

    Returns (plain files, scenes); auxiliary files of a scene are in neither (and logged).
    Sentinel-2 L2A band files (``<tile>_<time>_B02[_10m]``) are chosen by ``band_names``
    (B02, B8A, ...) or ``bands`` (numbers), default the 10 m bands B02, B03, B04, B08.
    """
    s2_scenes, s2_claimed = _s2_scenes(files, bands, band_names)
    files = [f for f in files if f not in s2_claimed]
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
    return plain, s2_scenes + scenes


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


def cloudy_from_scl(scl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cloudy, observed) masks from Sentinel-2 L2A scene classification (SCL) values.

    Observed: any class but 0 (no data). Cloudy: observed and not a clear class (as the Earth
    Engine recipe: cloud shadow, medium/high-probability cloud, thin cirrus, saturated/defective).
    """
    observed = scl != S2_SCL_NO_DATA_CLASS
    clear = np.isin(scl, S2_SCL_CLEAR_CLASSES)
    return observed & ~clear, observed


def aligned_factor(src_transform, dst_transform) -> int | None:
    """k when ``src`` pixels are k times ``dst``'s (k >= 1, whole) on the same north-up lattice, else None."""
    s, d = src_transform, dst_transform
    if s.b or s.d or d.b or d.d or s.a <= 0 or d.a <= 0 or s.e >= 0 or d.e >= 0:
        return None
    k = s.a / d.a
    if abs(k - round(k)) > 1e-9 or round(k) < 1 or abs(s.e / d.e - k) > 1e-9:
        return None
    col_off, row_off = (s.c - d.c) / d.a, (s.f - d.f) / d.e
    if abs(col_off - round(col_off)) > 1e-6 or abs(row_off - round(row_off)) > 1e-6:
        return None
    return int(round(k))


def read_replicated(ds, window, k: int, band: int = 1) -> np.ndarray:
    """Pixels of a window of the fine grid (k times finer than ``ds``, same origin) by nearest neighbour."""
    if k == 1:
        return ds.read(band, window=window)
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    s_r0, s_c0 = r0 // k, c0 // k
    s_r1 = min((r0 + h - 1) // k + 1, ds.height)
    s_c1 = min((c0 + w - 1) // k + 1, ds.width)
    from rasterio.windows import Window

    coarse = ds.read(band, window=Window(s_c0, s_r0, s_c1 - s_c0, s_r1 - s_r0))
    fine = np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)
    dr, dc = r0 - s_r0 * k, c0 - s_c0 * k
    out = fine[dr:dr + h, dc:dc + w]
    if out.shape != (h, w):  # a coarse raster that ends before the fine one: pad with 0 (nodata)
        padded = np.zeros((h, w), dtype=fine.dtype)
        padded[: out.shape[0], : out.shape[1]] = out
        out = padded
    return out


class BandStack:
    """A one-file-per-band scene read like one multi-band dataset (only what the reader uses).

    ``factors`` (per band file) and ``qa_factor``: how many grid pixels one of the file's pixels
    spans (1 = on the grid; Sentinel-2's 20 m bands on its 10 m grid: 2).
    """

    def __init__(self, band_files: tuple[Path, ...], qa_file: Path | None, factors: tuple[int, ...] = (),
                 qa_factor: int = 1, qa_kind: str = QA_LANDSAT):
        self._factors = tuple(factors) or (1,) * len(band_files)
        self._qa_factor = qa_factor
        self._qa_kind = qa_kind
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
        arrays = [read_replicated(self._datasets[i - 1], window, self._factors[i - 1]) for i in indexes]
        stacked = np.stack(arrays)
        return stacked.astype(out_dtype) if out_dtype is not None else stacked

    def read_masks(self, index, window=None):
        return self._datasets[index - 1].read_masks(1, window=window)

    def read_qa(self, window=None) -> np.ndarray | None:
        return None if self._qa is None else read_replicated(self._qa, window, self._qa_factor)

    def read_cloudy(self, window=None) -> np.ndarray | None:
        """Cloud/shadow mask of a window from the scene's QA file (QA_PIXEL or SCL); None without one."""
        qa = self.read_qa(window)
        if qa is None:
            return None
        return (cloudy_from_scl(qa) if self._qa_kind == QA_S2_SCL else cloudy_from_qa_pixel(qa))[0]

    def close(self) -> None:
        for ds in self._datasets:
            ds.close()
        if self._qa is not None:
            self._qa.close()

    def __enter__(self) -> "BandStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
