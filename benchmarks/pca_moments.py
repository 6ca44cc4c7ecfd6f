"""Exact PCA from moments (the embedding stage since issue 14) against the seeded randomized PCA scikit-learn
chose before for 1,536 features: subspace agreement of the 64 leading components and the change in
tabular+image AIPW (in SEs) on 10 zoo draws of two designs.

    .venv/bin/python benchmarks/pca_moments.py   (needs the zoo cache: eocausal simulate --zoo ...)
"""
import time
from pathlib import Path

import numpy as np

from eocausal import zoo
from eocausal.embed.reduce import PCAMoments, fit_pca, pca_from_moments
from eocausal.estimate.ate import estimate_effects
from eocausal.montecarlo import unit_chips
from eocausal.simulate import read_scene, sample_unit_pixels

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / "zoo" / "cache"
LANDSAT = REPO.parent / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"

for name in ["demo_bright_750", "landsat_texture_600"]:
    d = zoo.design_by_name(name)
    p = zoo.prepare(d, CACHE, LANDSAT)
    scene = read_scene(zoo.scene_path(d.scene, CACHE, LANDSAT))
    rng = np.random.default_rng(np.random.SeedSequence([d.seed, 0x200]))
    rows, cols = sample_unit_pixels(scene.valid, d.n_units, 2 * d.chip_px, rng)
    chips, valid = unit_chips(scene.data, scene.valid, rows, cols, d.chip_px)
    keep = valid.mean(axis=(1, 2)) >= 0.8
    emb, k = zoo._embedders()["default"]
    t = time.perf_counter(); X = zoo._finite(emb.fit_transform(chips[keep], valid[keep])); print(name, X.shape, time.perf_counter() - t)
    a = fit_pca(X, 64, seed=0); b = pca_from_moments(PCAMoments(X.shape[1]).update(X), 64)
    ca, cb = a.transform(X), b.transform(X)
    s = np.linalg.svd(a.components_ @ b.components_.T, compute_uv=False)
    print("subspace cosines min", s.min(), "ev rel diff max", np.max(np.abs(a.explained_variance_ - b.explained_variance_) / b.explained_variance_))
    diffs = []
    for rep in range(10):
        draw = zoo.replication_draw(p, rep)
        ea = estimate_effects(draw["y"], draw["d"], np.hstack([draw["tabular"], ca]), estimators=("aipw",), seed=rep)["aipw"]
        eb = estimate_effects(draw["y"], draw["d"], np.hstack([draw["tabular"], cb]), estimators=("aipw",), seed=rep)["aipw"]
        diffs.append((eb.estimate - ea.estimate) / ea.std_error)
    print("AIPW exact - randomized, in SEs: max abs", np.max(np.abs(diffs)), "mean", np.mean(diffs))
