"""The confounder zoo: a family of semi-synthetic studies with known truth on real and procedural
scenes, the evidence for the image representation and nuisance defaults (``eocausal simulate --zoo``).

Each :class:`ZooDesign` fixes a scene, a kind of image-borne confounder measured from the real
pixels around each unit (a land-cover share, an index, texture, edges, proximity to settlement,
or a nonlinear mix), its radius, the chip the study cuts, the outcome surface, the effect, the
treated share, the number of units and the overlap. As in :mod:`eocausal.montecarlo` the
replications are design-based: scene, units, chips and embeddings are fixed per design (computed
once, cached), and each replication redraws covariates, treatment and outcomes and cross-fits on
its own split. Per design the zoo reports

- the out-of-fold R² of the confounder from each image representation: the study default
  (``EmbeddingSpec()``, with its components chosen as the estimation stage chooses them), the
  previous default (whitened filters, whole-chip pooling, 64 components) and the outside reference
  the issue measured (unwhitened, uncentred unit-norm filters as ``+w``/``-w`` with threshold 0.5,
  512 x 2 features, 64 components, the same penalised linear learners);
- nuisance quality against an oracle that sees the confounder: propensity log-loss and AUC, and
  outcome R², cross-fitted vs the true functions;
- bias, RMSE, SE/sd and 95 % coverage for every estimator x feature set of the default, and for
  tabular+image AIPW under the previous default and the reference;
- the rates at which the fragility warnings fire (:mod:`eocausal.estimate.fragility`);
- wall time: embedding per representation, and fitting per replication.

Confounder kinds (``z`` is the kind's value at each unit, standardised over the units):

``bright_share``   share of built-up pixels (bright and textured: the demo's rule) within the radius
``dark_share``     share of dark pixels (water, shade: brightness below its 20th percentile)
``vegetation``     mean of a vegetation-like normalised difference (NIR - red with a NIR band,
                   green - red for visible-only scenes)
``texture``        mean 3 x 3 local contrast of brightness
``edge_density``   share of pixels whose brightness gradient is in the top 20 %
``settlement_proximity``  1 - d / r for d the distance to the nearest settlement core (built-up
                   share > 1/2 within 90 m), 0 beyond the radius
``mix``            nonlinear mix of bright and dark share: s_b + s_d + s_b * s_d on standardised shares
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.estimate.ate import estimate_effects
from eocausal.estimate.components import choose_components
from eocausal.simulate import (
    DEMO_SCENE,
    local_contrast,
    plm_effect,
    read_scene,
    relative_brightness,
    sample_unit_pixels,
    write_procedural_scene,
)
from eocausal.study import AnalysisSpec

ZOO_VERSION = "zoo-1"
CONFOUNDERS = (
    "bright_share", "dark_share", "vegetation", "texture", "edge_density", "settlement_proximity", "mix",
)
SCENES = ("landsat", "demo", "procedural")
# The real Landsat-8 scene shared with the project (not shipped in the package: 18 MB).
LANDSAT_SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
PROCEDURAL_SIZE_PX = 2000
FEATURE_SETS = ("none", "tabular", "image", "tabular+image")
# Fragility warnings fire beyond this |z| (difference of two specifications over its SE).
REPRESENTATIONS = ("default", "previous", "reference")
# The estimation stage's default image component count (analysis.image_components).
DEFAULT_COMPONENTS = 64
# ... and of the context window's components beside them.
DEFAULT_CONTEXT = AnalysisSpec.model_fields["context_components"].default


@dataclass(frozen=True)
class ZooDesign:
    name: str
    scene: str
    confounder: str
    radius_m: float
    chip_px: int = 64
    outcome: str = "linear"  # linear | nonlinear
    effect: str = "heterogeneous"  # constant | heterogeneous
    treated_share: float = 0.35
    n_units: int = 1500
    overlap: str = "strong"  # strong | weak
    seed: int = 0

    def __post_init__(self):
        if self.scene not in SCENES:
            raise ValueError(f"scene must be one of {SCENES}, got {self.scene!r}")
        if self.confounder not in CONFOUNDERS:
            raise ValueError(f"confounder must be one of {CONFOUNDERS}, got {self.confounder!r}")

    def within_chip(self, pixel_size_m: float = 30.0) -> bool:
        """Whether the confounder's disk fits inside the chip (radius <= half the chip's side)."""
        return self.radius_m <= self.chip_px * pixel_size_m / 2.0 + 1e-9


# Fifteen designs on three scenes; the last three put the confounder beyond the default chip.
ZOO = (
    ZooDesign("landsat_bright_750", "landsat", "bright_share", 750),
    ZooDesign("landsat_dark_500_nonlin", "landsat", "dark_share", 500, outcome="nonlinear",
              effect="constant", treated_share=0.25, n_units=2000),
    ZooDesign("landsat_vegetation_900_weak", "landsat", "vegetation", 900, treated_share=0.5,
              n_units=1000, overlap="weak"),
    ZooDesign("landsat_texture_600", "landsat", "texture", 600, outcome="nonlinear", treated_share=0.4,
              n_units=3000),
    ZooDesign("landsat_mix_750", "landsat", "mix", 750, outcome="nonlinear", treated_share=0.3),
    ZooDesign("landsat_bright_1500_chip128", "landsat", "bright_share", 1500, chip_px=128,
              treated_share=0.6, n_units=1000),
    ZooDesign("demo_bright_750", "demo", "bright_share", 750),
    ZooDesign("demo_edges_450_chip32", "demo", "edge_density", 450, chip_px=32, effect="constant",
              treated_share=0.2, n_units=1500),
    ZooDesign("demo_proximity_900", "demo", "settlement_proximity", 900, treated_share=0.15,
              n_units=800),
    ZooDesign("procedural_bright_750", "procedural", "bright_share", 750, n_units=2000, treated_share=0.4),
    ZooDesign("procedural_dark_600_n5000", "procedural", "dark_share", 600, outcome="nonlinear",
              treated_share=0.6, n_units=5000),
    ZooDesign("procedural_vegetation_900_n500", "procedural", "vegetation", 900, effect="constant",
              treated_share=0.2, n_units=500, overlap="weak"),
    ZooDesign("landsat_bright_3000_beyond", "landsat", "bright_share", 3000),
    ZooDesign("procedural_bright_2000_beyond", "procedural", "bright_share", 2000, n_units=2000,
              treated_share=0.4),
    ZooDesign("demo_dark_1500_beyond", "demo", "dark_share", 1500, outcome="nonlinear"),
)


def design_by_name(name: str) -> ZooDesign:
    for d in ZOO:
        if d.name == name:
            return d
    raise ValueError(f"no zoo design named {name!r}; known: {[d.name for d in ZOO]}")


# --- scenes and confounders ------------------------------------------------------------------


def scene_path(scene: str, cache_dir: Path, landsat: Path | None = None) -> Path:
    if scene == "demo":
        return DEMO_SCENE
    if scene == "landsat":
        path = Path(landsat) if landsat is not None else LANDSAT_SCENE
        if not path.exists():
            raise FileNotFoundError(f"the Landsat-8 scene is not at {path}: pass --landsat PATH")
        return path
    path = Path(cache_dir) / f"procedural_{PROCEDURAL_SIZE_PX}_6band.tif"
    if not path.exists():
        write_procedural_scene(path, PROCEDURAL_SIZE_PX, PROCEDURAL_SIZE_PX, seed=7, crs="EPSG:32736", n_bands=6)
    return path


def _disk(radius_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    return (yy * yy + xx * xx <= radius_px * radius_px).astype(np.float64)


def disk_mean(values: np.ndarray, valid: np.ndarray, radius_px: int) -> np.ndarray:
    """Mean of ``values`` over the valid pixels within ``radius_px`` of every pixel (FFT)."""
    from scipy.signal import fftconvolve

    kernel = _disk(max(int(radius_px), 1))
    num = fftconvolve(np.where(valid, values, 0.0), kernel, mode="same")
    den = fftconvolve(valid.astype(np.float64), kernel, mode="same")
    return num / np.maximum(den, 1e-9)


def pixel_maps(scene) -> dict[str, np.ndarray]:
    """Per-pixel layers the confounders average: built-up, dark, vegetation index, texture, edges,
    and the distance (px) to the nearest settlement core."""
    from scipy import ndimage

    valid = scene.valid
    brightness = relative_brightness(scene)
    contrast = local_contrast(brightness, valid)

    def q(a, p):
        return float(np.quantile(a[valid], p))

    built = (brightness > q(brightness, 0.7)) & (contrast > q(contrast, 0.7)) & valid
    dark = (brightness < q(brightness, 0.2)) & valid
    bands = scene.data.astype(np.float64)
    if len(bands) >= 4:
        red, nir = bands[min(2, len(bands) - 2)], bands[-1]
    else:  # visible only: green - red
        red, nir = bands[-1], bands[min(1, len(bands) - 1)]
    vegetation = np.where(valid, (nir - red) / np.maximum(nir + red, 1e-6), 0.0)
    gradient = np.hypot(ndimage.sobel(brightness, 0), ndimage.sobel(brightness, 1)) * valid
    edges = (gradient > q(gradient, 0.8)) & valid
    core = disk_mean(built.astype(float), valid, 3) > 0.5
    distance = ndimage.distance_transform_edt(~core) if core.any() else np.full(valid.shape, np.inf)
    return {
        "built": built.astype(float), "dark": dark.astype(float), "vegetation": vegetation,
        "texture": contrast.astype(float), "edges": edges.astype(float), "distance": distance,
    }


def confounder_values(maps: dict, valid: np.ndarray, kind: str, radius_px: int, rows, cols) -> np.ndarray:
    """The raw (unstandardised) confounder of ``kind`` at each unit's pixel."""
    def at(layer):
        return disk_mean(maps[layer], valid, radius_px)[rows, cols]

    if kind == "bright_share":
        return at("built")
    if kind == "dark_share":
        return at("dark")
    if kind == "vegetation":
        return at("vegetation")
    if kind == "texture":
        return at("texture")
    if kind == "edge_density":
        return at("edges")
    if kind == "settlement_proximity":
        return np.clip(1.0 - maps["distance"][rows, cols] / radius_px, 0.0, 1.0)
    if kind == "mix":
        b, d = _std(at("built")), _std(at("dark"))
        return b + d + b * d
    raise ValueError(f"unknown confounder {kind!r}")


def _std(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    sd = values.std()
    if not sd > 0:
        raise ValueError("the confounder does not vary over the units")
    return (values - values.mean()) / sd


# --- the process -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooProcess:
    """Treatment and outcomes given the standardised confounder z (as :class:`DemoProcess`, with
    the design's outcome surface, effect, treated share and overlap)."""

    outcome: str = "linear"
    effect: str = "heterogeneous"
    treated_share: float = 0.35
    overlap: str = "strong"
    proxy_correlation: float = 0.35
    outcome_confounder: float = 1.5
    noise_sd: float = 1.0

    @property
    def slope(self) -> float:
        return 1.2 if self.overlap == "strong" else 2.5

    @property
    def floor(self) -> float:
        return 0.03 if self.overlap == "strong" else 0.005

    def propensity(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        lo, hi = -10.0, 10.0
        for _ in range(60):  # intercept with mean propensity = treated share
            mid = (lo + hi) / 2
            if self._e(z, mid).mean() < self.treated_share:
                lo = mid
            else:
                hi = mid
        return self._e(z, (lo + hi) / 2)

    def _e(self, z, a0):
        return self.floor + (1 - 2 * self.floor) / (1 + np.exp(-(a0 + self.slope * z)))

    def surface(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        if self.outcome == "linear":
            return z
        return z + 0.5 * (z * z - 1.0) - 0.6 * np.tanh(2.0 * z)

    def tau(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        return np.ones_like(z) if self.effect == "constant" else 1.0 + 0.5 * z

    def draw(self, z: np.ndarray, rng: np.random.Generator, e: np.ndarray | None = None) -> dict:
        n = z.size
        rho = self.proxy_correlation
        proxy = rho * z + math.sqrt(1 - rho * rho) * rng.standard_normal(n)
        household = 1 + rng.poisson(3.5, n)
        h_std = (household - 4.5) / math.sqrt(3.5)
        e = self.propensity(z) if e is None else e
        d = (rng.random(n) < e).astype(int)
        mu0 = self.outcome_confounder * self.surface(z) + 0.4 * proxy + 0.25 * h_std
        tau = self.tau(z)
        y = mu0 + tau * d + self.noise_sd * rng.standard_normal(n)
        tabular = np.column_stack([50 + 10 * proxy, household]).astype(float)
        return {"y": y, "d": d, "e": e, "tabular": tabular, "mu0": mu0, "tau": tau}


def process_for(design: ZooDesign) -> ZooProcess:
    return ZooProcess(outcome=design.outcome, effect=design.effect, treated_share=design.treated_share,
                      overlap=design.overlap)


# --- the fixed part of a design --------------------------------------------------------------


@dataclass
class PreparedDesign:
    design: ZooDesign
    z: np.ndarray  # standardised confounder over the analysis units
    components: dict[str, np.ndarray]  # representation -> image components (leading first)
    context_components: np.ndarray  # the default representation of a chip twice as wide (half resolution)
    r2: dict[str, float]  # representation -> out-of-fold R² of z
    seconds: dict[str, float]  # representation -> embedding seconds
    settings: dict = field(default_factory=dict)


def _embedders():
    from eocausal.embed.embeddings import make_embedder
    from eocausal.embed.rcf import RCFEmbedder
    from eocausal.study import EmbeddingSpec

    spec = EmbeddingSpec()
    return {
        "default": (make_embedder(spec), spec.pca_components),
        "previous": (RCFEmbedder(n_features=1024, seed=0), 64),
        "reference": (RCFEmbedder(n_features=1024, seed=0, filters="raw", raw_bias=0.5), 64),
    }


def oof_r2(features: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold (5-fold) R² of ``target`` from ``features`` by ridge with a LOO-tuned penalty."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 4, 15)), features, target,
                             cv=KFold(5, shuffle=True, random_state=seed))
    return float(1.0 - np.mean((target - pred) ** 2) / np.var(target))


def prepare(design: ZooDesign, cache_dir: Path, landsat: Path | None = None, log=None) -> PreparedDesign:
    """Units, confounder, chips and every representation's components for one design (cached)."""
    from eocausal.embed.reduce import fit_pca
    from eocausal.montecarlo import downsample_chips, unit_chips

    log = log or (lambda m: None)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{ZOO_VERSION}_{design.name}.npz"
    meta_path = cached.with_suffix(".json")
    if cached.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("design") == asdict(design):
            with np.load(cached) as f:
                comps = {r: f[f"components_{r}"] for r in REPRESENTATIONS}
                context = f["context"]
                z = f["z"]
            if "chip" not in meta["r2"]:  # a cache written before the default took the context
                meta["r2"] |= _default_r2(comps["default"], context, z, meta["r2"]["auto_k"])
                meta_path.write_text(json.dumps(meta, indent=1))
            return PreparedDesign(design, z, comps, context, meta["r2"], meta["seconds"], meta["settings"])

    scene = read_scene(scene_path(design.scene, cache_dir, landsat))
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 0x200]))
    # Units whose context window (twice the chip) lies inside the raster, for the chip-scale check.
    rows, cols = sample_unit_pixels(scene.valid, design.n_units, 2 * design.chip_px, rng)
    maps = pixel_maps(scene)
    radius_px = max(1, int(round(design.radius_m / scene.pixel_size_m)))
    raw = confounder_values(maps, scene.valid, design.confounder, radius_px, rows, cols)
    chips, valid = unit_chips(scene.data, scene.valid, rows, cols, design.chip_px)
    keep = valid.mean(axis=(1, 2)) >= 0.8  # the pipeline's default max_nodata_share 0.2
    chips, valid, raw = chips[keep], valid[keep], raw[keep]
    wide, wide_valid = unit_chips(scene.data, scene.valid, rows[keep], cols[keep], 2 * design.chip_px)
    context_chips, context_valid = downsample_chips(wide, wide_valid, 2)
    del wide, wide_valid
    z = _std(raw)
    log(f"{design.name}: {int(keep.sum())} of {design.n_units} units imageable, chips {chips.shape}")

    components, seconds, r2 = {}, {}, {}
    for rep, (embedder, k) in _embedders().items():
        started = time.perf_counter()
        features = embedder.fit_transform(chips, valid)
        seconds[rep] = round(time.perf_counter() - started, 2)
        components[rep] = fit_pca(_finite(features), k, seed=0).transform(_finite(features))
        if rep == "default":
            context = _finite(embedder.fit_transform(context_chips, context_valid))
            context = fit_pca(context, k, seed=0).transform(context)
        log(f"{design.name}: {rep} embedded in {seconds[rep]:.0f} s")
    # R² of the confounder: the default's columns (chip + context), the chip's alone, the chip at the
    # count the CV would choose on a typical draw beside the context, and the fixed 64 of the other two.
    draw = process_for(design).draw(z, np.random.default_rng(0))
    k_auto = choose_components(draw["y"], draw["d"], draw["tabular"], components["default"]).n_components
    r2 |= _default_r2(components["default"], context, z, k_auto)
    r2["auto_k"] = k_auto
    r2["default_all"] = oof_r2(components["default"], z)
    r2["previous"] = oof_r2(components["previous"], z)
    r2["reference"] = oof_r2(components["reference"], z)
    settings = {"n_analysis_units": int(keep.sum()), "pixel_size_m": round(scene.pixel_size_m, 3),
                "radius_px": radius_px, "within_chip": design.within_chip(scene.pixel_size_m),
                "scene_file": scene.path.name}
    np.savez(cached, z=z, context=context, **{f"components_{r}": c for r, c in components.items()})
    meta_path.write_text(json.dumps({"design": asdict(design), "r2": r2, "seconds": seconds,
                                     "settings": settings}, indent=1))
    return PreparedDesign(design, z, components, context, r2, seconds, settings)


def _default_r2(chip: np.ndarray, context: np.ndarray, z: np.ndarray, auto_k: int) -> dict:
    """The confounder's R² from the default's image columns (the chip's 64 components and the
    context window's 32, ``default``), from the chip's alone (``chip``), and with the chip's
    ``auto_k`` components beside the context (``default_auto_k``)."""
    context = context[:, :DEFAULT_CONTEXT]
    return {"default": oof_r2(np.hstack([chip[:, :DEFAULT_COMPONENTS], context]), z),
            "chip": oof_r2(chip[:, :DEFAULT_COMPONENTS], z),
            "default_auto_k": oof_r2(np.hstack([chip[:, :auto_k], context]), z),
            "default_k": DEFAULT_COMPONENTS, "context_k": DEFAULT_CONTEXT}


def _finite(features: np.ndarray) -> np.ndarray:
    """Features with the rare non-finite entry (a chip without a valid window) set to the column mean."""
    if np.isfinite(features).all():
        return features
    return np.where(np.isfinite(features), features, np.nanmean(features, axis=0))


# --- replications ----------------------------------------------------------------------------


def replication_draw(prepared: PreparedDesign, rep: int) -> dict:
    """Replication ``rep``'s treatment and outcomes (the scene and units fixed, the draws redrawn):
    :meth:`ZooProcess.draw` from a seed of the design and the replication."""
    rng = np.random.default_rng(np.random.SeedSequence([prepared.design.seed, 0x2E9, rep]))
    return process_for(prepared.design).draw(prepared.z, rng)


def run_replication(prepared: PreparedDesign, rep: int, folds: int = 5) -> list[dict]:
    """One replication: draw, then fit the default's every estimator x feature set (the chip's
    components and the context window's, as the estimation stage's defaults), tabular+image AIPW
    under the previous default and the reference (the chip alone, as they were defined), the oracle
    nuisances, and the warnings."""
    from eocausal.estimate.fragility import context_check, specification_check

    design = prepared.design
    process = process_for(design)
    draw = replication_draw(prepared, rep)
    y, d, tab = draw["y"], draw["d"], draw["tabular"]
    truth = float(np.mean(draw["tau"]))
    truth_dml = plm_effect(draw["e"], draw["tau"])
    rows = []

    def record(representation, feature_set, results, seconds, extra=None):
        for estimator, r in results.items():
            target = truth_dml if estimator == "dml" else truth
            rows.append({
                "design": design.name, "replication": rep, "representation": representation,
                "feature_set": feature_set, "estimator": estimator, "truth": target,
                "estimate": r.estimate, "std_error": r.std_error, "ci_low": r.ci_low, "ci_high": r.ci_high,
                "covered": bool(r.ci_low <= target <= r.ci_high), "n": r.n, "n_treated": int(d.sum()),
                "seconds": seconds, **(extra or {}),
            })

    k = DEFAULT_COMPONENTS
    context = prepared.context_components[:, :DEFAULT_CONTEXT]
    chip = prepared.components["default"][:, :k]
    image = np.hstack([chip, context])
    choose_seconds = 0.0
    fitted = {}
    for fs, X in (("none", None), ("tabular", tab), ("image", image), ("tabular+image", np.hstack([tab, image]))):
        started = time.perf_counter()
        ests = ("difference_in_means",) if fs == "none" else ("ipw", "aipw", "dml")
        res = estimate_effects(y, d, X, estimators=ests, folds=folds, seed=rep)
        fitted[fs] = res
        seconds = time.perf_counter() - started + (choose_seconds if "image" in fs else 0.0)
        extra = {"n_components": k if "image" in fs else 0}
        if fs == "tabular+image":
            extra |= _nuisance_quality(res["aipw"].diagnostics, draw, process, prepared.z)
        record("default", fs, res, seconds, extra)
    for rep_name in ("previous", "reference"):
        res, seconds = comparison_fit(prepared, draw, rep_name, rep, folds)
        record(rep_name, "tabular+image", res, seconds, {"n_components": 64})
    # The alternatives measured and not kept as defaults: components chosen by CV nuisance loss
    # (eocausal.estimate.components), and the default's features with the CV penalties.
    started = time.perf_counter()
    auto_k = choose_components(y, d, tab, prepared.components["default"]).n_components
    X = np.hstack([tab, prepared.components["default"][:, :auto_k], context])
    res = estimate_effects(y, d, X, estimators=("aipw",), folds=folds, seed=rep)
    record("default_auto_k", "tabular+image", res, time.perf_counter() - started, {"n_components": auto_k})
    res = estimate_effects(y, d, np.hstack([tab, image]), estimators=("aipw",), folds=folds, seed=rep,
                           undersmooth=1.0)
    record("default_cv_penalty", "tabular+image", res, 0.0, {"n_components": k})

    # Fragility: specifications that should agree, and the chip-scale check.
    spec = specification_check(y, d, tab, prepared.components["default"], k, folds=folds, seed=rep,
                               headline=fitted["tabular+image"]["aipw"], context=context)
    scale = context_check(y, d, np.hstack([tab, chip]), folds=folds, seed=rep,
                          headline=fitted["tabular+image"]["aipw"])
    for row in rows:
        if row["representation"] == "default" and row["feature_set"] == "tabular+image":
            row["specification_z"] = spec.max_abs_z
            row["specification_warning"] = spec.warning
            row["chip_scale_z"] = scale.max_abs_z
            row["chip_scale_warning"] = scale.warning
    return rows


def comparison_fit(prepared: PreparedDesign, draw: dict, representation: str, rep: int,
                   folds: int = 5) -> tuple[dict, float]:
    """Tabular+image AIPW on the previous default's or the reference's components, as those were
    defined: the learners' penalties as their CV chose them, and each arm's outcome model fitted on
    its own units (the reference's per-arm RidgeCV; the previous default's per-arm ridge). Returns
    the results and the seconds."""
    started = time.perf_counter()
    X = np.hstack([draw["tabular"], prepared.components[representation]])
    res = estimate_effects(draw["y"], draw["d"], X, estimators=("aipw",), folds=folds, seed=rep, undersmooth=1.0,
                           outcome_arms="separate")
    return res, time.perf_counter() - started


def _nuisance_quality(diagnostics: dict, draw: dict, process: ZooProcess, z: np.ndarray) -> dict:
    """Cross-fitted vs oracle nuisance quality (from the AIPW diagnostics and the true functions)."""
    from sklearn.metrics import roc_auc_score

    d, e = draw["d"], np.clip(draw["e"], 1e-6, 1 - 1e-6)
    oracle_logloss = float(-np.mean(d * np.log(e) + (1 - d) * np.log(1 - e)))
    prop = diagnostics.get("propensity", {}) or {}
    out = {
        "propensity_auc": prop.get("auc"), "propensity_log_loss": prop.get("log_loss"),
        "oracle_propensity_auc": float(roc_auc_score(d, e)), "oracle_propensity_log_loss": oracle_logloss,
    }
    r2 = diagnostics.get("outcome_r2") or {}
    out["outcome_r2_control"] = r2.get("control")
    y, mu0 = draw["y"], draw["mu0"]
    control = d == 0
    out["oracle_outcome_r2_control"] = float(1 - np.var(y[control] - mu0[control]) / np.var(y[control]))
    return out


def run_design(prepared: PreparedDesign, replications: int, folds: int = 5, jobs: int = 1, log=None) -> pd.DataFrame:
    log = log or (lambda m: None)
    started = time.perf_counter()
    if jobs == 1:
        rows = []
        for rep in range(replications):
            rows.extend(run_replication(prepared, rep, folds))
    else:
        from joblib import Parallel, delayed

        batches = Parallel(n_jobs=jobs)(delayed(run_replication)(prepared, rep, folds) for rep in range(replications))
        rows = [row for batch in batches for row in batch]
    log(f"{prepared.design.name}: {replications} replications in {time.perf_counter() - started:.0f} s")
    return pd.DataFrame(rows)


# --- summaries ---------------------------------------------------------------------------------


def summarise(replicates: pd.DataFrame, prepared: dict[str, PreparedDesign]) -> pd.DataFrame:
    out = []
    keys = ["design", "representation", "feature_set", "estimator"]
    for key, g in replicates.groupby(keys, sort=False):
        p = prepared[key[0]]
        err = g["estimate"] - g["truth"]
        sd = float(g["estimate"].std(ddof=1))
        r = len(g)
        cov = float(g["covered"].mean())
        row = dict(zip(keys, key)) | {
            "within_chip": p.settings["within_chip"], "replications": r, "truth": float(g["truth"].mean()),
            "bias": float(err.mean()), "bias_over_se": float(err.mean() / g["std_error"].mean()),
            "rmse": float(np.sqrt(np.mean(err**2))),
            "se_sd_ratio": float(g["std_error"].mean() / sd) if sd > 0 else np.nan,
            "coverage": cov, "coverage_mc_se": math.sqrt(cov * (1 - cov) / r),
            "mean_seconds": float(g["seconds"].mean()),
            "confounder_r2": p.r2.get(key[1]) if key[2] in ("image", "tabular+image") else None,
            "n_components": float(g["n_components"].mean()) if "n_components" in g else None,
        }
        for check in ("specification", "chip_scale"):
            if f"{check}_z" in g and g[f"{check}_z"].notna().any():
                row[f"{check}_warning_rate"] = float(g[f"{check}_warning"].notna().mean())
                row[f"{check}_mean_abs_z"] = float(g[f"{check}_z"].abs().mean())
        for col in ("propensity_auc", "oracle_propensity_auc", "propensity_log_loss", "oracle_propensity_log_loss",
                    "outcome_r2_control", "oracle_outcome_r2_control"):
            if col in g and g[col].notna().any():
                row[col] = float(pd.to_numeric(g[col]).mean())
        out.append(row)
    return pd.DataFrame(out)


def headline_markdown(summary: pd.DataFrame, prepared: dict[str, PreparedDesign]) -> str:
    """One row per design: R² per representation, tabular+image AIPW of the default (bias/SE,
    RMSE, SE/sd, coverage), RMSE of the previous default and the reference, warning rates, time.

    "bias left" is the default's tabular+image AIPW bias as a share of tabular AIPW's (the
    confounding the image leaves), beside 1 - R² of the confounder from the default's columns: a
    linear adjustment leaves that share of the confounder, and where the bias is the
    representation's it is of that order (1-3.5 times it on the zoo, session 16)."""
    head = ("| design | in chip | n | R² default (chip + context) | R² chip | R² previous | R² reference | "
            "AIPW bias/SE | coverage | SE/sd | RMSE default | RMSE previous | RMSE reference | bias left (1 - R²) | "
            "spec warn | chip-scale warn | prop. AUC (oracle) | embed s (default) | fit s/rep |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    aipw = summary[(summary["feature_set"] == "tabular+image") & (summary["estimator"] == "aipw")]
    tabular = summary[(summary["feature_set"] == "tabular") & (summary["estimator"] == "aipw")
                      & (summary["representation"] == "default")].set_index("design")["bias"]
    for name, p in prepared.items():
        rows = aipw[aipw["design"] == name].set_index("representation")
        if "default" not in rows.index:
            continue
        dflt = rows.loc["default"]
        of_default = (summary["design"] == name) & (summary["representation"] == "default")
        fit_seconds = summary[of_default]["mean_seconds"].sum()

        def rmse(rep):
            return f"{rows.loc[rep, 'rmse']:.3f}" if rep in rows.index else "–"

        left = f"{dflt['bias'] / tabular[name]:+.3f}" if name in tabular.index and tabular[name] != 0 else "–"

        lines.append(
            f"| {name} | {'yes' if p.settings['within_chip'] else 'no'} | {p.settings['n_analysis_units']} | "
            f"{p.r2['default']:.3f} ({p.r2['default_k']} + {p.r2['context_k']}) | {p.r2['chip']:.3f} | "
            f"{p.r2['previous']:.3f} | {p.r2['reference']:.3f} | "
            f"{dflt['bias_over_se']:+.2f} | {dflt['coverage']:.2f} | {dflt['se_sd_ratio']:.2f} | "
            f"{dflt['rmse']:.3f} | {rmse('previous')} | {rmse('reference')} | {left} ({1 - p.r2['default']:.3f}) | "
            f"{dflt.get('specification_warning_rate', float('nan')):.2f} | "
            f"{dflt.get('chip_scale_warning_rate', float('nan')):.2f} | "
            f"{dflt.get('propensity_auc', float('nan')):.3f} ({dflt.get('oracle_propensity_auc', float('nan')):.3f}) | "
            f"{p.seconds['default']:.0f} | {fit_seconds:.2f} |"
        )
    return "\n".join(lines)


def plot_zoo(summary: pd.DataFrame, path: Path) -> Path:
    """Coverage and bias/SE of tabular+image AIPW per design and representation (one PNG)."""
    from matplotlib.figure import Figure

    from eocausal.figures import save_figure

    aipw = summary[(summary["feature_set"] == "tabular+image") & (summary["estimator"] == "aipw")]
    designs = list(dict.fromkeys(aipw["design"]))
    fig = Figure(figsize=(12, 0.38 * len(designs) + 2))
    ax_b, ax_c = fig.subplots(1, 2, sharey=True)
    colours = {"default": "tab:green", "previous": "tab:orange", "reference": "tab:blue"}
    for j, rep in enumerate(REPRESENTATIONS):  # (the default_auto_k / default_cv_penalty rows: summary.csv)
        part = aipw[aipw["representation"] == rep].set_index("design").reindex(designs)
        ys = np.arange(len(designs)) + (j - 1) * 0.25
        ax_b.plot(part["bias_over_se"], ys, "o", color=colours[rep], label=rep, ms=4)
        ax_c.errorbar(part["coverage"], ys, xerr=1.96 * part["coverage_mc_se"], fmt="o", color=colours[rep], ms=4)
    ax_b.axvspan(-0.3, 0.3, color="green", alpha=0.1)
    ax_b.axvline(0, color="black", lw=0.8)
    ax_b.set_yticks(range(len(designs)), designs, fontsize=8)
    ax_b.invert_yaxis()
    ax_b.set_xlabel("tabular+image AIPW bias / mean SE")
    ax_b.legend(fontsize=8)
    ax_c.axvspan(0.93, 0.97, color="green", alpha=0.12)
    ax_c.axvline(0.90, color="red", lw=0.8, ls="--")
    ax_c.set_xlim(-0.02, 1.02)
    ax_c.set_xlabel("95% CI coverage")
    fig.suptitle("eocausal confounder zoo: tabular+image AIPW by design and image representation", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run_zoo(designs, out_dir: Path, replications: int = 100, folds: int = 5, jobs: int = 1,
            landsat: Path | None = None, log=None) -> dict:
    """Prepare and run every design; write replications.csv, summary.csv, zoo.md, zoo.png and
    settings.json to ``out_dir`` (embeddings cached under ``out_dir/cache``).

    Results are merged design by design: after each design the files are rewritten with its rows
    replacing any earlier rows of that design in ``out_dir`` (so a subset of designs can be rerun,
    and a run that stops keeps the designs it finished). ``settings.json`` records when each
    design was last run."""
    log = log or (lambda m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared, frames = {}, []
    result: dict = {}
    for design in designs:
        design_started = time.perf_counter()
        p = prepare(design, out_dir / "cache", landsat, log)
        prepared[design.name] = p
        frame = run_design(p, replications, folds, jobs, log)
        frames.append(frame)
        result = _merge_results(out_dir, frame, p, replications, folds, jobs,
                                round(time.perf_counter() - design_started, 1), landsat, log)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _merge_results(out_dir: Path, frame: pd.DataFrame, p: PreparedDesign, replications: int, folds: int,
                   jobs: int, seconds: float, landsat: Path | None, log) -> dict:
    """Replace ``p``'s design rows in ``out_dir``'s results and rewrite every summary file."""
    rep_path, settings_path = out_dir / "replications.csv", out_dir / "settings.json"
    name = p.design.name
    old = pd.read_csv(rep_path) if rep_path.exists() else pd.DataFrame(columns=frame.columns)
    replicates = pd.concat([old[old["design"] != name], frame], ignore_index=True)
    order = {d.name: i for i, d in enumerate(ZOO)}
    replicates = replicates.sort_values(["design", "replication"], key=lambda c: c.map(order).fillna(len(order))
                                        if c.name == "design" else c, kind="stable").reset_index(drop=True)
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    settings.update({"zoo_version": ZOO_VERSION, "folds": folds})
    entry = asdict(p.design) | p.settings | {"r2": p.r2, "embed_seconds": p.seconds}
    entry |= {"replications": replications, "jobs": jobs, "seconds": seconds,
              "run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    settings.setdefault("designs", {})[name] = entry
    result = write_results(out_dir, replicates, landsat, log, {name: p})
    settings_path.write_text(json.dumps(settings, indent=1, default=str) + "\n", encoding="utf-8")
    return result


def write_results(out_dir: Path, replicates: pd.DataFrame, landsat: Path | None = None, log=None,
                  prepared: dict[str, PreparedDesign] | None = None, cache_dir: Path | None = None) -> dict:
    """Write replications.csv, summary.csv, zoo.md and zoo.png in ``out_dir`` from every design's
    replication rows (designs not in ``prepared`` come from the cache, ``out_dir/cache`` unless given)."""
    prepared = dict(prepared or {})
    cache_dir = Path(out_dir) / "cache" if cache_dir is None else Path(cache_dir)
    for design_name in replicates["design"].unique():
        if design_name not in prepared:  # from the cache (computed again only when it is missing)
            prepared[design_name] = prepare(design_by_name(design_name), cache_dir, landsat, log)
    prepared = {name: prepared[name] for name in replicates["design"].unique()}  # the zoo's order
    summary = summarise(replicates, prepared)
    (out_dir / "replications.csv").write_text(replicates.to_csv(index=False, lineterminator="\n", float_format="%.6g"))
    (out_dir / "summary.csv").write_text(summary.to_csv(index=False, lineterminator="\n", float_format="%.6g"))
    table = headline_markdown(summary, prepared)
    (out_dir / "zoo.md").write_text(table + "\n", encoding="utf-8")
    plot_zoo(summary, out_dir / "zoo.png")
    return {"summary": summary, "table": table, "prepared": prepared, "replicates": replicates}
