"""Monte Carlo harness: bias, RMSE and 95 % CI coverage of every estimator x feature set on
studies drawn from the demo process (DESIGN §6 "Simulation"; ``eocausal simulate``).

It is a *design-based* Monte Carlo. What a replication of a whole study would redraw — scene,
unit locations, chips, embeddings — is drawn and computed once (:func:`prepare_design`, the
same units as ``eocausal demo`` with the same seed); each replication then redraws the tabular
covariates, treatment and outcomes from the known process (:class:`DemoProcess`) with its own
seed, and cross-fits on its own fold split. The results therefore describe the estimators over
the assignment and outcome noise for this set of units, and the truth of every replication is the
same sample ATE, the mean of tau_i = 1 + z_i over the analysis units (for ``dml``, the partially
linear model, its own target: the Var(D | z)-weighted effect, see :meth:`MonteCarloDesign.truth`).
The AIPW standard error also counts the spread of tau over units, which this design holds fixed.

Scenarios:

- ``demo``: the demo process as shipped: the confounder is the built-up share within 750 m,
  inside the 50-px (1.5 km) chip, which the disk fills.
- ``resolution_x2``, ``_x4``, ``_x8``: the same draws, with chips block-averaged by 2, 4 and 8
  (60, 120, 240 m pixels) and re-embedded once each: the image keeps less of the texture that
  defines built-up land, so image adjustment leaves more bias.
- ``confounder_3km``: the confounder is the built-up share within 3 km, a scale the chip does
  not cover: the image holds only part of the confounder (a mis-specified image confounder).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import atomic
from eocausal.estimate.ate import ESTIMATORS, estimate_effects
from eocausal.simulate import (
    BUILTUP_QUANTILE,
    CONFOUNDER_RADIUS_M,
    DEMO_CHIP_SIZE_PX,
    DEMO_MAX_NODATA_SHARE,
    DEMO_SCENE,
    DemoProcess,
    builtup_pixels,
    chip_valid_share,
    image_confounder,
    plm_effect,
    read_scene,
    sample_unit_pixels,
)

FEATURE_SETS = ("none", "tabular", "image", "tabular+image")
RESOLUTION_FACTORS = (1, 2, 4, 8)
WIDE_CONFOUNDER_RADIUS_M = 3000.0
SCENARIOS = ("demo", "resolution_x2", "resolution_x4", "resolution_x8", "confounder_3km")
# The scenario groups the CLI accepts, and what each expands to.
SCENARIO_GROUPS = {
    "demo": ("demo",),
    "resolution": ("resolution_x2", "resolution_x4", "resolution_x8"),
    "confounder_3km": ("confounder_3km",),
}
DESIGN_NOTE = (
    "Design-based Monte Carlo: scene, unit locations, chips and embeddings are fixed (computed once); "
    "each replication redraws covariates, treatment and outcomes from the known demo process and "
    "cross-fits on a new fold split. Truth = sample ATE over the analysis units (fixed); for dml "
    "(partially linear model) its own target, the Var(D | z)-weighted effect."
)
# Bump when the harness changes what it computes (it names the embedding cache).
HARNESS_VERSION = "mc-1"


@dataclass
class MonteCarloDesign:
    """The fixed part of the Monte Carlo: analysis units, their confounders and image features."""

    n_sampled: int  # units sampled on the scene (as the demo's n_units)
    confounder_std: np.ndarray  # standardised over the sampled units, for the analysis units
    confounder_wide_std: np.ndarray  # the 3 km confounder, same standardisation rule
    image_features: dict[int, np.ndarray]  # resolution factor -> principal components of the embedding
    settings: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(self.confounder_std.size)

    def truth(self, scenario: str, process: DemoProcess | None = None, estimator: str = "aipw") -> float:
        """What ``estimator`` estimates over the analysis units (fixed across replications).

        The sample ATE, mean of tau_i, for every estimator but ``dml``: the partially linear
        model's theta converges to the variance-weighted effect sum w_i tau_i / sum w_i with
        w_i = Var(D | X_i) = e_i (1 - e_i), which differs from the ATE when tau varies with the
        propensity (as in the demo, where both follow the confounder)."""
        process = process or DemoProcess()
        z = self.confounder_wide_std if scenario == "confounder_3km" else self.confounder_std
        tau = process.effect_intercept + process.effect_confounder * z
        if estimator != "dml":
            return float(np.mean(tau))
        return plm_effect(process.propensity(z), tau)


def unit_chips(data: np.ndarray, valid: np.ndarray, rows, cols, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Chips centred as :meth:`GeoTiffSource.read_chip` centres them (unit pixel at size // 2),
    cut from a scene held in memory; the windows must lie inside the raster."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    offsets = np.arange(size_px) - size_px // 2
    r = rows[:, None] + offsets[None, :]
    c = cols[:, None] + offsets[None, :]
    if r.min() < 0 or c.min() < 0 or r.max() >= valid.shape[0] or c.max() >= valid.shape[1]:
        raise ValueError("a chip window reaches outside the scene")
    chips = data[:, r[:, :, None], c[:, None, :]].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(chips, dtype=np.float32), valid[r[:, :, None], c[:, None, :]]


_DOWNSAMPLE_CHIPS = 8  # chips per block in downsample_chips


def downsample_chips(chips: np.ndarray, valid: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarser chips: each factor x factor block becomes the mean of its valid pixels; a block is
    valid when most of its pixels are. Chip sides are cut to a multiple of ``factor``."""
    if factor == 1:
        return chips, valid
    n, bands, height, width = chips.shape
    h, w = height // factor, width // factor
    if h < 1 or w < 1:
        raise ValueError(f"{height}x{width}-px chips cannot be downsampled by {factor}")
    coarse = np.empty((n, bands, h, w), dtype=np.float32)
    coarse_valid = np.empty((n, h, w), dtype=bool)
    # A few chips at a time, factor^2 strided adds: 6x faster than one 6-D reshape-and-sum over
    # the batch, whose large temporaries cost more in page faults than in arithmetic.
    for start in range(0, n, _DOWNSAMPLE_CHIPS):
        block, mask = chips[start : start + _DOWNSAMPLE_CHIPS], valid[start : start + _DOWNSAMPLE_CHIPS]
        total = np.zeros((len(block), bands, h, w), dtype=np.float32)
        count = np.zeros((len(block), h, w), dtype=np.int32)
        for i in range(factor):
            for j in range(factor):
                m = mask[:, i : h * factor : factor, j : w * factor : factor]
                total += block[:, :, i : h * factor : factor, j : w * factor : factor] * m[:, None]
                count += m
        ok = 2 * count > factor * factor
        total /= np.maximum(count, 1)[:, None]
        total[np.broadcast_to(~ok[:, None], total.shape)] = 0.0
        coarse[start : start + len(block)], coarse_valid[start : start + len(block)] = total, ok
    return coarse, coarse_valid


def prepare_design(
    scene: Path | None = None,
    n_units: int = 1500,
    seed: int = 0,
    chip_size_px: int = DEMO_CHIP_SIZE_PX,
    factors=RESOLUTION_FACTORS,
    n_features: int = 1024,
    image_components: int = 64,
    wide_radius_m: float = WIDE_CONFOUNDER_RADIUS_M,
    confounder_radius_m: float = CONFOUNDER_RADIUS_M,
    cache_dir: Path | None = None,
    device: str = "auto",
    log=None,
) -> MonteCarloDesign:
    """Units, confounders and image features, fixed for all replications.

    The units are those :func:`write_demo_study` draws for the same scene, ``n_units`` and
    ``seed``; units whose chip is more than 20 % nodata are excluded, as the pipeline excludes
    them. For each resolution factor the chips are downsampled, embedded with random
    convolutional features (``n_features``, seed 0, as the demo study) and reduced to
    ``image_components`` principal components, as the effect-estimates stage does. Embeddings
    are cached in ``cache_dir`` (if given) by their inputs. ``confounder_radius_m`` changes the
    demo's 750 m (capped at the chip's half-width, as the demo caps it).
    """
    from eocausal.embed.rcf import RCFEmbedder  # torch: only when a design is built
    from eocausal.embed.reduce import fit_pca

    log = log or (lambda message: None)
    scene_path = Path(scene) if scene is not None else DEMO_SCENE
    img = read_scene(scene_path)
    # The demo's streams: locations first (write_demo_study spawns 3 and uses the first here).
    loc_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0])
    rows, cols = sample_unit_pixels(img.valid, n_units, chip_size_px, loc_rng)

    builtup, _, _ = builtup_pixels(img, BUILTUP_QUANTILE)
    # As in the demo: never wider than the chip (the wide confounder is the exception).
    radius_px = max(1, min(int(round(confounder_radius_m / img.pixel_size_m)), chip_size_px // 2))
    wide_radius_px = max(1, int(round(wide_radius_m / img.pixel_size_m)))
    confounder = image_confounder(builtup, img.valid, rows, cols, radius_px)
    confounder_wide = image_confounder(builtup, img.valid, rows, cols, wide_radius_px)
    z = _standardised(confounder, "the chip-scale confounder")
    z_wide = _standardised(confounder_wide, "the wide confounder")

    share = chip_valid_share(img.valid, rows, cols, chip_size_px)
    analysis = (1.0 - share) <= DEMO_MAX_NODATA_SHARE + 1e-12
    chips, valid = unit_chips(img.data, img.valid, rows[analysis], cols[analysis], chip_size_px)
    log(f"design: {int(analysis.sum())} of {n_units} units imageable; chips {chips.shape}")

    image_features = {}
    for factor in factors:
        coarse, coarse_valid = downsample_chips(chips, valid, int(factor))
        key = _embedding_key(scene_path, n_units, seed, chip_size_px, factor, n_features)
        embedding = _cached(cache_dir, key)
        if embedding is None:
            started = time.perf_counter()
            embedder = RCFEmbedder(n_features=n_features, seed=0, device=device)
            embedding = embedder.fit_transform(coarse, coarse_valid).astype(np.float32)
            log(f"design: embedded x{factor} chips {coarse.shape[2:]} in {time.perf_counter() - started:.0f} s")
            _store(cache_dir, key, embedding)
        pca = fit_pca(embedding, image_components, seed=seed)
        image_features[int(factor)] = pca.transform(embedding)

    settings = {
        "scene": scene_path.name,
        "n_units_sampled": n_units,
        "n_analysis_units": int(analysis.sum()),
        "seed": seed,
        "chip_size_px": chip_size_px,
        "chip_size_m": round(chip_size_px * img.pixel_size_m, 1),
        "pixel_size_m": round(img.pixel_size_m, 3),
        "confounder_radius_m": round(radius_px * img.pixel_size_m, 1),
        "wide_confounder_radius_m": round(wide_radius_px * img.pixel_size_m, 1),
        "corr_chip_vs_wide_confounder": round(float(np.corrcoef(z[analysis], z_wide[analysis])[0, 1]), 4),
        "n_features": n_features,
        "image_components": image_components,
        "resolution_factors": [int(f) for f in factors],
    }
    return MonteCarloDesign(
        n_sampled=n_units,
        confounder_std=z[analysis],
        confounder_wide_std=z_wide[analysis],
        image_features=image_features,
        settings=settings,
    )


def _standardised(values: np.ndarray, what: str) -> np.ndarray:
    sd = float(values.std())
    if not sd > 0:
        raise ValueError(f"{what} does not vary over the units")
    return (values - values.mean()) / sd


def _embedding_key(scene_path: Path, n_units, seed, chip_size_px, factor, n_features) -> str:
    from eocausal.embed.rcf import RCF_ALGORITHM_VERSION

    digest = hashlib.sha256()
    digest.update(scene_path.read_bytes())
    digest.update(json.dumps(
        [HARNESS_VERSION, RCF_ALGORITHM_VERSION, n_units, seed, chip_size_px, factor, n_features]
    ).encode())
    return digest.hexdigest()[:24]


def _cached(cache_dir: Path | None, key: str) -> np.ndarray | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"mc_embedding_{key}.npy"
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable cache: recompute


def _store(cache_dir: Path | None, key: str, embedding: np.ndarray) -> None:
    if cache_dir is None:
        return
    atomic.write_with(Path(cache_dir) / f"mc_embedding_{key}.npy", lambda fh: np.save(fh, embedding), suffix=".npy")


# --- the replications ------------------------------------------------------------------------


def scenario_specs(scenarios, estimators=ESTIMATORS) -> list[tuple[str, int, str, tuple[str, ...]]]:
    """(scenario, resolution factor, feature set, estimators) for every fit a replication makes.

    The resolution scenarios only vary the image, so they run the image feature sets and the
    estimators that use features.
    """
    specs = []
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; known: {SCENARIOS}")
        if scenario.startswith("resolution_x"):
            factor = int(scenario.removeprefix("resolution_x"))
            adjusting = tuple(e for e in estimators if e != "difference_in_means")
            for fs in ("image", "tabular+image"):
                if adjusting:
                    specs.append((scenario, factor, fs, adjusting))
        else:
            for fs in FEATURE_SETS:
                # Without features every estimator is the difference in means, and the difference
                # in means ignores features: each is fitted once, on "none".
                if fs == "none":
                    ests = ("difference_in_means",) if "difference_in_means" in estimators else ()
                else:
                    ests = tuple(e for e in estimators if e != "difference_in_means")
                if ests:
                    specs.append((scenario, 1, fs, ests))
    return specs


def run_replication(design: MonteCarloDesign, rep: int, specs, seed: int = 0, folds: int = 5) -> list[dict]:
    """One replication: draw the study for each confounder, fit every spec; one row per estimate."""
    process = DemoProcess()
    chip_stream, wide_stream = np.random.SeedSequence([seed, rep]).spawn(2)
    draws = {}
    rows = []
    for scenario, factor, feature_set, estimators in specs:
        which = "wide" if scenario == "confounder_3km" else "chip"
        if which not in draws:
            z = design.confounder_wide_std if which == "wide" else design.confounder_std
            stream = wide_stream if which == "wide" else chip_stream
            draws[which] = process.draw(z, np.random.default_rng(stream))
        data = draws[which]
        y = data["outcome"].to_numpy()
        d = data["treatment"].to_numpy()
        tabular = data[["market_access", "household_size"]].to_numpy(dtype=float)
        image = design.image_features[factor]
        X = {
            "none": None, "tabular": tabular, "image": image,
            "tabular+image": np.hstack([tabular, image]),
        }[feature_set]
        started = time.perf_counter()
        # Each replication cross-fits on its own split (seed = rep), as a fresh study would.
        results = estimate_effects(y, d, X, estimators=estimators, folds=folds, seed=rep)
        seconds = (time.perf_counter() - started) / len(estimators)
        for estimator, r in results.items():
            truth = design.truth(scenario, process, estimator)
            rows.append({
                "replication": rep, "scenario": scenario, "resolution_factor": factor,
                "estimator": estimator, "feature_set": feature_set, "truth": truth,
                "estimate": r.estimate, "std_error": r.std_error, "ci_low": r.ci_low,
                "ci_high": r.ci_high, "covered": bool(r.ci_low <= truth <= r.ci_high),
                "n": r.n, "n_treated": int(d.sum()), "seconds": seconds,
            })
    return rows


def run_monte_carlo(
    design: MonteCarloDesign,
    replications: int = 200,
    scenarios=SCENARIOS,
    estimators=ESTIMATORS,
    seed: int = 0,
    folds: int = 5,
    jobs: int = 1,
    log=None,
) -> pd.DataFrame:
    """Replication-level results (one row per replication x scenario x estimator x feature set)."""
    if replications < 2:
        raise ValueError(f"replications must be at least 2, got {replications}")
    specs = scenario_specs(scenarios, estimators)
    log = log or (lambda message: None)
    started = time.perf_counter()
    rows: list[dict] = []
    if jobs == 1:
        for rep in range(replications):
            rows.extend(run_replication(design, rep, specs, seed, folds))
            if (rep + 1) % 10 == 0 or rep + 1 == replications:
                elapsed = time.perf_counter() - started
                eta = elapsed / (rep + 1) * (replications - rep - 1)
                log(f"replication {rep + 1}/{replications}: {elapsed:.0f} s elapsed, ~{eta:.0f} s to go")
    else:
        from joblib import Parallel, delayed

        batches = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(run_replication)(design, rep, specs, seed, folds) for rep in range(replications)
        )
        for done, batch in enumerate(batches, start=1):
            rows.extend(batch)
            if done % 10 == 0 or done == replications:
                elapsed = time.perf_counter() - started
                log(f"replication {done}/{replications}: {elapsed:.0f} s elapsed, "
                    f"~{elapsed / done * (replications - done):.0f} s to go")
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = [
    "scenario", "resolution_factor", "estimator", "feature_set", "replications", "truth",
    "mean_estimate", "bias", "bias_mc_se", "sd", "rmse", "mean_std_error", "se_sd_ratio",
    "coverage", "coverage_mc_se", "mean_seconds",
]


def summarise(replicates: pd.DataFrame) -> pd.DataFrame:
    """Bias, RMSE and coverage per scenario x estimator x feature set, with Monte Carlo SEs."""
    out = []
    keys = ["scenario", "resolution_factor", "estimator", "feature_set"]
    for key, g in replicates.groupby(keys, sort=False):
        errors = g["estimate"].to_numpy() - g["truth"].to_numpy()
        r = len(g)
        sd = float(np.std(g["estimate"], ddof=1))
        coverage = float(g["covered"].mean())
        out.append(dict(zip(keys, key)) | {
            "replications": r,
            "truth": float(g["truth"].mean()),
            "mean_estimate": float(g["estimate"].mean()),
            "bias": float(errors.mean()),
            "bias_mc_se": sd / math.sqrt(r),
            "sd": sd,
            "rmse": float(np.sqrt(np.mean(errors**2))),
            "mean_std_error": float(g["std_error"].mean()),
            "se_sd_ratio": float(g["std_error"].mean() / sd) if sd > 0 else float("nan"),
            "coverage": coverage,
            "coverage_mc_se": math.sqrt(coverage * (1 - coverage) / r),
            "mean_seconds": float(g["seconds"].mean()),
        })
    table = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    order = {s: i for i, s in enumerate(SCENARIOS)}
    fs_order = {s: i for i, s in enumerate(FEATURE_SETS)}
    est_order = {s: i for i, s in enumerate(ESTIMATORS)}
    return table.sort_values(
        ["scenario", "feature_set", "estimator"],
        key=lambda col: col.map(
            order if col.name == "scenario" else fs_order if col.name == "feature_set" else est_order),
    ).reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| scenario | estimator | feature set | R | truth | bias (MC se) | RMSE | SE/sd | 95% coverage (MC se) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.scenario} | {r.estimator} | {r.feature_set} | {r.replications} | {r.truth:.3f} | "
            f"{r.bias:+.3f} ({r.bias_mc_se:.3f}) | {r.rmse:.3f} | {r.se_sd_ratio:.2f} | "
            f"{r.coverage:.3f} ({r.coverage_mc_se:.3f}) |"
        )
    return "\n".join(lines)


def plot_summary(summary: pd.DataFrame, path: Path) -> Path:
    """:func:`summary_figure` written as a PNG at ``path``."""
    from eocausal.figures import save_figure

    return save_figure(summary_figure(summary), path, dpi=120)


def summary_figure(summary: pd.DataFrame):
    """Bias with 95 % Monte Carlo intervals and CI coverage, per scenario x spec (a pyplot-free Figure)."""
    import matplotlib

    from eocausal.figures import new_figure

    scenarios = [s for s in SCENARIOS if s in set(summary["scenario"])]
    specs = summary[["estimator", "feature_set"]].drop_duplicates()
    labels = [f"{e} | {f}" for e, f in specs.itertuples(index=False)]
    y_pos = {label: i for i, label in enumerate(labels)}
    colours = matplotlib.colormaps["tab10"]
    fig = new_figure((13, 0.45 * len(labels) + 2.5))
    ax_bias, ax_cov = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    offsets = np.linspace(-0.3, 0.3, len(scenarios)) if len(scenarios) > 1 else [0.0]
    for k, scenario in enumerate(scenarios):
        part = summary[summary["scenario"] == scenario]
        ys = [y_pos[f"{e} | {f}"] + offsets[k] for e, f in zip(part["estimator"], part["feature_set"])]
        ax_bias.errorbar(part["bias"], ys, xerr=1.96 * part["bias_mc_se"], fmt="o", ms=4,
                         color=colours(k), label=scenario, capsize=2)
        cov_err = 1.96 * part["coverage_mc_se"]
        ax_cov.errorbar(part["coverage"], ys, xerr=cov_err, fmt="o", ms=4, color=colours(k), capsize=2)
    ax_bias.axvline(0.0, color="black", lw=0.8)
    ax_bias.set_yticks(range(len(labels)), labels)
    ax_bias.invert_yaxis()
    ax_bias.set_xlabel("bias (estimate - true ATE), 95% Monte Carlo interval")
    ax_bias.legend(loc="lower right", fontsize=8)
    ax_cov.axvspan(0.93, 0.97, color="green", alpha=0.12, label="93-97%")
    ax_cov.axvline(0.95, color="black", lw=0.8)
    ax_cov.set_xlim(-0.02, 1.02)
    ax_cov.set_xlabel("95% CI coverage of the true ATE")
    ax_cov.legend(loc="lower left", fontsize=8)
    r = int(summary["replications"].max())
    fig.suptitle(f"eocausal Monte Carlo on the demo process ({r} replications; design-based: "
                 "units, chips, embeddings fixed)", fontsize=10)
    fig.tight_layout()
    return fig


def write_results(out_dir: Path, design: MonteCarloDesign, replicates: pd.DataFrame, settings: dict) -> dict:
    """replications.csv, summary.csv, summary.png and settings.json in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(replicates)
    paths = {
        "replications": out_dir / "replications.csv",
        "summary": out_dir / "summary.csv",
        "plot": out_dir / "summary.png",
        "settings": out_dir / "settings.json",
    }
    replicates.to_csv(paths["replications"], index=False, lineterminator="\n")
    summary.to_csv(paths["summary"], index=False, lineterminator="\n", float_format="%.6g")
    plot_summary(summary, paths["plot"])
    meta = {"design_note": DESIGN_NOTE, "design": design.settings, "run": settings,
            "truth": {s: {"ate": design.truth(s), "dml": design.truth(s, estimator="dml")} for s in SCENARIOS}}
    paths["settings"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {"summary": summary, "paths": paths}


def expand_scenarios(names) -> tuple[str, ...]:
    """Scenario names or groups (``demo``, ``resolution``, ``confounder_3km``) -> scenario names."""
    out: list[str] = []
    for name in names:
        for scenario in SCENARIO_GROUPS.get(name, (name,)):
            if scenario not in SCENARIOS:
                raise ValueError(
                    f"unknown scenario {name!r}; use {sorted(SCENARIO_GROUPS)} or one of {SCENARIOS}"
                )
            if scenario not in out:
                out.append(scenario)
    return tuple(out)


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
