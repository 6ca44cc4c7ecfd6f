"""Simulated studies with known effects (DESIGN §6 "Simulation", §7 "The embedded demo study").

- :func:`write_demo_study` builds a semi-synthetic study on a real (or procedural) scene: units on
  valid pixels, an image-borne confounder measured from the real pixels around each unit (the
  built-up share within ~750 m: bright and textured pixels), a weak tabular proxy of it,
  treatment targeted by the confounder, and outcomes with a known, heterogeneous effect. It
  writes ``study.yaml``, ``villages.csv``, ``truth.json`` and ``truth_units.csv``; the same
  arguments always give byte-identical files.
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
# The demo's chip: the study default (64 px of 30 m, 1.92 km), what a user who does not know the
# confounder's footprint would choose. (Session 2 had cut it to 50 px, exactly the confounder's
# 1.5 km disk, to suit the whole-chip pooling of the time; the pooling scales of RCF algorithm 3
# make that unnecessary: benchmarks/results/zoo/, design demo_bright_750.)
DEMO_CHIP_SIZE_PX = 64

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
    effect_confounder: float = 1.0
    noise_sd: float = 1.0
    household_size_mean_extra: float = 3.5

    def propensity(self, confounder_std: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
        """P(D = 1 | z) = floor + (1 - 2 floor) sigmoid(a0 + a1 z). (``hidden``: see
        :class:`HiddenConfounderProcess`; the demo has no hidden confounder.)"""
        logit = self.propensity_intercept + self.propensity_slope * np.asarray(confounder_std, dtype=float)
        floor = self.propensity_floor
        return floor + (1.0 - 2.0 * floor) / (1.0 + np.exp(-logit))

    def draw_hidden(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """A confounder no image or survey column shows: none in the demo (and no draw from ``rng``)."""
        return None

    def draw(
        self, confounder_std: np.ndarray, rng: np.random.Generator, tau: np.ndarray | None = None
    ) -> pd.DataFrame:
        """Per-unit covariates, propensity, treatment, potential outcomes and effect.

        ``tau`` replaces the linear effect ``t0 + t1 z`` (e.g. a :class:`ClusteredEffect`'s); it
        takes no draws from ``rng``, so everything else is drawn exactly as without it. A process
        with a hidden confounder (:meth:`draw_hidden`) adds it to the propensity and the outcome,
        and returns it in ``hidden_confounder``.
        """
        z = np.asarray(confounder_std, dtype=float)
        n = z.size
        rho = self.proxy_correlation
        market_latent = rho * z + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n)
        household_size = 1 + rng.poisson(self.household_size_mean_extra, n)
        h_std = (household_size - (1 + self.household_size_mean_extra)) / math.sqrt(
            self.household_size_mean_extra
        )
        hidden = self.draw_hidden(rng, n)
        propensity = self.propensity(z, hidden)
        treatment = (rng.random(n) < propensity).astype(int)
        if tau is None:
            tau = self.effect_intercept + self.effect_confounder * z
        else:
            tau = np.asarray(tau, dtype=float)
            if tau.shape != z.shape:
                raise ValueError(f"tau has shape {tau.shape}, the units {z.shape}")
        y0 = (
            self.outcome_intercept
            + self.outcome_confounder * z
            + self.outcome_market_access * market_latent
            + self.outcome_household_size * h_std
        )
        if hidden is not None:
            y0 = y0 + self.hidden_outcome * hidden
        y0 = y0 + self.noise_sd * rng.standard_normal(n)
        y1 = y0 + tau
        columns = {"market_access": 50.0 + 10.0 * market_latent, "household_size": household_size}
        if hidden is not None:
            columns["hidden_confounder"] = hidden
        return pd.DataFrame(
            {
                **columns,
                "propensity": propensity,
                "treatment": treatment,
                "tau": tau,
                "y0": y0,
                "y1": y1,
                "outcome": np.where(treatment == 1, y1, y0),
            }
        )


@dataclass(frozen=True)
class ClusteredEffect:
    """A clustered effect for checking the image effect-cluster model (eocausal.estimate.clusters).

    Each unit's settlement class — a discrete land-use class seen in the image — is its image
    confounder (the built-up share around it) cut at the units' quantiles into K equal-sized
    classes, 0 = most rural ... K-1 = most urban; the effect is the class's value in ``effects``
    plus, optionally, N(0, spread^2) within the class. Treatment and outcome otherwise follow
    :class:`DemoProcess`.
    """

    effects: tuple[float, ...] = (-0.5, 2.5)
    spread: float = 0.0

    @classmethod
    def with_k(cls, k: int) -> "ClusteredEffect":
        """Evenly spaced effects 3 apart, centred on 1: K=2 (-0.5, 2.5), K=3 (-2, 1, 4), ..."""
        if k < 2:
            raise ValueError(f"a clustered effect needs K >= 2 classes, got {k}")
        return cls(effects=tuple(float(1.0 + 3.0 * (j - (k - 1) / 2.0)) for j in range(k)))

    @property
    def k(self) -> int:
        return len(self.effects)

    def classes(self, confounder: np.ndarray) -> np.ndarray:
        """Class 0..K-1 of each unit: the confounder's quantile bin among the units."""
        confounder = np.asarray(confounder, dtype=float)
        cuts = np.quantile(confounder, np.arange(1, self.k) / self.k)
        return np.searchsorted(cuts, confounder, side="right").astype(int)

    def tau(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        tau = np.asarray(self.effects, dtype=float)[classes]
        if self.spread > 0:
            tau = tau + self.spread * rng.standard_normal(len(tau))
        return tau


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
    chip_size_px: int = DEMO_CHIP_SIZE_PX,
    effect_clusters: ClusteredEffect | int | None = None,
) -> Path:
    """Write a semi-synthetic study on a scene (default: the shipped Landsat-8 crop).

    Files: ``study.yaml``, ``villages.csv``, ``imagery/<scene>``, ``truth.json``,
    ``truth_units.csv``. Returns the path of ``study.yaml``.

    ``effect_clusters`` (a :class:`ClusteredEffect`, or K for ``ClusteredEffect.with_k(K)``) makes
    the effect clustered by the units' settlement class; ``truth_units.csv`` then has the class in
    ``effect_cluster`` and ``truth.json`` an ``effect_clusters`` section. Without it the files are
    exactly those of the linear-effect demo.
    """
    if isinstance(effect_clusters, int) and not isinstance(effect_clusters, bool):
        effect_clusters = ClusteredEffect.with_k(effect_clusters)
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
    effect_class = clustered_tau = None
    if effect_clusters is not None:
        # Own stream: the other draws stay those of the linear-effect demo.
        effect_class = effect_clusters.classes(confounder)
        clustered_tau = effect_clusters.tau(
            effect_class, np.random.default_rng(np.random.SeedSequence([seed, 0xC1A55]))
        )
    draws = process.draw(z, process_rng, tau=clustered_tau)

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
    if effect_class is not None:
        truth_units["effect_cluster"] = effect_class
    truth_units.to_csv(out_dir / "truth_units.csv", index=False, lineterminator="\n")

    propensity = draws["propensity"].to_numpy()

    def effects(mask: np.ndarray) -> dict:
        treated = mask & (treatment == 1)
        control = mask & (treatment == 0)
        naive = outcome[treated].mean() - outcome[control].mean() if treated.any() and control.any() else float("nan")
        return {
            "n": int(mask.sum()),
            "n_treated": int(treated.sum()),
            "ate": _r(tau[mask].mean()),
            "att": _r(tau[treated].mean()) if treated.any() else None,
            "variance_weighted_effect": _r(plm_effect(propensity[mask], tau[mask])),
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
        "estimand": (
            "ATE: sample mean of tau_i over all units; ATT: over the treated units; "
            "variance_weighted_effect: sum e_i (1 - e_i) tau_i / sum e_i (1 - e_i), the target of the "
            "partially linear model (dml) when the effect varies with the propensity"
        ),
        "ate": everyone["ate"],
        "att": everyone["att"],
        "variance_weighted_effect": everyone["variance_weighted_effect"],
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
    if effect_clusters is not None:
        truth["effect_clusters"] = {
            "definition": (
                "settlement class: the confounder (built-up share) cut at its unit quantiles into K "
                "equal-sized classes, 0 = most rural; tau = effects[class] (+ N(0, spread^2))"
            ),
            "k": effect_clusters.k,
            "effects": [_r(v) for v in effect_clusters.effects],
            "spread": _r(effect_clusters.spread),
            "class_counts": np.bincount(effect_class, minlength=effect_clusters.k).tolist(),
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
        "embedding": {"method": "rcf", "seed": 0},  # the study defaults (eocausal.study.EmbeddingSpec)
        "analysis": {
            "estimators": ["difference_in_means", "ipw", "aipw", "dml"],
            "feature_sets": ["none", "tabular", "image", "tabular+image"],
            "folds": 5,
            "seed": 0,
        },
    }
    if effect_clusters is not None:
        study["heterogeneity"] = {"clusters": effect_clusters.k}  # fit as many clusters as there are
    study_path = out_dir / "study.yaml"
    header = (
        "# eocausal demo study: semi-synthetic outcomes on real Landsat-8 pixels.\n"
        "# Generated by eocausal.simulate.write_demo_study; the known effects are in truth.json.\n"
    )
    study_path.write_text(header + yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return study_path


# The demo deployment's second study: the demo under another analysis seed (other cross-fitting folds).
DEMO_SEED_VARIANT = 7


def write_seed_variant(study_path: Path, out_dir: Path, analysis_seed: int = DEMO_SEED_VARIANT,
                       name: str | None = None) -> Path:
    """A copy of a study under another analysis seed: the same survey, imagery and truth files (copied:
    a study's paths stay inside its folder), `name` (default ``<name>_seed<seed>``), and its own
    working folder beside it. Returns the new ``study.yaml``."""
    study_path, out_dir = Path(study_path), Path(out_dir)
    doc = yaml.safe_load(study_path.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in study_path.parent.iterdir():
        if entry.name in (study_path.name, "eocausal_work", "landing") or entry.name.startswith("."):
            continue
        target = out_dir / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target)
    doc["name"] = name or f"{doc['name']}_seed{analysis_seed}"
    doc.setdefault("analysis", {})["seed"] = analysis_seed
    header = (f"# {doc['name']}: the study {study_path.parent.name}/{study_path.name} under analysis seed "
              f"{analysis_seed}\n"
              "# Generated by eocausal.simulate.write_seed_variant.\n")
    target = out_dir / "study.yaml"
    target.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return target


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


# --------------------------------------------------------------------------------------------
# Missing outcomes, and a confounder the image does not show (outcome imputation, sensitivity)

# The hidden confounder's survey column, in studies where it is revealed (measured) after all.
HIDDEN_CONFOUNDER_COLUMN = "deprivation_index"
_QUADRATURE_NODES = 64


def missing_outcomes(n: int, missing_share: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(missing_share * n) units, uniformly at random (missing completely at random)."""
    if not 0.0 <= missing_share < 1.0:
        raise ValueError(f"missing_share must lie in [0, 1), got {missing_share}")
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=int(round(missing_share * n)), replace=False)] = True
    return mask


def plm_effect(propensity: np.ndarray, tau: np.ndarray) -> float:
    """What the partially linear (DML) estimator targets: the effect weighted by Var(D | X),
    sum e(1 - e) tau / sum e(1 - e). Equal to the ATE when the effect is constant."""
    w = np.asarray(propensity) * (1.0 - np.asarray(propensity))
    return float(np.sum(w * np.asarray(tau)) / np.sum(w))


@dataclass(frozen=True)
class HiddenConfounderProcess(DemoProcess):
    """The demo process plus a confounder no image and no survey column shows: local deprivation
    ``u ~ N(0, 1)``, independent of the image confounder ``z``.

    - propensity ``e = floor + (1 - 2 floor) sigmoid(a0 + a1 z + a_u u)``: the programme targets
      deprived places (``hidden_propensity`` > 0);
    - outcome ``Y0`` as in :class:`DemoProcess` plus ``hidden_outcome * u``: deprivation lowers the
      asset index (< 0), so leaving ``u`` out biases the estimate towards zero.

    The defaults give ``u`` a partial R² of about 0.37 with the outcome and 0.31 with the
    treatment (0.38 as the AIPW's Riesz gain; :meth:`strengths`) and a true ATE of
    1.6 + effect_confounder mean(z). Adjusting for ``u``, the estimate is robust to a confounder
    as strong as ``u``; leaving it out (estimate about 0.68) it is not — which a sensitivity
    analysis should say without knowing ``u``. (Chosen, with the propensity floor at 0.1, so that both hold with
    a margin for AIPW and DML alike.)
    """

    propensity_floor: float = 0.1
    propensity_slope: float = 0.6
    effect_intercept: float = 1.6
    hidden_propensity: float = 2.6
    hidden_outcome: float = -0.9

    def propensity(self, z: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        logit = self.propensity_intercept + self.propensity_slope * z + self.hidden_propensity * hidden
        floor = self.propensity_floor
        return floor + (1.0 - 2.0 * floor) / (1.0 + np.exp(-logit))

    def draw_hidden(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal(n)

    def strengths(self, confounder_std: np.ndarray) -> dict:
        """How strong the hidden confounder is beyond what image and survey show (z; the survey's
        covariates are independent of it), on the units given — in the terms of the sensitivity
        analysis (:mod:`eocausal.estimate.sensitivity`), computed exactly by Gauss-Hermite
        quadrature over u:

        - ``r2_outcome``: partial R² of u with the outcome given (D, z, covariates):
          hidden_outcome² E[Var(u | D, z)] / (noise_sd² + hidden_outcome² E[Var(u | D, z)]);
        - ``r2_treatment``: partial R² of u with the treatment given z (the partially linear
          model's r_d): E[(e(z, u) - e(z))²] / E[(D - e(z))²];
        - ``riesz_gain``: the AIPW (ATE) r_d, 1 - E[1/e(z) + 1/(1-e(z))] / E[1/e(z,u) + 1/(1-e(z,u))];
        - ``ate`` and ``plm_effect_long``: what AIPW and DML estimate when they adjust for u.
        """
        from numpy.polynomial.hermite_e import hermegauss

        z = np.asarray(confounder_std, dtype=float)
        nodes, weights = hermegauss(_QUADRATURE_NODES)
        weights = weights / weights.sum()
        e_long = self.propensity(z[:, None], nodes[None, :])  # units x nodes
        e_short = e_long @ weights
        var_d_long = (e_long * (1.0 - e_long)) @ weights
        gap = np.square(e_long - e_short[:, None]) @ weights
        r2_treatment = gap.mean() / (var_d_long.mean() + gap.mean())
        nu2_long = ((1.0 / e_long + 1.0 / (1.0 - e_long)) @ weights).mean()
        nu2_short = (1.0 / e_short + 1.0 / (1.0 - e_short)).mean()
        var_u = np.zeros_like(z)
        for arm_density in (e_long, 1.0 - e_long):  # density of u given D = d, z (up to a constant)
            p_arm = arm_density @ weights
            m1 = (arm_density * nodes) @ weights / p_arm
            m2 = (arm_density * nodes**2) @ weights / p_arm
            var_u += p_arm * (m2 - m1 * m1)
        explained = self.hidden_outcome**2 * var_u.mean()
        tau = self.effect_intercept + self.effect_confounder * z
        return {
            "r2_outcome": float(explained / (self.noise_sd**2 + explained)),
            "r2_treatment": float(r2_treatment),
            "riesz_gain": float(1.0 - nu2_short / nu2_long),
            "ate": float(tau.mean()),
            "plm_effect_long": float(np.sum(var_d_long * tau) / np.sum(var_d_long)),
        }


def _rewrite_study_yaml(study_path: Path, header: str, **analysis_or_survey) -> None:
    doc = yaml.safe_load(study_path.read_text(encoding="utf-8"))
    for section, values in analysis_or_survey.items():
        doc[section].update(values)
    study_path.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def write_imputation_study(
    out_dir: Path,
    missing_share: float = 0.7,
    n_units: int = 1500,
    seed: int = 0,
    scene: Path | None = None,
    chip_size_px: int = DEMO_CHIP_SIZE_PX,
) -> Path:
    """The demo study with the outcome blanked for a known share of units, missing completely at
    random, and ``analysis.outcome_imputation: true``. ``truth.json`` keeps the full-sample
    effects (the target) and says which share is missing; ``truth_units.csv`` gains
    ``outcome_measured``. Returns the path of ``study.yaml``."""
    out_dir = Path(out_dir)
    study_path = write_demo_study(out_dir, n_units=n_units, seed=seed, scene=scene, chip_size_px=chip_size_px)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A7E]))  # own stream: demo draws unchanged
    villages = pd.read_csv(out_dir / "villages.csv", dtype=str, keep_default_na=False)
    missing = missing_outcomes(len(villages), missing_share, rng)
    villages.loc[missing, COLUMNS["outcome"]] = ""
    villages.to_csv(out_dir / "villages.csv", index=False, lineterminator="\n")
    truth_units = pd.read_csv(out_dir / "truth_units.csv", dtype=str, keep_default_na=False)
    truth_units["outcome_measured"] = (~missing).astype(int)
    truth_units.to_csv(out_dir / "truth_units.csv", index=False, lineterminator="\n")
    truth = json.loads((out_dir / "truth.json").read_text(encoding="utf-8"))
    truth["outcome_missing"] = {
        "mechanism": "missing completely at random: a uniformly random subset of exactly "
                     "round(missing_share * n_units) units has no outcome",
        "missing_share": _r(missing_share),
        "n_missing": int(missing.sum()),
        "n_measured": int((~missing).sum()),
        "target": "the effects above are over all units, measured or not",
    }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    _rewrite_study_yaml(
        study_path,
        "# eocausal demo study with missing outcomes (outcome imputation); truth in truth.json.\n",
        analysis={"outcome_imputation": True},
    )
    return study_path


def write_hidden_confounder_study(
    out_dir: Path,
    hidden: bool = True,
    n_units: int = 1500,
    seed: int = 0,
    scene: Path | None = None,
    chip_size_px: int = DEMO_CHIP_SIZE_PX,
    process: HiddenConfounderProcess | None = None,
) -> Path:
    """The demo study drawn from :class:`HiddenConfounderProcess`: a confounder that no image shows.

    ``hidden=True`` leaves it out of the survey too (nothing the analysis can adjust for captures
    it); ``hidden=False`` reveals it as the survey covariate ``deprivation_index`` (nothing is
    hidden). The same seed gives the same units, confounder and draws either way. ``truth.json``
    holds the effects and, under ``hidden_confounder``, the confounder's actual strengths over
    the imageable units (:meth:`HiddenConfounderProcess.strengths`)."""
    out_dir = Path(out_dir)
    process = process or HiddenConfounderProcess()
    study_path = write_demo_study(out_dir, n_units=n_units, seed=seed, scene=scene, chip_size_px=chip_size_px)
    truth_units = pd.read_csv(out_dir / "truth_units.csv", dtype={"unit_id": str})
    z = truth_units["confounder_std"].to_numpy(dtype=float)
    draws = process.draw(z, np.random.default_rng(np.random.SeedSequence([seed, 0x41DE])))
    treatment = draws["treatment"].to_numpy()
    outcome = np.round(draws["outcome"].to_numpy(), 4)
    tau = draws["tau"].to_numpy()

    villages = pd.read_csv(out_dir / "villages.csv", dtype=str, keep_default_na=False)
    villages[COLUMNS["treatment"]] = treatment
    villages[COLUMNS["outcome"]] = _fmt(outcome, 4)
    villages[COLUMNS["proxy"]] = _fmt(np.round(draws["market_access"].to_numpy(), 2), 2)
    villages[COLUMNS["unrelated"]] = draws["household_size"].to_numpy()
    if not hidden:
        villages[HIDDEN_CONFOUNDER_COLUMN] = _fmt(draws["hidden_confounder"].to_numpy(), 4)
    villages.to_csv(out_dir / "villages.csv", index=False, lineterminator="\n")

    for col, digits in (("propensity", 6), ("tau", 6), ("y0", 6), ("y1", 6), ("hidden_confounder", 6)):
        truth_units[col] = _fmt(draws[col], digits)
    truth_units["treatment"] = treatment
    truth_units.to_csv(out_dir / "truth_units.csv", index=False, lineterminator="\n")

    imageable = truth_units["imageable"].to_numpy(dtype=int) == 1

    def effects(mask: np.ndarray) -> dict:
        treated, control = mask & (treatment == 1), mask & (treatment == 0)
        naive = outcome[treated].mean() - outcome[control].mean()
        return {"n": int(mask.sum()), "n_treated": int(treated.sum()), "ate": _r(tau[mask].mean()),
                "att": _r(tau[treated].mean()), "naive_difference_in_means": _r(naive),
                "naive_bias": _r(naive - tau[mask].mean())}

    truth = json.loads((out_dir / "truth.json").read_text(encoding="utf-8"))
    everyone = effects(np.ones(len(z), dtype=bool))
    truth.update({k: everyone[k] for k in ("ate", "att", "n_treated", "naive_difference_in_means", "naive_bias")})
    truth["imageable"].update(effects(imageable))
    truth["process"] = {k: _r(v) for k, v in asdict(process).items()}
    truth["diagnostics"].update({
        "propensity_min": _r(draws["propensity"].min(), 6),
        "propensity_max": _r(draws["propensity"].max(), 6),
    })
    truth["hidden_confounder"] = {
        "definition": "local deprivation u ~ N(0, 1), independent of the image confounder; it raises "
                      "the chance of treatment and lowers the outcome, and no image shows it",
        "visible": not hidden,
        "survey_column": None if hidden else HIDDEN_CONFOUNDER_COLUMN,
        "strengths_over_imageable_units": {k: _r(v, 6) for k, v in process.strengths(z[imageable]).items()},
    }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    covariates = [COLUMNS["proxy"], COLUMNS["unrelated"]] + ([] if hidden else [HIDDEN_CONFOUNDER_COLUMN])
    _rewrite_study_yaml(
        study_path,
        "# eocausal demo study with a confounder the image does not show "
        f"({'hidden' if hidden else f'revealed as {HIDDEN_CONFOUNDER_COLUMN}'}); truth in truth.json.\n",
        survey={"covariates": covariates},
    )
    return study_path


# --------------------------------------------------------------------------------------------
# Monte Carlo: outcome imputation coverage, and robustness values against a hidden confounder.
# Design-based: the units and their image features are fixed; each replication redraws the
# covariates, treatment, outcomes (and which outcomes are missing) with its own seed.


def _standardise(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    sd = values.std()
    return (values - values.mean()) / (sd if sd > 0 else 1.0)


def _survey_features(draws: pd.DataFrame, image_features: np.ndarray, extra=()) -> np.ndarray:
    columns = [_standardise(draws["market_access"]), _standardise(draws["household_size"]), *extra]
    return np.column_stack([*columns, np.asarray(image_features, dtype=float)])


def imputation_monte_carlo(
    confounder_std: np.ndarray,
    image_features: np.ndarray,
    n_replications: int,
    missing_share: float = 0.7,
    estimators=("aipw", "dml"),
    randomised: bool = False,
    folds: int = 5,
    seed: int = 0,
    log=None,
) -> pd.DataFrame:
    """Per replication and estimator: the estimate with every outcome measured (``all_measured``),
    on the measured units only (``measured``), and on all units with the imputed outcomes
    corrected (``imputed_corrected``) or plugged in (``imputed_plugin``); each row has its CI and
    whether it covers the truth (the ATE, or for DML its variance-weighted target).

    Features: the two survey covariates and ``image_features`` (e.g. the embedding's principal
    components). ``randomised``: treatment is a fair coin (a trial) instead of the demo's
    image-targeted assignment.
    """
    from eocausal.estimate.ate import estimate_effects
    from eocausal.estimate.imputation import CORRECTED, MEASURED, PLUGIN, impute_outcomes

    process = DemoProcess()
    if randomised:
        from dataclasses import replace

        process = replace(process, propensity_intercept=0.0, propensity_slope=0.0)
    z = np.asarray(confounder_std, dtype=float)
    rows = []
    for rep in range(n_replications):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A7E, rep]))
        draws = process.draw(z, rng)
        X = _survey_features(draws, image_features)
        d = draws["treatment"].to_numpy()
        y = draws["outcome"].to_numpy()
        missing = missing_outcomes(len(y), missing_share, rng)
        imputed = impute_outcomes(np.where(missing, np.nan, y), d, X, folds=folds, seed=rep)
        tau = draws["tau"].to_numpy()
        truth = {e: (plm_effect(draws["propensity"], tau) if e == "dml" else float(tau.mean())) for e in estimators}
        runs = {
            "all_measured": (y, d, X),
            MEASURED: (y[~missing], d[~missing], X[~missing]),
            CORRECTED: (imputed.corrected, d, X),
            PLUGIN: (imputed.filled, d, X),
        }
        for source, (y_s, d_s, X_s) in runs.items():
            results = estimate_effects(y_s, d_s, X_s, estimators=tuple(estimators), folds=folds, seed=rep)
            for estimator, res in results.items():
                rows.append({
                    "replication": rep, "estimator": estimator, "outcome_source": source,
                    "estimate": res.estimate, "std_error": res.std_error, "ci_low": res.ci_low,
                    "ci_high": res.ci_high, "truth": truth[estimator],
                    "covers": bool(res.ci_low <= truth[estimator] <= res.ci_high),
                    "n_measured": int((~missing).sum()), "power": json.dumps(imputed.diagnostics["power"]),
                })
        if log and (rep + 1) % 10 == 0:
            log(f"imputation Monte Carlo: {rep + 1}/{n_replications} replications")
    return pd.DataFrame(rows)


def coverage_table(results: pd.DataFrame) -> pd.DataFrame:
    """Bias, SD, mean SE, RMSE, 95% CI coverage (with its Monte Carlo SE) and CI width per
    estimator x outcome source."""
    order = {"all_measured": 0, "measured": 1, "imputed_corrected": 2, "imputed_plugin": 3}
    rows = []
    for (estimator, source), g in results.groupby(["estimator", "outcome_source"], sort=False):
        error = g["estimate"] - g["truth"]
        coverage = float(g["covers"].mean())
        rows.append({
            "estimator": estimator, "outcome_source": source, "replications": len(g),
            "bias": float(error.mean()), "sd": float(g["estimate"].std(ddof=1)),
            "mean_se": float(g["std_error"].mean()), "rmse": float(np.sqrt(np.mean(error**2))),
            "coverage": coverage, "coverage_mc_se": float(np.sqrt(coverage * (1 - coverage) / len(g))),
            "mean_ci_width": float((g["ci_high"] - g["ci_low"]).mean()),
        })
    table = pd.DataFrame(rows)
    return table.sort_values(["estimator", "outcome_source"],
                             key=lambda c: c.map(order) if c.name == "outcome_source" else c).reset_index(drop=True)


def sensitivity_monte_carlo(
    confounder_std: np.ndarray,
    image_features: np.ndarray,
    n_replications: int,
    process: HiddenConfounderProcess | None = None,
    estimators=("aipw", "dml"),
    folds: int = 5,
    seed: int = 0,
    log=None,
) -> tuple[pd.DataFrame, dict]:
    """Per replication, world and estimator: the robustness values when the confounder is hidden
    (features: survey covariates + image) and when nothing is hidden (the confounder added as a
    covariate), beside its actual strengths, and whether the bounds at those strengths cover
    the truth. Returns the rows and the strengths."""
    from eocausal.estimate.sensitivity import (
        bounds,
        robustness_value,
        robustness_value_alpha,
        sensitivity_for_effects,
    )

    process = process or HiddenConfounderProcess()
    z = np.asarray(confounder_std, dtype=float)
    strengths = process.strengths(z)
    truth = {"aipw": strengths["ate"], "dml": strengths["plm_effect_long"]}
    r2_treatment = {"aipw": strengths["riesz_gain"], "dml": strengths["r2_treatment"]}
    rows = []
    for rep in range(n_replications):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x41DE, rep]))
        draws = process.draw(z, rng)
        d = draws["treatment"].to_numpy()
        y = draws["outcome"].to_numpy()
        worlds = {
            "hidden": _survey_features(draws, image_features),
            "nothing_hidden": _survey_features(draws, image_features, extra=[draws["hidden_confounder"].to_numpy()]),
        }
        for world, X in worlds.items():
            stats = sensitivity_for_effects(y, d, X, tuple(estimators), folds=folds, seed=rep)
            for estimator, s in stats.items():
                rv = robustness_value(s)
                at_actual = bounds(s, strengths["r2_outcome"], r2_treatment[estimator])
                rows.append({
                    "replication": rep, "world": world, "estimator": estimator, "estimate": s.theta,
                    "std_error": s.std_error, "truth": truth[estimator],
                    "robustness_value": rv, "robustness_value_alpha": robustness_value_alpha(s),
                    "r2_outcome": strengths["r2_outcome"], "r2_treatment": r2_treatment[estimator],
                    "rv_below_both": bool(rv < min(strengths["r2_outcome"], r2_treatment[estimator])),
                    "rv_above_both": bool(rv > max(strengths["r2_outcome"], r2_treatment[estimator])),
                    "bounds_at_actual_cover_truth": bool(
                        float(at_actual["ci_lower"]) <= truth[estimator] <= float(at_actual["ci_upper"])
                    ),
                    "bounds_at_actual_include_zero":
                        bool(float(at_actual["theta_lower"]) <= 0 <= float(at_actual["theta_upper"])),
                })
        if log and (rep + 1) % 10 == 0:
            log(f"sensitivity Monte Carlo: {rep + 1}/{n_replications} replications")
    return pd.DataFrame(rows), strengths


def robustness_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per world x estimator: mean estimate and truth, median RV / RV_alpha, the confounder's
    actual strengths, and the shares of replications where RV is below / above both."""
    rows = []
    for (world, estimator), g in results.groupby(["world", "estimator"], sort=False):
        rows.append({
            "world": world, "estimator": estimator, "replications": len(g),
            "mean_estimate": float(g["estimate"].mean()), "truth": float(g["truth"].iloc[0]),
            "median_rv": float(g["robustness_value"].median()),
            "median_rv_alpha": float(g["robustness_value_alpha"].median()),
            "r2_outcome": float(g["r2_outcome"].iloc[0]), "r2_treatment": float(g["r2_treatment"].iloc[0]),
            "share_rv_below_both": float(g["rv_below_both"].mean()),
            "share_rv_above_both": float(g["rv_above_both"].mean()),
            "share_bounds_at_actual_cover_truth": float(g["bounds_at_actual_cover_truth"].mean()),
        })
    return pd.DataFrame(rows)
