"""Context chips: image components of a window around each unit twice the chip's side, which the
image feature sets adjust for (``analysis.context_components``) and the chip-scale check compares
(:mod:`eocausal.estimate.fragility`).

A confounder whose footprint extends beyond the chip cannot be adjusted for by any estimator that
sees only the chip. So the estimates also see a *context* around each unit: a window twice the
chip's side, read from the same imagery and averaged 2 x 2 (so it has the chip's pixel count and
costs about one more chip pass), embedded by the study's embedder (fitted on the context chips)
and reduced by its own PCA. By default the image feature sets (and the CATE's nuisance models)
adjust for its leading components, and the chip-scale check compares the headline with the chip
alone; with ``analysis.context_components: 0`` only the check uses it, on a sample. The components
are stored in the lake once per version (:func:`study_context`, the ``image_context`` asset); a
local source's windows are not stored, a remote source's go through the chip store (their key
holds the doubled size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import progress
from eocausal.embed.embeddings import (
    LOAD_CHIPS,
    chip_batches,
    component_scores,
    fit_feature_pca,
    fit_sample,
    make_embedder,
    store_order_batches,
)
from eocausal.imagery.chips import extract_chips, reads_locally, stream_chips, too_much_nodata
from eocausal.imagery.sources import ChipFailure, open_source
from eocausal.lake import CONTEXT_TABLE, period_path, read_context, write_context
from eocausal.montecarlo import downsample_chips as downsample
from eocausal.versioning import json_version

# The context window's side, in chips, and the averaging that brings it back to the chip's pixels.
CONTEXT_FACTOR = 2
CODE_VERSION = "context-1"


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


def context_version(study, survey_version: str, embeddings_version: str) -> str | None:
    """The version of the study's context components (None when its analysis needs none): the
    inputs (survey, embeddings: the chips' imagery and size, the embedder), the request and the
    settings that choose the windows and their embedding."""
    request = context_request(study.analysis)
    if request is None:
        return None
    return json_version({
        "code": CODE_VERSION, "request": list(request), "seed": study.analysis.seed,
        "inputs": {"survey": survey_version, "embeddings": embeddings_version},
        "max_nodata_share": study.imagery.max_nodata_share, "embedding": study.embedding.model_dump(mode="json"),
    })


def study_context(units: pd.DataFrame, study, lake: Path, chip_cache: Path, survey_version: str,
                  embeddings_version: str) -> tuple[np.ndarray | None, bool]:
    """(context components of ``units``, aligned; reused): the analysis period's stored ones
    (lake ``image_context``) when they are this version's and cover these units, else computed
    from the study's imagery and stored. (None, False) when the analysis takes no context. The
    ``image_context`` asset computes them first; the estimate stages read them, or compute them
    when run on their own."""
    version = context_version(study, survey_version, embeddings_version)
    if version is None:
        return None, False
    ids = units["unit_id"].astype(str).tolist()
    path = period_path(lake, CONTEXT_TABLE, study.imagery.analysis_period_name())
    stored = read_context(path, version, ids)
    if stored is not None:
        return stored, True
    source = open_source(study, study.imagery.analysis_period_name())
    computed = context_components(units, source, study, chip_cache, *context_request(study.analysis))
    write_context(path, ids, computed.components, version)
    return computed.components, False


def context_components(units: pd.DataFrame, source, study, chip_cache: Path, n_components: int,
                       max_units: int | None = None, store: bool | None = None) -> ContextComponents:
    """Image components of each unit's context window (columns unit_id, lat, lon), aligned with
    ``units``; units whose context is outside the imagery or mostly nodata, or that are not in the
    sample of at most ``max_units`` (:func:`context_sample`; None: every unit), get NaN rows.

    A local source's windows are read, averaged and embedded a batch at a time and never stored
    (at 10,000 units, storing the full-size windows and reading them back took 40 s against 5 s to
    read them from the GeoTIFF); a remote source's go through the chip store, as chips do. ``store``:
    True or False to choose (None: by the source, :func:`eocausal.imagery.chips.reads_locally`)."""
    size = CONTEXT_FACTOR * study.imagery.chip_size_px
    ids = units["unit_id"].astype(str).tolist()
    sampled = units.iloc[context_sample(ids, max_units, study.analysis.seed)].reset_index(drop=True)
    if store is None:
        store = not reads_locally(source)
    windows = (_StoredWindows(sampled, source, size, chip_cache, study.imagery.max_nodata_share) if store
               else _ReadWindows(sampled, source, size, study.imagery.max_nodata_share))
    out = np.full((len(ids), n_components), np.nan)
    needed = max(n_components, 10)  # usable windows to fit the embedder and the PCA on
    embedder = make_embedder(study.embedding)
    fit_chips, fit_valid = windows.fit_chips(study.embedding.seed)
    if len(fit_chips) < needed:
        return ContextComponents(ids, out, len(fit_chips))
    embedder.fit(fit_chips, fit_valid)
    del fit_chips, fit_valid
    features = np.full((len(sampled), embedder.n_features), np.nan, dtype=np.float32)
    done = 0
    progress.report("context windows", 0, len(sampled), "windows")
    for rows, chips, valid in windows.batches():
        features[rows] = embedder.transform(chips, valid)
        done += len(rows)  # usable windows embedded (the unusable are skipped)
        progress.report("context windows", min(done, len(sampled) - 1), len(sampled), "windows")
    progress.report("context windows", len(sampled), len(sampled), "windows")
    finite = np.isfinite(features).all(axis=1)
    pca = fit_feature_pca(features, n_components) if finite.sum() >= needed else None
    if pca is None:
        return ContextComponents(ids, out, int(finite.sum()))
    position = {u: i for i, u in enumerate(ids)}
    rows = [position[u] for u in sampled["unit_id"].astype(str)[finite]]
    out[rows, : pca.n_components_] = component_scores(features, pca)[finite]
    return ContextComponents(ids, out, int(finite.sum()))


# Memory stays near the chip stage's either way: windows are read and averaged a batch at a time
# (never every full-size window at once), and the PCA is the exact one from moments accumulated a
# block at a time (never a float64 copy of every feature), as the embedding stage's.


class _ReadWindows:
    """Context windows read from a local source: the embedder's fit sample, then every window, a
    batch at a time (rows of ``units``), averaged to the chip's pixels. The fit sample is drawn from
    every unit and keeps the usable windows (the stored path draws it from the usable ones: the
    same windows whenever the study has at most ``FIT_CHIPS`` units)."""

    def __init__(self, units: pd.DataFrame, source, size: int, max_nodata_share: float):
        self.units, self.source, self.size, self.max_nodata_share = units, source, size, max_nodata_share

    def _read(self, rows: np.ndarray):
        points = list(zip(self.units["lon"].to_numpy(float)[rows], self.units["lat"].to_numpy(float)[rows]))
        kept, chips, valid = [], [], []
        for i, chip in stream_chips(self.source, points, self.size):
            if chip is None or isinstance(chip, ChipFailure):
                continue
            if too_much_nodata(np.count_nonzero(chip.valid) / chip.valid.size, self.max_nodata_share):
                continue
            kept.append(rows[i])
            # One window at a time: averaging a batch of full-size windows stacked cost twice as much.
            coarse, coarse_valid = downsample(np.asarray(chip.data, dtype=np.float32)[None], chip.valid[None],
                                              CONTEXT_FACTOR)
            chips.append(coarse[0])
            valid.append(coarse_valid[0])
            if len(kept) == LOAD_CHIPS:
                yield self._batch(kept, chips, valid)
                kept, chips, valid = [], [], []
        if kept:
            yield self._batch(kept, chips, valid)

    @staticmethod
    def _batch(kept, chips, valid):
        return np.asarray(kept), np.stack(chips), np.stack(valid)

    def fit_chips(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.units.index.get_indexer(fit_sample(self.units, seed).index)
        read = list(self._read(rows))
        if not read:
            return _joined([])
        order = np.argsort(np.concatenate([r for r, _, _ in read]), kind="stable")  # the units' order, as stored
        chips, valid = _joined([(c, v) for _, c, v in read])
        return chips[order], valid[order]

    def batches(self):
        return self._read(np.arange(len(self.units)))


class _StoredWindows:
    """Context windows of a remote source, through the chip store (read once, then from the store)."""

    def __init__(self, units: pd.DataFrame, source, size: int, chip_cache: Path, max_nodata_share: float):
        extraction = extract_chips(units[["unit_id", "lat", "lon"]], source, size, Path(chip_cache),
                                   max_nodata_share)
        index = extraction.index.set_index(extraction.index["unit_id"].astype(str))
        index = index.loc[units["unit_id"].astype(str).tolist()].reset_index(drop=True)
        self.usable = index[index["status"] == "ok"]
        self.chip_cache = chip_cache

    def fit_chips(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return _joined([downsample(c, v, CONTEXT_FACTOR)
                        for c, v in chip_batches(fit_sample(self.usable, seed), self.chip_cache)])

    def batches(self):
        usable = self.usable.reset_index()  # "index": the row of the units
        order, batches = store_order_batches(usable, self.chip_cache)
        start = 0
        for chips, valid in batches:
            rows = usable["index"].to_numpy()[order[start : start + len(chips)]]
            start += len(chips)
            yield (rows, *downsample(chips, valid, CONTEXT_FACTOR))


def _joined(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not batches:
        return np.zeros((0, 0, 0, 0), dtype=np.float32), np.zeros((0, 0, 0), dtype=bool)
    return np.concatenate([c for c, _ in batches]), np.concatenate([v for _, v in batches])
