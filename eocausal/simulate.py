"""Simulated studies with known effects (DESIGN §6 "Simulation", §7 "The embedded demo study").

- :func:`write_demo_study` builds a semi-synthetic study on a real (or procedural) scene: units on
  valid pixels, an image-borne confounder measured from the real pixels around each unit (the
  built-up share within ~750 m: bright and textured pixels), a weak tabular proxy of it,
  treatment targeted by the confounder, and outcomes with a known, heterogeneous effect. It writes ``study.yaml``, ``villages.csv``, ``truth.json`` and
  ``truth_units.csv``; the same arguments always give byte-identical files.
- :func:`write_procedural_scene` writes a textured GeoTIFF of any size for scale tests and fast
  fixtures.

The building blocks (:func:`sample_unit_pixels`, :func:`builtup_pixels`, :func:`image_confounder`,
:class:`DemoProcess`) are separate so that a Monte Carlo harness can draw many studies from one
scene.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import yaml
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from eocausal.imagery.geotiff import GeoTiffSource

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
DEMO_SCENE = DEMO_DIR / "landsat8_itaipu_crop.tif"

DEMO_STUDY_NAME = "eocausal_demo"
DEMO_MAX_NODATA_SHARE = 0.2
# The image confounder: built-up share within this radius (capped at the chip's half-width);
# built-up = brightness and local contrast both above this valid-pixel quantile of the scene.
CONFOUNDER_RADIUS_M = 750.0
BUILTUP_QUANTILE = 0.7

# User-style column names of the demo survey (the study file maps them).
COLUMNS = {
    "unit_id": "village_code",
    "lat": "latitude",
    "lon": "longitude",
    "treatment": "aid_received",
    "outcome": "asset_index",
    "proxy": "market_access",
    "unrelated": "household_size",
}


# --------------------------------------------------------------------------------------------
# The data-generating process


@dataclass(frozen=True)
class DemoProcess:
    """The known process linking the image confounder to treatment and outcome.

    With ``z`` the image confounder standardised over the units:

    - proxy (market_access, latent) ``m = rho * z + sqrt(1 - rho^2) * N(0, 1)``; reported as
      ``50 + 10 m`` — a weak tabular proxy (corr ~ rho with the confounder);
    - household_size ``h ~ 1 + Poisson(3.5)``, independent of everything else;
    - propensity ``e = floor + (1 - 2 floor) * sigmoid(a0 + a1 z)``, so ``e`` is in
      ``[floor, 1 - floor]`` (overlap by construction), ``D ~ Bernoulli(e)``;
    - effect ``tau = t0 + t1 z`` (heterogeneous in the confounder);
    - outcome ``Y = b0 + bz z + bm m + bh h_std + tau D + N(0, noise_sd^2)``.

    The confounder's effect on Y (bz) is large against the noise and the proxy is weak, so the
    difference in means and tabular-only adjustment stay biased while image adjustment is not.
    """

    proxy_correlation: float = 0.35
    propensity_floor: float = 0.05
    propensity_intercept: float = -0.4
    propensity_slope: float = 1.6
    outcome_intercept: float = 0.0
    outcome_confounder: float = 1.5
    outcome_market_access: float = 0.4
    outcome_household_size: float = 0.25
    effect_intercept: float = 1.0
    effect_confounder: float = 0.5
    noise_sd: float = 1.0
    household_size_mean_extra: float = 3.5

    def draw(self, confounder_std: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
        """Per-unit covariates, propensity, treatment, potential outcomes and effect."""
        z = np.asarray(confounder_std, dtype=float)
        n = z.size
        rho = self.proxy_correlation
        market_latent = rho * z + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
        household_size = 1 + rng.poisson(self.household_size_mean_extra, n)
        h_std = (household_size - (1 + self.household_size_mean_extra)) / math.sqrt(
            self.household_size_mean_extra
        )
        logit = self.propensity_intercept + self.propensity_slope * z
        floor = self.propensity_floor
        propensity = floor + (1.0 - 2.0 * floor) / (1.0 + np.exp(-logit))
        treatment = (rng.random(n) < propensity).astype(int)
        tau = self.effect_intercept + self.effect_confounder * z
        y0 = (
            self.outcome_intercept
            + self.outcome_confounder * z
            + self.outcome_market_access * market_latent
            + self.outcome_household_size * h_std
            + self.noise_sd * rng.standard_normal(n)
        )
        y1 = y0 + tau
        return pd.DataFrame(
            {
                "market_access": 50.0 + 10.0 * market_latent,
                "household_size": household_size,
                "propensity": propensity,
                "treatment": treatment,
                "tau": tau,
                "y0": y0,
                "y1": y1,
                "outcome": np.where(treatment == 1, y1, y0),
            }
        )


# --------------------------------------------------------------------------------------------
# Scene helpers


@dataclass(frozen=True)
class Scene:
    """A whole single-file scene in memory, with its grid."""

    path: Path
    data: np.ndarray  # float32 [C, H, W], invalid pixels 0
    valid: np.ndarray  # bool [H, W]
    transform: Affine
    crs: CRS
    pixel_size_m: float  # approximate ground size of a pixel

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape


def read_scene(path: Path) -> Scene:
    """Read one GeoTIFF whole, with validity decided exactly as :class:`GeoTiffSource` does."""
    path = Path(path)
    source = GeoTiffSource(path)
    chip = source.read_file(source.files[0])
    with rasterio.open(path) as src:
        transform, crs = src.transform, CRS.from_wkt(src.crs.to_wkt())
        bounds = src.bounds
    size_units = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    if crs.is_geographic:
        mid_lat = (bounds.bottom + bounds.top) / 2.0
        pixel_size_m = size_units * 111_320.0 * math.sqrt(abs(math.cos(math.radians(mid_lat))))
    else:
        pixel_size_m = size_units * crs.axis_info[0].unit_conversion_factor
    return Scene(path, chip.data, chip.valid, transform, crs, pixel_size_m)


def sample_unit_pixels(
    valid: np.ndarray, n_units: int, chip_size_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct random valid pixels (rows, cols) whose chip window lies inside the raster.

    Keeping chips inside the raster means the only units excluded later are those near the
    scene's own nodata (the zero-filled border), which is what the demo should exercise.
    """
    height, width = valid.shape
    half = chip_size_px // 2
    eligible = np.zeros_like(valid)
    r_hi, c_hi = height - chip_size_px + half, width - chip_size_px + half
    if r_hi < half or c_hi < half:
        raise ValueError(f"scene {width}x{height} px is smaller than one {chip_size_px}-px chip")
    eligible[half : r_hi + 1, half : c_hi + 1] = valid[half : r_hi + 1, half : c_hi + 1]
    candidates = np.flatnonzero(eligible)
    if candidates.size < n_units:
        raise ValueError(f"only {candidates.size} eligible valid pixels for {n_units} units")
    chosen = np.sort(rng.choice(candidates, size=n_units, replace=False))
    chosen = rng.permutation(chosen)
    return chosen // width, chosen % width


def relative_brightness(scene: Scene) -> np.ndarray:
    """Mean over bands of DN / the band's valid-pixel median (about 1 for a typical pixel)."""
    medians = np.array([np.median(band[scene.valid]) for band in scene.data], dtype=np.float64)
    medians[medians == 0] = 1.0
    return (scene.data / medians[:, None, None].astype(np.float32)).mean(axis=0)


def local_contrast(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Standard deviation of ``values`` over the valid pixels of each 3 x 3 neighbourhood.

    Invalid pixels take no part, so a scene's nodata edge does not look like texture.
    """
    centre = float(np.median(values[valid])) if valid.any() else 0.0
    # Centred, in float64: E[v^2] - E[v]^2 then loses no precision to cancellation.
    v = np.where(valid, values.astype(np.float64) - centre, 0.0)
    w = valid.astype(np.float64)
    pv, pv2, pw = (np.pad(a, 1) for a in (v, v * v, w))
    height, width = valid.shape
    total, total2, count = (np.zeros((height, width)) for _ in range(3))
    for dr in range(3):
        for dc in range(3):
            total += pv[dr : dr + height, dc : dc + width]
            total2 += pv2[dr : dr + height, dc : dc + width]
            count += pw[dr : dr + height, dc : dc + width]
    count = np.maximum(count, 1.0)
    mean = total / count
    return (np.sqrt(np.maximum(total2 / count - mean * mean, 0.0)) * valid).astype(np.float32)


def builtup_pixels(scene: Scene, quantile: float) -> tuple[np.ndarray, float, float]:
    """Built-up pixels: bright AND heterogeneous (roofs, streets), unlike bare fields (bright,
    uniform) or water and forest (dark). Both thresholds are valid-pixel quantiles of the scene.

    Returns the mask and the brightness and contrast thresholds.
    """
    brightness = relative_brightness(scene)
    contrast = local_contrast(brightness, scene.valid)
    b_threshold = float(np.quantile(brightness[scene.valid], quantile))
    c_threshold = float(np.quantile(contrast[scene.valid], quantile))
    mask = (brightness > b_threshold) & (contrast > c_threshold) & scene.valid
    return mask, b_threshold, c_threshold


def image_confounder(
    marked: np.ndarray, valid: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: int
) -> np.ndarray:
    """Share of ``marked`` pixels among the valid pixels within radius_px of each unit's pixel."""
    height, width = valid.shape
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    disk = yy * yy + xx * xx <= radius_px * radius_px
    out = np.empty(rows.size, dtype=np.float64)
    for k, (r, c) in enumerate(zip(rows, cols)):
        r0, r1 = max(r - radius_px, 0), min(r + radius_px + 1, height)
        c0, c1 = max(c - radius_px, 0), min(c + radius_px + 1, width)
        d = disk[r0 - r + radius_px : r1 - r + radius_px, c0 - c + radius_px : c1 - c + radius_px]
        v = valid[r0:r1, c0:c1] & d
        out[k] = (marked[r0:r1, c0:c1] & v).sum() / max(int(v.sum()), 1)
    return out


def chip_valid_share(valid: np.ndarray, rows: np.ndarray, cols: np.ndarray, size_px: int) -> np.ndarray:
    """Valid share of each unit's chip window (outside the raster counts as invalid)."""
    height, width = valid.shape
    half = size_px // 2
    out = np.empty(rows.size, dtype=np.float64)
    for k, (r, c) in enumerate(zip(rows, cols)):
        r0, c0 = r - half, c - half
        block = valid[max(r0, 0) : min(r0 + size_px, height), max(c0, 0) : min(c0 + size_px, width)]
        out[k] = block.sum() / float(size_px * size_px)
    return out


# --------------------------------------------------------------------------------------------
# The demo study


def _r(value: float, digits: int = 8) -> float:
    # Rounded floats print identically everywhere; raw ones may differ in the last ulp.
    return round(float(value), digits) + 0.0


def _fmt(values, digits: int) -> list[str]:
    return [f"{float(v) + 0.0:.{digits}f}" for v in values]


def write_demo_study(
    out_dir: Path,
    n_units: int = 1500,
    seed: int = 0,
    scene: Path | None = None,
    chip_size_px: int = 64,
) -> Path:
    """Write a semi-synthetic study on a scene (default: the shipped Landsat-8 crop).

    Files: ``study.yaml``, ``villages.csv``, ``imagery/<scene>``, ``truth.json``,
    ``truth_units.csv``. Returns the path of ``study.yaml``.
    """
    out_dir = Path(out_dir)
    scene_path = Path(scene) if scene is not None else DEMO_SCENE
    if not scene_path.is_file():
        raise FileNotFoundError(f"scene not found: {scene_path}")
    process = DemoProcess()
    confounder_radius_m = CONFOUNDER_RADIUS_M
    builtup_quantile = BUILTUP_QUANTILE

    loc_rng, process_rng, jitter_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    img = read_scene(scene_path)
    rows, cols = sample_unit_pixels(img.valid, n_units, chip_size_px, loc_rng)

    # The image confounder: built-up share within ~750 m, never wider than the chip, so the
    # chip the estimators see holds all of it (the confounder is a function of the image).
    radius_px = max(1, min(int(round(confounder_radius_m / img.pixel_size_m)), chip_size_px // 2))
    builtup, b_threshold, c_threshold = builtup_pixels(img, builtup_quantile)
    confounder = image_confounder(builtup, img.valid, rows, cols, radius_px)
    c_mean, c_sd = float(confounder.mean()), float(confounder.std())
    if not c_sd > 0:
        raise ValueError(f"{scene_path}: the image confounder does not vary over the units")
    z = (confounder - c_mean) / c_sd
    draws = process.draw(z, process_rng)

    # Units sit at a random point inside their pixel, kept off the pixel's edges so that the
    # 1e-7-degree rounding of the survey coordinates never moves a unit to a neighbour pixel.
    offsets = jitter_rng.uniform(0.15, 0.85, size=(2, n_units))
    t, px, py = img.transform, cols + offsets[0], rows + offsets[1]
    xs, ys = t.a * px + t.b * py + t.c, t.d * px + t.e * py + t.f
    lons, lats = warp_transform(img.crs.to_wkt(), "EPSG:4326", list(xs), list(ys))
    lons, lats = np.round(np.asarray(lons), 7), np.round(np.asarray(lats), 7)

    share = chip_valid_share(img.valid, rows, cols, chip_size_px)
    imageable = (1.0 - share) <= DEMO_MAX_NODATA_SHARE + 1e-12
    width = max(4, len(str(n_units)))
    unit_ids = [f"V{i + 1:0{width}d}" for i in range(n_units)]

    outcome = np.round(draws["outcome"].to_numpy(), 4)
    market_access = np.round(draws["market_access"].to_numpy(), 2)
    treatment = draws["treatment"].to_numpy()
    tau = draws["tau"].to_numpy()

    out_dir.mkdir(parents=True, exist_ok=True)
    imagery_dir = out_dir / "imagery"
    imagery_dir.mkdir(exist_ok=True)
    for stale in imagery_dir.iterdir():
        # A rewritten study must not pick up a scene left from an earlier one.
        if stale.suffix.lower() in (".tif", ".tiff") and stale.name != scene_path.name:
            stale.unlink()
    shutil.copyfile(scene_path, imagery_dir / scene_path.name)

    survey = pd.DataFrame(
        {
            COLUMNS["unit_id"]: unit_ids,
            COLUMNS["lat"]: _fmt(lats, 7),
            COLUMNS["lon"]: _fmt(lons, 7),
            COLUMNS["treatment"]: treatment,
            COLUMNS["outcome"]: _fmt(outcome, 4),
            COLUMNS["proxy"]: _fmt(market_access, 2),
            COLUMNS["unrelated"]: draws["household_size"].to_numpy(),
        }
    )
    survey.to_csv(out_dir / "villages.csv", index=False, lineterminator="\n")

    truth_units = pd.DataFrame(
        {
            "unit_id": unit_ids,
            "confounder": _fmt(confounder, 6),
            "confounder_std": _fmt(z, 6),
            "propensity": _fmt(draws["propensity"], 6),
            "tau": _fmt(tau, 6),
            "y0": _fmt(draws["y0"], 6),
            "y1": _fmt(draws["y1"], 6),
            "treatment": treatment,
            "chip_valid_share": _fmt(share, 6),
            "imageable": imageable.astype(int),
            "row": rows,
            "col": cols,
        }
    )
    truth_units.to_csv(out_dir / "truth_units.csv", index=False, lineterminator="\n")

    def effects(mask: np.ndarray) -> dict:
        treated = mask & (treatment == 1)
        control = mask & (treatment == 0)
        naive = outcome[treated].mean() - outcome[control].mean() if treated.any() and control.any() else float("nan")
        return {
            "n": int(mask.sum()),
            "n_treated": int(treated.sum()),
            "ate": _r(tau[mask].mean()),
            "att": _r(tau[treated].mean()) if treated.any() else None,
            "naive_difference_in_means": _r(naive),
            "naive_bias": _r(naive - tau[mask].mean()),
        }

    everyone = effects(np.ones(n_units, dtype=bool))
    with rasterio.open(scene_path) as src:
        scene_meta = {
            "file": scene_path.name,
            "crs": src.crs.to_string(),
            "width": src.width,
            "height": src.height,
            "pixel_size_m": _r(img.pixel_size_m, 4),
            "declared_nodata": src.nodata,
            "valid_share": _r(img.valid.mean(), 6),
        }
    truth = {
        "estimand": "ATE: sample mean of tau_i over all units; ATT: over the treated units",
        "ate": everyone["ate"],
        "att": everyone["att"],
        "n_units": n_units,
        "n_treated": everyone["n_treated"],
        "naive_difference_in_means": everyone["naive_difference_in_means"],
        "naive_bias": everyone["naive_bias"],
        "imageable": {
            "rule": f"chip nodata share <= {DEMO_MAX_NODATA_SHARE} (the study's max_nodata_share)",
            **effects(imageable),
        },
        "seed": seed,
        "chip_size_px": chip_size_px,
        "scene": scene_meta,
        "confounder": {
            "definition": (
                "share of built-up pixels among the valid pixels within radius_px of the unit; "
                "built-up = relative brightness (mean over bands of DN / band median) above "
                "brightness_threshold AND its 3x3 local standard deviation above "
                "contrast_threshold (both the scene's valid-pixel builtup_quantile)"
            ),
            "radius_px": radius_px,
            "radius_m": _r(radius_px * img.pixel_size_m, 2),
            "builtup_quantile": builtup_quantile,
            "brightness_threshold": _r(b_threshold, 6),
            "contrast_threshold": _r(c_threshold, 6),
            "builtup_share_of_scene": _r(builtup.sum() / max(int(img.valid.sum()), 1), 6),
            "mean": _r(c_mean),
            "sd": _r(c_sd),
        },
        "process": {k: _r(v) for k, v in asdict(process).items()},
        "diagnostics": {
            "proxy_confounder_corr": _r(np.corrcoef(market_access, confounder)[0, 1], 6),
            "propensity_min": _r(draws["propensity"].min(), 6),
            "propensity_max": _r(draws["propensity"].max(), 6),
        },
        "columns": dict(COLUMNS),
    }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")

    study = {
        "name": DEMO_STUDY_NAME,
        "survey": {
            "path": "villages.csv",
            "unit_id": COLUMNS["unit_id"],
            "lat": COLUMNS["lat"],
            "lon": COLUMNS["lon"],
            "treatment": COLUMNS["treatment"],
            "outcome": COLUMNS["outcome"],
            "covariates": [COLUMNS["proxy"], COLUMNS["unrelated"]],
        },
        "imagery": {
            "source": "geotiff",
            "path": "imagery/",
            "chip_size_px": chip_size_px,
            "max_nodata_share": DEMO_MAX_NODATA_SHARE,
        },
        "embedding": {"method": "rcf", "n_features": 1024, "seed": 0},
        "analysis": {
            "estimators": ["difference_in_means", "ipw", "aipw", "dml"],
            "feature_sets": ["none", "tabular", "image", "tabular+image"],
            "folds": 5,
            "seed": 0,
        },
    }
    study_path = out_dir / "study.yaml"
    header = (
        "# eocausal demo study: semi-synthetic outcomes on real Landsat-8 pixels.\n"
        "# Generated by eocausal.simulate.write_demo_study; the known effects are in truth.json.\n"
    )
    study_path.write_text(header + yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return study_path


# --------------------------------------------------------------------------------------------
# Procedural scenes

# Land-cover spectra as DN-like values, Landsat-8-style anchors (blue, green, red, nir).
_SPECTRA = {
    "water": (7980.0, 7330.0, 6250.0, 5600.0),
    "forest": (7450.0, 6800.0, 6050.0, 9000.0),
    "crop": (7560.0, 7080.0, 6350.0, 10500.0),
    "bare": (8000.0, 7650.0, 7900.0, 9100.0),
    "built": (8400.0, 8100.0, 8350.0, 8600.0),
}
_NOISE_CELLS = {"terrain": (192, 96, 48), "settlement": (80, 40), "forest": (64, 24)}
_PARCEL_PX = (14, 22)  # parcel height, width


def _band_spectra(n_bands: int) -> dict[str, np.ndarray]:
    anchors = np.linspace(0.0, 3.0, n_bands) if n_bands > 4 else np.arange(n_bands, dtype=float)
    return {k: np.interp(anchors, np.arange(4.0), v).astype(np.float32) for k, v in _SPECTRA.items()}


class _ValueNoise:
    """Smooth random field: random values on a coarse lattice, smoothstep-interpolated.

    The lattice covers the whole scene, so any window of the field is computed on its own and
    the scene can be written strip by strip at any size.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int, cell: int):
        self.cell = cell
        self.lattice = rng.uniform(-1.0, 1.0, size=(height // cell + 2, width // cell + 2)).astype(
            np.float32
        )

    def window(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        u, v = rows / self.cell, cols / self.cell
        i, j = np.floor(u).astype(int), np.floor(v).astype(int)
        fu, fv = u - i, v - j
        fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
        lat = self.lattice
        a = lat[np.ix_(i, j)] * (1 - fv)[None, :] + lat[np.ix_(i, j + 1)] * fv[None, :]
        b = lat[np.ix_(i + 1, j)] * (1 - fv)[None, :] + lat[np.ix_(i + 1, j + 1)] * fv[None, :]
        return (a * (1 - fu)[:, None] + b * fu[:, None]).astype(np.float32)


def _octaves(fields: list[_ValueNoise], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    total = np.zeros((rows.size, cols.size), dtype=np.float32)
    weight = 1.0
    for f in fields:
        total += weight * f.window(rows, cols)
        weight *= 0.5
    return total


def write_procedural_scene(
    path: Path,
    width: int,
    height: int,
    seed: int = 0,
    crs: str = "EPSG:32633",
    n_bands: int = 3,
    zero_border: bool = True,
) -> Path:
    """Write a textured, Landsat-like uint16 GeoTIFF of any size (tiled, deflate, no nodata).

    Land cover: lakes and rivers (water), settlements (bright, textured blobs), farmland
    parcels (green crops and bright bare soil) and forest. With ``zero_border`` a wedge along
    the top and right edges is 0 in every band — an undeclared nodata border, as in real
    scenes. Written in strips, so the size is bounded by disk, not memory.
    """
    if width < 8 or height < 8:
        raise ValueError(f"scene must be at least 8x8 px, got {width}x{height}")
    if n_bands < 1:
        raise ValueError("n_bands must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target_crs = CRS.from_user_input(crs)
    transform = _scene_transform(target_crs, width, height)

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E]))
    fields = {
        name: [_ValueNoise(rng, height, width, cell) for cell in cells]
        for name, cells in _NOISE_CELLS.items()
    }
    n_parcels = (height // _PARCEL_PX[0] + 2, width // _PARCEL_PX[1] + 2)
    parcel_value = rng.random(n_parcels).astype(np.float32)
    parcel_shift = rng.integers(0, _PARCEL_PX[1], size=n_parcels[0])
    spectra = _band_spectra(n_bands)

    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": n_bands,
        "dtype": "uint16",
        "crs": target_crs.to_wkt(),
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "interleave": "pixel",
    }
    cols = np.arange(width)
    strip = 256
    with rasterio.open(path, "w", **profile) as dst:
        for s, row0 in enumerate(range(0, height, strip)):
            rows = np.arange(row0, min(row0 + strip, height))
            noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E, s]))
            block = _land_cover_block(
                rows, cols, fields, parcel_value, parcel_shift, spectra, noise_rng
            )
            if zero_border:
                v = (rows / height)[:, None]
                u = (cols / width)[None, :]
                outside = (v < 0.03 + 0.15 * u) | (u > 0.93 + 0.05 * v)
                block[:, outside] = 0
            dst.write(block, window=Window(0, row0, width, rows.size))
    return path


def _scene_transform(crs: CRS, width: int, height: int) -> Affine:
    """A 30 m grid (or ~30 m in degrees) centred in the CRS's area of use."""
    west, south, east, north = crs.area_of_use.bounds if crs.area_of_use else (-1.0, -1.0, 1.0, 1.0)
    lon0 = (west + east) / 2.0
    lat0 = max(min((south + north) / 2.0, 60.0), -60.0)
    if crs.is_geographic:
        res = 30.0 / 111_320.0
        x0, y0 = lon0, lat0
    else:
        res = 30.0 / crs.axis_info[0].unit_conversion_factor
        xs, ys = warp_transform("EPSG:4326", crs.to_wkt(), [lon0], [lat0])
        x0, y0 = xs[0], ys[0]
    return Affine(res, 0.0, x0 - width * res / 2.0, 0.0, -res, y0 + height * res / 2.0)


def _land_cover_block(rows, cols, fields, parcel_value, parcel_shift, spectra, rng) -> np.ndarray:
    terrain = _octaves(fields["terrain"], rows, cols)
    settlement = _octaves(fields["settlement"], rows, cols)
    forest = _octaves(fields["forest"], rows, cols)

    pr = rows // _PARCEL_PX[0]
    pc = (cols[None, :] + parcel_shift[pr][:, None]) // _PARCEL_PX[1]
    parcel = parcel_value[pr[:, None], pc]

    shape = (rows.size, cols.size)
    water = terrain < -0.55
    built = ~water & (settlement > 0.45 - 0.25 * terrain)
    woods = ~water & ~built & (forest > 0.35)
    bare = ~water & ~built & ~woods & (parcel < 0.22)
    crop = ~water & ~built & ~woods & ~bare

    n_bands = next(iter(spectra.values())).size
    out = np.empty((n_bands,) + shape, dtype=np.float32)
    # Per-pixel texture: roofs and streets in settlements, gentle variation elsewhere.
    texture = rng.standard_normal(shape).astype(np.float32)
    shade = 0.5 * (parcel - 0.5)
    for b in range(n_bands):
        band = np.zeros(shape, dtype=np.float32)
        band[water] = spectra["water"][b]
        band[woods] = spectra["forest"][b]
        band[crop] = spectra["crop"][b] * (1 + 0.04 * shade[crop])
        band[bare] = spectra["bare"][b] * (1 + 0.03 * shade[bare])
        band[built] = spectra["built"][b] + 450.0 * texture[built]
        band += 30.0 * rng.standard_normal(shape).astype(np.float32)  # sensor noise
        out[b] = band
    return np.clip(np.rint(out), 1, 65535).astype(np.uint16)
