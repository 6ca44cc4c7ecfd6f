"""Alternative image representations for the zoo's nonlinear confounders, computed from the chips.

The zoo caches only components, so the chips are cut again exactly as ``eocausal.zoo.prepare``
cuts them (same units, same keep rule; the recomputed confounder is checked against the cache).
The default embedder (``EmbeddingSpec()``) is fitted on them, and from its per-position ReLU
activations (512 filters: 256 whitened, 128 level +w, 128 level -w) several poolings are taken at
once:

- ``sq``: means over nested centred squares, scales 1, 3/4, 1/2, 3/8, 1/4, 1/8 (the default
  uses 1, 1/2, 1/4: ``sq3``);
- ``max``: maxima over the same squares of the activation smoothed by a 5x5 mean;
- ``cone``: max over positions of the smoothed activation x (1 - distance / R)+ for R = the
  chip's half-width and half of it (a distance-discounted max: "how close is the nearest strong
  response");
- ``near``: 1 - d / R (R = half-width) for d the distance to the nearest position whose smoothed
  activation exceeds its 50th / 80th / 95th percentile over all chips ("how close is the nearest
  strong response": the form of a distance-to-nearest confounder);
- ``pnear``: the same on 128 directions of the per-position activations (8 leading pixel-level
  principal directions, their pairwise sums and differences, both signs);

and representations (``representation``) are blocks of these - ``sq3``, ``sq6``, ``logsq3``
(log(mean + 1e-3) of sq3), ``max3``/``max6``, ``cone``, ``near``, ``pnear`` joined by ``+`` -
standardised and reduced to 64 principal components by the product's ``fit_pca`` (``a|b:16``:
a's 64 components followed by the 16 leading components of b, PCA'd on its own). Nonlinear
expansions of components: ``@prodN`` (pairwise products of the N leading components) and
``@rffN`` (256 random Fourier features of the N leading) in both nuisances, or ``@cv:prodN`` /
``@cv:rffN`` (per nuisance, only where it lowers that nuisance's cross-fitted loss). R² as the zoo
measures it (``zoo.oof_r2``); AIPW on the zoo's draws (as benchmarks/zoo_variants.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_representations.py features --designs landsat_mix_750
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_representations.py r2 --designs landsat_mix_750
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_representations.py aipw --designs landsat_mix_750 \
        --variants "default,sq3+logsq3+near,sq3|logsq3+near:16,default@cv:prod8" --replications 20
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_representations.py oracle --designs demo_proximity_900

Features are cached under --work (default /tmp/zoo_representations, not the repository; 5-12 min
per design on a shared 2-core machine). Results: benchmarks/results/zoo/variants.md (session 6).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from eocausal import zoo
from eocausal.embed.rcf import filter_bias
from eocausal.embed.reduce import fit_pca

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / "zoo" / "cache"
LANDSAT = REPO.parent / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
DEFAULT_SCALES = (0, 2, 4)  # indexes of 1, 1/2, 1/4 in SCALES
CONE_RADII = (1.0, 0.5)  # fractions of the output field's half-width
SMOOTH = 5
# "near": 1 - d / R for d the distance to the nearest position whose smoothed activation exceeds
# these quantiles of its distribution over (a sample of) all chips and positions (R: half-width)
NEAR_QUANTILES = (0.5, 0.8, 0.95)
# "pnear": the same on directions of the (standardised) per-position smoothed activations: the
# PIXEL_PCS leading principal directions and their pairwise sums and differences, each with both
# signs (2 * PIXEL_PCS**2 directions), so thresholds can cut conjunctions such as "bright and textured"
PIXEL_PCS = 8
K = zoo.DEFAULT_COMPONENTS


def design_sample(design: zoo.ZooDesign):
    """The scene, unit pixels, pixel maps, chips, masks, kept units and raw confounder, exactly as
    zoo.prepare makes them."""
    from eocausal.montecarlo import unit_chips
    from eocausal.simulate import read_scene, sample_unit_pixels

    scene = read_scene(zoo.scene_path(design.scene, CACHE, LANDSAT))
    rng = np.random.default_rng(np.random.SeedSequence([design.seed, 0x200]))
    rows, cols = sample_unit_pixels(scene.valid, design.n_units, 2 * design.chip_px, rng)
    maps = zoo.pixel_maps(scene)
    radius_px = max(1, int(round(design.radius_m / scene.pixel_size_m)))
    raw = zoo.confounder_values(maps, scene.valid, design.confounder, radius_px, rows, cols)
    chips, valid = unit_chips(scene.data, scene.valid, rows, cols, design.chip_px)
    keep = valid.mean(axis=(1, 2)) >= 0.8
    return scene, rows, cols, maps, chips, valid, keep, raw


def chips_for(design: zoo.ZooDesign):
    """Chips, masks and raw confounder exactly as zoo.prepare makes them."""
    _, _, _, _, chips, valid, keep, raw = design_sample(design)
    return chips[keep], valid[keep], zoo._std(raw[keep])


def _square(n: int, scale: float) -> tuple[int, int]:
    h = max(1, int(round(n * scale)))
    r0 = (n - h) // 2
    return r0, r0 + h


def pooled_blocks(emb, chips: np.ndarray, valid: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """[N, len(SCALES), F] square means and smoothed maxima, [N, len(CONE_RADII), F] cone maxima."""
    filters = torch.from_numpy(emb.filters_)
    bias = torch.as_tensor(filter_bias(emb), dtype=torch.float32).view(1, -1, 1, 1)
    center = torch.as_tensor(emb.band_center_, dtype=torch.float32).view(1, -1, 1, 1)
    scale = torch.as_tensor(emb.band_scale_, dtype=torch.float32).view(1, -1, 1, 1)
    k = emb.patch_size
    n, _, h, w = chips.shape
    ho, wo = h - k + 1, w - k + 1
    # the unit's pixel is at size // 2; output position i covers pixels i .. i + k - 1
    ci, cj = h // 2 - k // 2, w // 2 - k // 2
    ii, jj = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    dist = torch.as_tensor(np.hypot(ii - ci, jj - cj), dtype=torch.float32)
    half = min(ho, wo) / 2.0
    cones = [torch.clamp(1.0 - dist / (r * half), min=0.0) for r in CONE_RADII]
    squares = [(_square(ho, s), _square(wo, s)) for s in SCALES]
    out = {"sq": [], "max": [], "cone": [], "near": [], "pnear": []}
    thresholds = None
    with torch.no_grad():
        for s in [*range(0, min(n, 128), batch), *range(0, n, batch)]:
            x = torch.from_numpy(np.ascontiguousarray(chips[s : s + batch], dtype=np.float32))
            ok = torch.from_numpy(valid[s : s + batch]) & torch.isfinite(x).all(1)
            x = torch.where(ok.unsqueeze(1), (x - center) / scale, 0.0)
            field = (F.max_pool2d((~ok).unsqueeze(1).float(), k, stride=1) == 0).float()  # [B,1,ho,wo]
            act = F.relu(F.conv2d(x, filters) - bias) * field
            sm_num = F.avg_pool2d(act, SMOOTH, stride=1, padding=SMOOTH // 2, count_include_pad=False)
            sm_den = F.avg_pool2d(field, SMOOTH, stride=1, padding=SMOOTH // 2, count_include_pad=False)
            smooth = sm_num / sm_den.clamp_min(1e-6)
            if thresholds is None:  # first pass: a sample of positions of the first 128 chips
                picked = torch.randperm(ho * wo, generator=torch.Generator().manual_seed(s))[:64]
                sample = smooth.flatten(2)[:, :, picked]
                out.setdefault("_sample", []).append(sample.permute(0, 2, 1).reshape(-1, smooth.shape[1]))
                if s + batch >= min(n, 128):
                    sample = torch.cat(out.pop("_sample")).double()
                    thresholds = torch.quantile(sample.float(), torch.tensor(NEAR_QUANTILES), dim=0)
                    mu, sd = sample.mean(0), sample.std(0).clamp_min(1e-6)
                    _, vecs = torch.linalg.eigh(torch.cov(((sample - mu) / sd).T))
                    v = vecs[:, -PIXEL_PCS:].flip(1)  # [F, PIXEL_PCS]
                    eye = torch.eye(PIXEL_PCS, dtype=torch.float64)
                    combos = [eye[i] for i in range(PIXEL_PCS)]
                    combos += [(eye[i] + sign * eye[j]) / np.sqrt(2) for i in range(PIXEL_PCS)
                               for j in range(i + 1, PIXEL_PCS) for sign in (1, -1)]
                    combos = torch.stack(combos, 1)
                    combos = torch.cat([combos, -combos], 1)  # [PIXEL_PCS, 2 * PIXEL_PCS**2]
                    proj_w = (v / sd[:, None]).float()
                    proj_b = ((mu / sd) @ v).float()
                    p_thresholds = torch.quantile(((sample - mu) / sd @ v @ combos).float(),
                                                  torch.tensor(NEAR_QUANTILES), dim=0)
                    combos = combos.float()
                continue
            sq, mx = [], []
            for (r0, r1), (c0, c1) in squares:
                cnt = field[:, :, r0:r1, c0:c1].sum(dim=(2, 3)).clamp_min(1.0)
                sq.append(act[:, :, r0:r1, c0:c1].sum(dim=(2, 3)) / cnt)
                mx.append(smooth[:, :, r0:r1, c0:c1].amax(dim=(2, 3)))
            out["sq"].append(torch.stack(sq, 1).numpy())
            out["max"].append(torch.stack(mx, 1).numpy())
            out["cone"].append(torch.stack([(smooth * c).amax(dim=(2, 3)) for c in cones], 1).numpy())
            proj = torch.einsum("bfhw,fm->bmhw", smooth, proj_w) - proj_b.view(1, -1, 1, 1)
            proj = torch.einsum("bkhw,km->bmhw", proj, combos)
            out["pnear"].append(torch.stack([((proj > t.view(1, -1, 1, 1)).float() * cones[0]).amax(dim=(2, 3))
                                             for t in p_thresholds], 1).numpy())
            out["near"].append(torch.stack([((smooth > t.view(1, -1, 1, 1)).float() * cones[0]).amax(dim=(2, 3))
                                            for t in thresholds], 1).numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def work_path(work: Path, name: str) -> Path:
    return work / f"{name}.npz"


def compute_features(name: str, work: Path) -> None:
    from eocausal.embed.embeddings import make_embedder
    from eocausal.study import EmbeddingSpec

    started = time.perf_counter()
    design = zoo.design_by_name(name)
    prepared = zoo.prepare(design, CACHE, LANDSAT)
    chips, valid, z = chips_for(design)
    if not np.allclose(z, prepared.z):
        raise SystemExit(f"{name}: recomputed confounder differs from the cache's")
    emb = make_embedder(EmbeddingSpec(cpu_threads=1))
    emb.fit(chips, valid)
    blocks = pooled_blocks(emb, chips, valid)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work_path(work, name), z=z, **blocks)
    print(f"{name}: {len(z)} chips, blocks {[(k, v.shape) for k, v in blocks.items()]} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)


def _flat(block: np.ndarray) -> np.ndarray:
    return block.reshape(len(block), -1)


def representation(blocks, variant: str) -> np.ndarray:
    """Standardised-and-PCA'd components (64) of a named block combination; ``a|b:16`` is block-wise:
    the 64 components of ``a`` followed by the 16 leading components of ``b`` (PCA'd on its own)."""
    if "|" in variant:
        out = []
        for part in variant.split("|"):
            combo, _, k = part.partition(":")
            out.append(representation(blocks, combo)[:, : int(k) if k else K])
        return np.hstack(out)
    sq, mx, cone, near = blocks["sq"], blocks["max"], blocks["cone"], blocks["near"]
    pnear = blocks.get("pnear")
    parts = {
        "sq3": lambda: _flat(sq[:, DEFAULT_SCALES]),
        "sq6": lambda: _flat(sq),
        "logsq3": lambda: _flat(np.log(sq[:, DEFAULT_SCALES] + 1e-3)),
        "max3": lambda: _flat(mx[:, DEFAULT_SCALES]),
        "max6": lambda: _flat(mx),
        "cone": lambda: _flat(cone),
        "near": lambda: _flat(near),
        "pnear": lambda: _flat(pnear),
    }
    feats = np.hstack([parts[p]() for p in variant.split("+")])
    return fit_pca(feats, K).transform(feats)


def rff(components: np.ndarray, lead: int, width: float, n: int = 256, seed: int = 0) -> np.ndarray:
    """Random Fourier features of the leading ``lead`` components (each scaled to unit sd),
    Gaussian kernel of bandwidth width * sqrt(lead)."""
    x = components[:, :lead] / components[:, :lead].std(axis=0)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((lead, n)) / (width * np.sqrt(lead))
    phase = rng.uniform(0, 2 * np.pi, n)
    return np.sqrt(2.0 / n) * np.cos(x @ omega + phase)


def products(components: np.ndarray, lead: int) -> np.ndarray:
    x = components[:, :lead]
    return np.stack([x[:, i] * x[:, j] for i in range(lead) for j in range(i, lead)], axis=1)


R2_VARIANTS = ("sq3", "sq6", "logsq3", "sq3+logsq3", "sq3+max3", "sq3+cone", "sq3+near", "sq3+logsq3+near",
               "sq3+near+pnear")


def r2_table(names: list[str], work: Path) -> pd.DataFrame:
    rows = []
    for name in names:
        with np.load(work_path(work, name)) as f:
            blocks = {k: f[k] for k in f.files if k != "z"}
            z = f["z"]
        cached = zoo.prepare(zoo.design_by_name(name), CACHE, LANDSAT).components["default"][:, :K]
        row = {"design": name, "cached default": zoo.oof_r2(cached, z)}
        for variant in R2_VARIANTS:
            if variant.endswith("pnear") and "pnear" not in blocks:
                continue
            row[variant] = zoo.oof_r2(representation(blocks, variant), z)
        base = representation(blocks, "sq3")
        for lead in (4, 8):
            row[f"sq3 + prod{lead}"] = zoo.oof_r2(np.hstack([base, products(base, lead)]), z)
        row["sq3 + rff8"] = zoo.oof_r2(np.hstack([base, rff(base, 8, 2.0)]), z)
        rows.append(row)
        print(pd.Series(row).to_string(), flush=True)
    return pd.DataFrame(rows).set_index("design")


def expansion(comps: np.ndarray, extra: str) -> np.ndarray:
    """``prodN``: pairwise products of the N leading components; ``rffN``: 256 random Fourier
    features of the N leading components (bandwidth 2 sqrt(N) on unit-sd components)."""
    if extra.startswith("prod"):
        return products(comps, int(extra[4:]))
    if extra.startswith("rff"):
        return rff(comps, int(extra[3:]), 2.0)
    raise SystemExit(f"unknown expansion {extra!r}")


def variant_components(name: str, work: Path, variant: str) -> np.ndarray:
    """``default``: the zoo's cached components; a block combination (``sq3+near``); either with
    ``@prod8`` etc. (:func:`expansion` appended, both nuisances) or ``@cv:prod8`` (the expansion
    in each nuisance only where its cross-fitted loss is lower than without: returns the base)."""
    base, _, extra = variant.partition("@")
    if base == "default":
        comps = zoo.prepare(zoo.design_by_name(name), CACHE, LANDSAT).components["default"][:, :K]
    else:
        with np.load(work_path(work, name)) as f:
            comps = representation({k: f[k] for k in f.files if k != "z"}, base)
    if extra and not extra.startswith("cv:"):
        comps = np.hstack([comps, expansion(comps, extra)])
    return comps


def cv_choice_aipw(y, d, tab, comps, extra: str, rep: int):
    """AIPW whose propensity and each arm's outcome model use the expansion only where it lowers
    that nuisance's cross-fitted loss (log-loss, MSE on the arm's units); same folds as
    estimate_effects(seed=rep)."""
    from eocausal.estimate.ate import estimate_effects
    from eocausal.estimate.folds import make_folds
    from eocausal.estimate.nuisance import NuisanceSpec, cross_fit_outcome, cross_fit_propensity

    linear = np.hstack([tab, comps])
    wide = np.hstack([linear, expansion(comps, extra)])
    folds = make_folds(len(y), 5, rep, stratify=d)
    spec = NuisanceSpec(seed=rep)
    chosen, preds = {}, {}
    for key, fit in (("propensity", lambda X: cross_fit_propensity(X, d, folds, spec)[0]),
                     ("outcome_control", lambda X: cross_fit_outcome(X, y, folds, spec, fit_on=d == 0, arms=(0,))[0]),
                     ("outcome_treated", lambda X: cross_fit_outcome(X, y, folds, spec, fit_on=d == 1, arms=(1,))[0])):
        losses = {}
        for label, X in (("linear", linear), ("wide", wide)):
            p = fit(X)
            if key == "propensity":
                q = np.clip(p, 1e-6, 1 - 1e-6)
                loss = -np.mean(d * np.log(q) + (1 - d) * np.log(1 - q))
            else:
                arm = d == (1 if key == "outcome_treated" else 0)
                loss = np.mean((y[arm] - p[arm]) ** 2)
            losses[label] = (loss, p)
        pick = min(losses, key=lambda label: losses[label][0])
        chosen[key], preds[key] = pick, losses[pick][1]
    r = estimate_effects(y, d, linear, estimators=("aipw",), folds=5, seed=rep, predictions=preds)["aipw"]
    return r, chosen


def aipw_table(name: str, work: Path, variants: list[str], replications: int) -> pd.DataFrame:
    """Tabular+image AIPW per variant on the zoo's draws (as benchmarks/zoo_variants.py)."""
    from eocausal.estimate.ate import estimate_effects

    prepared = zoo.prepare(zoo.design_by_name(name), CACHE, LANDSAT)
    comps = {v: variant_components(name, work, v) for v in variants}
    r2 = {v: zoo.oof_r2(c, prepared.z) for v, c in comps.items()}
    rows = []
    for rep in range(replications):
        draw = zoo.replication_draw(prepared, rep)
        truth = float(np.mean(draw["tau"]))
        for variant in variants:
            started = time.perf_counter()
            chosen = {}
            if "@cv:" in variant:
                r, chosen = cv_choice_aipw(draw["y"], draw["d"], draw["tabular"], comps[variant],
                                           variant.split("@cv:")[1], rep)
            else:
                X = np.hstack([draw["tabular"], comps[variant]])
                r = estimate_effects(draw["y"], draw["d"], X, estimators=("aipw",), folds=5, seed=rep)["aipw"]
            rows.append({"wide_picked": sum(v == "wide" for v in chosen.values()), "variant": variant,
                         "error": r.estimate - truth, "estimate": r.estimate,
                         "se": r.std_error, "covered": r.ci_low <= truth <= r.ci_high,
                         "seconds": time.perf_counter() - started})
    df = pd.DataFrame(rows)
    table = df.groupby("variant", sort=False).agg(bias=("error", "mean"), sd=("estimate", "std"),
                                                  se=("se", "mean"), coverage=("covered", "mean"),
                                                  seconds=("seconds", "mean"),
                                                  wide_picked=("wide_picked", "mean"))
    table["bias_over_se"] = table["bias"] / table["se"]
    table["rmse"] = np.sqrt(df.assign(e2=df["error"] ** 2).groupby("variant", sort=False)["e2"].mean())
    table["r2"] = pd.Series(r2)
    table.insert(0, "design", name)
    print(f"{name} ({len(prepared.z)} units, {replications} replications)", flush=True)
    return table


def oracle(name: str) -> None:
    """What pooling can do given the true pixel layers: R² of the confounder from the built and
    core maps (the layers demo_proximity's confounder is made of) pooled as means over nested
    squares (SCALES), 16 rings of 2 px, or as "near" (1 - d / 31 for d the distance to the nearest
    pixel whose 5x5-smoothed value exceeds 0.3 / 0.5 / 0.7 / 0.9)."""
    from eocausal.montecarlo import unit_chips

    design = zoo.design_by_name(name)
    scene, rows, cols, maps, _, _, keep, raw = design_sample(design)
    z = zoo._std(raw[keep])
    core = (zoo.disk_mean(maps["built"], scene.valid, 3) > 0.5).astype(float)
    for label, layer in (("built", maps["built"]), ("core", core)):
        c = unit_chips(layer[None].astype(np.float32), scene.valid, rows, cols, design.chip_px)[0][keep, 0]
        n, h, w = c.shape
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        dist = np.hypot(ii - h // 2, jj - w // 2)
        sq = np.stack([c[:, slice(*_square(h, s)), slice(*_square(w, s))].mean((1, 2)) for s in SCALES], 1)
        rings = np.stack([c[:, (dist >= a) & (dist < a + 2)].mean(1) for a in range(0, 32, 2)], 1)
        smooth = F.avg_pool2d(torch.from_numpy(c[:, None]), SMOOTH, stride=1, padding=SMOOTH // 2,
                              count_include_pad=False)[:, 0].numpy()
        cone = np.clip(1 - dist / 31, 0, None)
        near = np.stack([((smooth > q) * cone).reshape(n, -1).max(1) for q in (0.3, 0.5, 0.7, 0.9)], 1)
        print(f"{name} {label}: means sq3 {zoo.oof_r2(sq[:, DEFAULT_SCALES], z):.3f}, sq6 {zoo.oof_r2(sq, z):.3f}, "
              f"rings16 {zoo.oof_r2(rings, z):.3f}; near {zoo.oof_r2(near, z):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("features", "r2", "aipw", "oracle"))
    parser.add_argument("--designs", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zoo_representations"))
    parser.add_argument("--replications", type=int, default=20)
    parser.add_argument("--variants", default="sq3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.designs.split(",")
    if args.command == "features":
        for name in names:
            compute_features(name, args.work)
    elif args.command == "oracle":
        for name in names:
            oracle(name)
    elif args.command == "r2":
        table = r2_table(names, args.work)
        print(table.round(3).T.to_markdown())
    else:
        for name in names:
            print(aipw_table(name, args.work, args.variants.split(","), args.replications).round(3).to_string(),
                  flush=True)


if __name__ == "__main__":
    main()
