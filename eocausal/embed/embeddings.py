"""The embedding stage: embed every usable chip, cached by content (chips + method).

The cache key hashes the ordered chip keys, the embedder's configuration (with the compute dtype
resolved, and a backbone's weights by content), so a re-run on the same chips costs one file read,
and any change to chips or method computes afresh.

Memory is bounded by the output, not by the chips: the embedder is fitted on a seeded sample of
at most ``FIT_CHIPS`` chips, then the chips stream from the chip cache ``LOAD_CHIPS`` at a time.
A PCA of the features (``embedding.pca_components``) is fitted once here and stored beside them,
under the same version, for the estimators that want reduced image features.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal import atomic, progress
from eocausal.embed import EmbeddingError
from eocausal.embed.reduce import PCAMoments, PCAReduction, pca_from_moments
from eocausal.faults import write_point
from eocausal.imagery import chipstore
from eocausal.imagery.chips import load_chips
from eocausal.study import EmbeddingSpec
from eocausal.versioning import json_version

# Bump when the embedding code changes what it computes.
# (embed-2: fast RCF path with a dtype setting, branches/pool grid, backbones, stored PCA.)
CODE_VERSION = "embed-3"  # 3: RCF level filters and pooling scales (study defaults), 128 stored components

# Chips the embedder is fitted on (a seeded sample when there are more): band statistics use at
# most 1M pixels and filters at most 100k patches, which a couple of thousand chips cover.
FIT_CHIPS = 2048
# Chips read from the chip cache per streamed batch.
LOAD_CHIPS = 512


@dataclass
class Embeddings:
    unit_ids: list[str]
    features: np.ndarray  # float32 [n_units, n_features]
    version: str  # content version: chips + method + code
    method: str
    from_cache: bool
    device: str | None
    dtype: str | None = None  # compute dtype ("float32" / "bfloat16")
    pca: PCAReduction | None = None  # fitted on the finite rows; stored with the version


def make_embedder(spec: EmbeddingSpec, weights_path: Path | None = None):
    """The embedder a study's embedding spec describes (not fitted)."""
    if spec.method == "rcf":
        from eocausal.embed.rcf import RCFEmbedder

        return RCFEmbedder(
            n_features=spec.n_features, patch_size=spec.patch_size, seed=spec.seed,
            device=spec.device, batch_size=spec.batch_size, dtype=spec.dtype,
            branches=spec.branches, bias=spec.bias, pool_grid=spec.pool_grid,
            filters=spec.filters, raw_bias=spec.raw_bias, pool_scales=spec.pool_scales,
        )
    if spec.method == "backbone":
        from eocausal.embed.backbone import FEATURE_WIDTHS, BackboneEmbedder

        if weights_path is None:
            if not spec.weights:
                raise EmbeddingError("embedding.method 'backbone' needs embedding.weights")
            weights_path = Path(spec.weights)
        width = FEATURE_WIDTHS[spec.backbone]
        if "n_features" in spec.model_fields_set and spec.n_features != width:
            raise EmbeddingError(
                f"embedding.n_features {spec.n_features} does not match {spec.backbone}, whose "
                f"features are {width} wide: leave n_features out for a backbone"
            )
        return BackboneEmbedder(
            spec.backbone, weights_path, device=spec.device, dtype=spec.dtype,
            batch_size=spec.batch_size, input_size_px=spec.input_size_px,
            rgb_bands=spec.rgb_bands, seed=spec.seed,
            normalization=spec.normalization.model_dump() if spec.normalization is not None else None,
        )
    raise EmbeddingError(f"embedding.method {spec.method!r} is not known (use 'rcf' or 'backbone')")


def embedding_version(usable: pd.DataFrame, embedder, spec: EmbeddingSpec) -> str:
    # Device and batch size change nothing beyond float tolerance: they stay out of the key. The
    # dtype does change the features (bf16 vs float32, ~1e-3): its resolved value is in the key.
    config = {k: v for k, v in embedder.config().items() if k not in ("device", "batch_size", "dtype")}
    if spec.method == "rcf":
        from eocausal.embed.rcf import RCF_ALGORITHM_VERSION as algorithm
    else:
        from eocausal.embed.backbone import BACKBONE_ALGORITHM_VERSION as algorithm
    return json_version({
        "code": CODE_VERSION, "algorithm": algorithm, "method": spec.method, "config": config,
        "dtype": embedder.dtype_, "pca_components": spec.pca_components,
        "chips": usable["chip_key"].tolist(),
    })


def fit_sample(usable: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The chips the embedder is fitted on: all of them, or a seeded sample of ``FIT_CHIPS``."""
    if len(usable) <= FIT_CHIPS:
        return usable
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF17]))
    return usable.iloc[np.sort(rng.choice(len(usable), FIT_CHIPS, replace=False))]


def storage_order(usable: pd.DataFrame, stored: chipstore.Scan) -> np.ndarray:
    """The permutation of ``usable``'s rows that reads the chip store part by part, row by row
    (chips in no part, e.g. an old per-chip cache, last): streamed in that order, each batch reads
    one or two parts' row groups instead of some of every part's. ``stored``: the store's scan."""
    found = stored.found
    parts = {p: i for i, p in enumerate(sorted({v.part for v in found.values()}))}
    where = [(parts[found[k].part], found[k].row) if k in found else (len(parts), 0) for k in usable["chip_key"]]
    return np.array(sorted(range(len(where)), key=where.__getitem__), dtype=np.int64)


def store_order_batches(usable: pd.DataFrame,
                        chip_cache: Path) -> tuple[np.ndarray, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(order, batches): ``usable``'s chips streamed in store order (:func:`storage_order`), the store
    scanned once; batch rows are ``usable``'s rows ``order[start : start + len(batch)]``."""
    stored = chipstore.scan(Path(chip_cache), set(usable["chip_key"]))
    order = storage_order(usable, stored)
    return order, chip_batches(usable.iloc[order], chip_cache, stored)


def chip_batches(usable: pd.DataFrame, chip_cache: Path,
                 stored: chipstore.Scan | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The chips of ``usable``, in order, ``LOAD_CHIPS`` at a time (chips, valid masks); the store
    is scanned once for all of them (``stored``, when the caller has that scan)."""
    if stored is None:
        stored = chipstore.scan(Path(chip_cache), set(usable["chip_key"]))
    for start in range(0, len(usable), LOAD_CHIPS):
        yield load_chips(usable.iloc[start : start + LOAD_CHIPS], chip_cache, stored)


def fit_feature_pca(features: np.ndarray, n_components: int) -> PCAReduction | None:
    """The exact PCA of the finite rows, from their moments accumulated ``LOAD_CHIPS`` rows at a
    time (never a float64 copy of every feature)."""
    moments = PCAMoments(features.shape[1])
    for start in range(0, len(features), LOAD_CHIPS):
        moments.update(features[start : start + LOAD_CHIPS])
    return pca_from_moments(moments, n_components)


def component_scores(features: np.ndarray, pca: PCAReduction) -> np.ndarray:
    """Every unit's scores on the stored PCA's components (float32 [n, k]), ``LOAD_CHIPS`` rows at a
    time (never a float64 copy of every feature); rows with non-finite features get NaN."""
    scores = np.full((len(features), pca.n_components_), np.nan, dtype=np.float32)
    for start in range(0, len(features), LOAD_CHIPS):
        block = features[start : start + LOAD_CHIPS]
        finite = np.isfinite(block).all(axis=1)
        if finite.any():
            scores[start : start + LOAD_CHIPS][finite] = pca.transform(block[finite])
    return scores


def _write_atomic(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_point(path)  # fault tests: a full or read-only disk
    atomic.write_with(path, write, suffix=path.suffix)


def write_json_atomic(obj, path: Path) -> Path:
    path = Path(path)
    _write_atomic(path, lambda fh: fh.write(json.dumps(obj).encode()))
    return path


def _pca_path(path: Path) -> Path:
    return path.with_name(path.stem + ".pca.json")


def compute_embeddings(
    chip_index: pd.DataFrame,
    chip_cache: Path,
    cache_dir: Path,
    spec: EmbeddingSpec,
    *,
    weights_path: Path | None = None,
) -> Embeddings:
    """Embeddings of the ``status == 'ok'`` chips, from the cache when the same chips and method
    were embedded before. ``weights_path``: a backbone's weights file, resolved by the caller
    (study paths are relative to the study file)."""
    usable = chip_index[chip_index["status"] == "ok"]
    unit_ids = usable["unit_id"].astype(str).tolist()
    embedder = make_embedder(spec, weights_path)
    version = embedding_version(usable, embedder, spec)
    path = Path(cache_dir) / f"{version}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if cached["unit_ids"].tolist() == unit_ids:
                features = cached["features"]
                pca = _load_or_refit_pca(path, features, spec)
                return Embeddings(unit_ids, features, version, spec.method, True, None, embedder.dtype_, pca)
    if not unit_ids:
        raise EmbeddingError("no usable chips to embed (every unit was excluded at chip extraction)")

    from eocausal.embed.devices import torch_cpu_threads  # torch: only when something is computed

    with torch_cpu_threads(spec.cpu_threads):
        chips, valid = load_chips(fit_sample(usable, spec.seed), chip_cache)
        embedder.fit(chips, valid)
        del chips, valid
        features = np.empty((len(unit_ids), embedder.n_features), dtype=np.float32)
        start = 0
        progress.report("embeddings", 0, len(unit_ids), "chips", spec.method)
        order, batches = store_order_batches(usable, chip_cache)  # written back in index order
        for block in embedder.transform_stream(batches):
            features[order[start : start + len(block)]] = block
            start += len(block)
            progress.report("embeddings", start, len(unit_ids), "chips", spec.method)

    _write_atomic(path, lambda fh: np.savez(
        fh, unit_ids=np.array(unit_ids), features=features,
        config=np.array(json.dumps(embedder.config())),
    ))
    # Fitted in index order, not as the blocks arrived: float sums depend on their order, and the
    # store's order depends on how its parts were written (which run, which period first), so a
    # PCA accumulated in store order differed in the last bits between two working folders.
    pca = fit_feature_pca(features, spec.pca_components)
    if pca is not None:
        _write_atomic(_pca_path(path), lambda fh: fh.write(json.dumps(pca.to_dict()).encode()))
    return Embeddings(unit_ids, features, version, spec.method, False, embedder.device_, embedder.dtype_, pca)


def _load_or_refit_pca(path: Path, features: np.ndarray, spec: EmbeddingSpec) -> PCAReduction | None:
    pca_path = _pca_path(path)
    if pca_path.exists():
        try:
            return PCAReduction.from_dict(json.loads(pca_path.read_text()))
        except (EmbeddingError, ValueError):
            pass  # damaged: fit it again below
    pca = fit_feature_pca(features, spec.pca_components)
    if pca is not None:
        _write_atomic(pca_path, lambda fh: fh.write(json.dumps(pca.to_dict()).encode()))
    return pca
