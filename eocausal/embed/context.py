"""Context chips: image components of a window around each unit twice the chip's side, which the
image feature sets adjust for (``analysis.context_components``) and the chip-scale check compares
(:mod:`eocausal.estimate.fragility`).

A confounder whose footprint extends beyond the chip cannot be adjusted for by any estimator that
sees only the chip. So the effects stage also reads a *context* around each unit: a window twice
the chip's side, read from the same imagery and averaged 2 x 2 (so it has the chip's pixel count
and costs about one more chip pass), embedded by the study's embedder (fitted on the context
chips) and reduced by its own PCA. By default the image feature sets adjust for its leading
components, and the chip-scale check compares the headline with the chip alone; with
``analysis.context_components: 0`` only the check uses it, on a sample. Context chips are cached
like chips (their key holds the doubled size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.embed.embeddings import (
    chip_batches,
    component_scores,
    fit_feature_pca,
    fit_sample,
    make_embedder,
    store_order_batches,
)
from eocausal.imagery.chips import extract_chips
from eocausal.montecarlo import downsample_chips as downsample

# The context window's side, in chips, and the averaging that brings it back to the chip's pixels.
CONTEXT_FACTOR = 2


@dataclass
class ContextComponents:
    unit_ids: list[str]
    components: np.ndarray  # [n_units, k]; NaN rows for units whose context is not usable
    n_usable: int


def context_sample(unit_ids: list[str], max_units: int | None, seed: int) -> np.ndarray:
    """Positions of the units whose context the check reads: all of them up to ``max_units``, else
    the ``max_units`` with the smallest seeded hash of their id (the same units in any order)."""
    if max_units is None or len(unit_ids) <= max_units:
        return np.arange(len(unit_ids))
    rank = np.array([int.from_bytes(hashlib.blake2b(f"{seed}|{u}".encode(), digest_size=8).digest(), "big")
                     for u in unit_ids], dtype=np.uint64)
    return np.sort(np.argsort(rank, kind="stable")[:max_units])


def context_request(analysis) -> tuple[int, int | None] | None:
    """What the effects stage needs of the context windows under ``analysis`` (an AnalysisSpec):
    (components, units at most), or None. With ``analysis.context_components`` the image feature
    sets adjust for the context, so every unit's is read; else the chip-scale check alone reads a
    sample of at most ``analysis.chip_scale_max_units``, at the chip's component count."""
    if not any("image" in fs for fs in analysis.feature_sets):
        return None
    if analysis.context_components:
        return analysis.context_components, None
    if analysis.chip_scale_check:
        return analysis.fixed_image_components, analysis.chip_scale_max_units
    return None


def context_components(units: pd.DataFrame, source, study, chip_cache: Path, n_components: int,
                       max_units: int | None = None) -> ContextComponents:
    """Image components of each unit's context window (columns unit_id, lat, lon), aligned with
    ``units``; units whose context is outside the imagery or mostly nodata, or that are not in the
    sample of at most ``max_units`` (:func:`context_sample`; None: every unit), get NaN rows."""
    size = CONTEXT_FACTOR * study.imagery.chip_size_px
    ids = units["unit_id"].astype(str).tolist()
    sampled = units.iloc[context_sample(ids, max_units, study.analysis.seed)]
    extraction = extract_chips(sampled[["unit_id", "lat", "lon"]], source, size, Path(chip_cache),
                               study.imagery.max_nodata_share)
    index = extraction.index.set_index(extraction.index["unit_id"].astype(str))
    ok_index = index.loc[sampled["unit_id"].astype(str).tolist()]
    ok_index = ok_index[ok_index["status"] == "ok"]
    out = np.full((len(ids), n_components), np.nan)
    if len(ok_index) < max(n_components, 10):
        return ContextComponents(ids, out, int(len(ok_index)))
    embedder = make_embedder(study.embedding)
    usable = ok_index.reset_index(drop=True)
    # Memory stays near the chip stage's: the fit sample is read and averaged a batch at a time (never
    # every full-size context chip at once) and the PCA is the exact one from moments accumulated a
    # block at a time (never a float64 copy of every feature), as the embedding stage's.
    coarse = [downsample(c, v, CONTEXT_FACTOR) for c, v in chip_batches(fit_sample(usable, study.embedding.seed),
                                                                        chip_cache)]
    embedder.fit(np.concatenate([c for c, _ in coarse]), np.concatenate([v for _, v in coarse]))
    del coarse
    features = np.empty((len(usable), embedder.n_features), dtype=np.float32)
    start = 0
    order, batches = store_order_batches(usable, chip_cache)
    for chips, valid in batches:
        block = embedder.transform(*downsample(chips, valid, CONTEXT_FACTOR))
        features[order[start : start + len(chips)]] = block
        start += len(chips)
    finite = np.isfinite(features).all(axis=1)
    pca = fit_feature_pca(features, n_components)  # in index order: the store's order is not canonical
    if pca is None:
        return ContextComponents(ids, out, int(finite.sum()))
    position = {u: i for i, u in enumerate(ids)}
    rows = [position[u] for u in np.asarray(ok_index.index)[finite]]
    out[rows, : pca.n_components_] = component_scores(features, pca)[finite]
    return ContextComponents(ids, out, int(finite.sum()))
