"""The embedding stage: embed every usable chip, cached by content (chips + method).

Two steps, as a period's tiles run them: :func:`fit_embedder` fits the embedder once, on the
usable chips of a seeded sample of at most ``FIT_CHIPS`` of the period's units
(:func:`fit_sample`, independent of the tiling), and stores it under its version (method,
configuration with the compute dtype resolved, a backbone's weights by content, the sample's chip
keys); :func:`embed_chips` transforms a set of chips (a tile's) with it, the chips streaming from
the chip cache ``LOAD_CHIPS`` at a time, cached under the embedder's version and the ordered chip
keys, so a re-run on the same chips costs one file read and any change computes afresh.
:func:`feature_moments` gives a tile's PCA moments (merged per period by eocausal.embed.merge);
:func:`compute_embeddings` is the whole period at once, with its PCA (``embedding.pca_components``),
stored beside the features under the same version.
"""

from __future__ import annotations

import json
import pickle
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


def embedder_version(fit_usable: pd.DataFrame, embedder, spec: EmbeddingSpec) -> str:
    """The fitted embedder's version: method, configuration, compute dtype and the chips it is fitted on."""
    # Device and batch size change nothing beyond float tolerance: they stay out of the key. The
    # dtype does change the features (bf16 vs float32, ~1e-3): its resolved value is in the key.
    config = {k: v for k, v in embedder.config().items() if k not in ("device", "batch_size", "dtype")}
    if spec.method == "rcf":
        from eocausal.embed.rcf import RCF_ALGORITHM_VERSION as algorithm
    else:
        from eocausal.embed.backbone import BACKBONE_ALGORITHM_VERSION as algorithm
    return json_version({
        "code": CODE_VERSION, "algorithm": algorithm, "method": spec.method, "config": config,
        "dtype": embedder.dtype_, "fit_chips": fit_usable["chip_key"].tolist(),
    })


def embedding_version(usable: pd.DataFrame, embedder_version: str, spec: EmbeddingSpec) -> str:
    """The version of the embeddings of ``usable``'s chips (in their order) by a fitted embedder:
    the same for one period embedded whole or tile by tile and merged."""
    return json_version({"code": CODE_VERSION, "embedder": embedder_version,
                         "pca_components": spec.pca_components, "chips": usable["chip_key"].tolist()})


def fit_sample(units: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The units the embedder is fitted on: all of them, or a seeded sample of ``FIT_CHIPS`` (in
    their order). Drawn from the period's units (the survey's, in its order), so it does not
    depend on how the units are tiled; the fit then uses the usable chips among them."""
    if len(units) <= FIT_CHIPS:
        return units
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF17]))
    return units.iloc[np.sort(rng.choice(len(units), FIT_CHIPS, replace=False))]


@dataclass
class FittedEmbedder:
    embedder: object  # fitted: transform / transform_stream
    version: str  # eocausal.embed.embeddings.embedder_version
    n_fit: int  # usable chips it was fitted on


def _embedder_path(cache_dir: Path, version: str) -> Path:
    return Path(cache_dir) / "embedders" / f"{version}.pkl"


def fit_embedder(fit_index: pd.DataFrame, chip_cache: Path, cache_dir: Path, spec: EmbeddingSpec,
                 *, weights_path: Path | None = None) -> FittedEmbedder:
    """The embedder fitted on the usable chips of ``fit_index`` (a :func:`fit_sample` of a period's
    chip index), pickled under its version in ``cache_dir``/embedders: fitted once per period,
    loaded by every tile's run (:func:`load_embedder`)."""
    usable = fit_index[fit_index["status"] == "ok"]
    if usable.empty:
        raise EmbeddingError(f"no usable chip among the {len(fit_index)} units the embedder is fitted on "
                             "(every one was excluded at chip extraction)")
    embedder = make_embedder(spec, weights_path)
    version = embedder_version(usable, embedder, spec)
    try:
        return FittedEmbedder(load_embedder(cache_dir, version), version, len(usable))
    except EmbeddingError:
        pass  # not fitted yet (or an unreadable pickle): fit it
    from eocausal.embed.devices import torch_cpu_threads  # torch: only when something is computed

    with torch_cpu_threads(spec.cpu_threads):
        chips, valid = load_chips(usable, chip_cache)
        embedder.fit(chips, valid)
        del chips, valid
    write_atomic(_embedder_path(cache_dir, version),
                  lambda fh: pickle.dump(embedder, fh, protocol=pickle.HIGHEST_PROTOCOL))
    return FittedEmbedder(embedder, version, len(usable))


def load_embedder(cache_dir: Path, version: str):
    """The embedder :func:`fit_embedder` stored under ``version``."""
    path = _embedder_path(cache_dir, version)
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except FileNotFoundError:
        raise EmbeddingError(f"no fitted embedder {version} in {path.parent}: materialise image_embedder "
                             "for this period first") from None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise EmbeddingError(f"the fitted embedder {path} cannot be read ({type(exc).__name__}: {exc}): "
                             "materialise image_embedder for this period again") from exc


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


def feature_moments(features: np.ndarray) -> PCAMoments:
    """The moments of the finite rows, accumulated ``LOAD_CHIPS`` rows at a time in row order
    (never a float64 copy of every feature). A tile's moments, merged in tile order, give the
    period's exact PCA (:func:`eocausal.embed.reduce.pca_from_moments`)."""
    moments = PCAMoments(features.shape[1])
    for start in range(0, len(features), LOAD_CHIPS):
        moments.update(features[start : start + LOAD_CHIPS])
    return moments


def fit_feature_pca(features: np.ndarray, n_components: int) -> PCAReduction | None:
    """The exact PCA of the finite rows (:func:`feature_moments`)."""
    return pca_from_moments(feature_moments(features), n_components)


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


def write_atomic(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_point(path)  # fault tests: a full or read-only disk
    atomic.write_with(path, write, suffix=path.suffix)


def write_json_atomic(obj, path: Path) -> Path:
    path = Path(path)
    write_atomic(path, lambda fh: fh.write(json.dumps(obj).encode()))
    return path


def _pca_path(path: Path) -> Path:
    return path.with_name(path.stem + ".pca.json")


def embed_chips(chip_index: pd.DataFrame, chip_cache: Path, cache_dir: Path, fitted: FittedEmbedder,
                spec: EmbeddingSpec) -> Embeddings:
    """Embeddings of the ``status == 'ok'`` chips by a fitted embedder (transform only), from the
    cache when the same chips were embedded by the same embedder before. A period's tiles are
    embedded one by one with the period's embedder (no PCA here: see :func:`feature_moments`)."""
    usable = chip_index[chip_index["status"] == "ok"]
    unit_ids = usable["unit_id"].astype(str).tolist()
    embedder = fitted.embedder
    version = embedding_version(usable, fitted.version, spec)
    path = Path(cache_dir) / f"{version}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if cached["unit_ids"].tolist() == unit_ids:
                return Embeddings(unit_ids, cached["features"], version, spec.method, True, None, embedder.dtype_)
    features = np.empty((len(unit_ids), embedder.n_features), dtype=np.float32)
    if unit_ids:
        from eocausal.embed.devices import torch_cpu_threads  # torch: only when something is computed

        with torch_cpu_threads(spec.cpu_threads):
            start = 0
            progress.report("embeddings", 0, len(unit_ids), "chips", spec.method)
            order, batches = store_order_batches(usable, chip_cache)  # written back in index order
            for block in embedder.transform_stream(batches):
                features[order[start : start + len(block)]] = block
                start += len(block)
                progress.report("embeddings", start, len(unit_ids), "chips", spec.method)
    write_atomic(path, lambda fh: np.savez(
        fh, unit_ids=np.array(unit_ids, dtype=str), features=features,
        config=np.array(json.dumps(embedder.config())),
    ))
    return Embeddings(unit_ids, features, version, spec.method, False, embedder.device_, embedder.dtype_)


def compute_embeddings(
    chip_index: pd.DataFrame,
    chip_cache: Path,
    cache_dir: Path,
    spec: EmbeddingSpec,
    *,
    weights_path: Path | None = None,
) -> Embeddings:
    """Embeddings of one whole period's ``status == 'ok'`` chips, with the PCA: the embedder
    fitted on :func:`fit_sample` of the index, then every chip transformed (what the tiles of a
    period give, merged). ``weights_path``: a backbone's weights file, resolved by the caller
    (study paths are relative to the study file)."""
    if not (chip_index["status"] == "ok").any():
        raise EmbeddingError("no usable chips to embed (every unit was excluded at chip extraction)")
    fitted = fit_embedder(fit_sample(chip_index, spec.seed), chip_cache, Path(cache_dir), spec,
                          weights_path=weights_path)
    emb = embed_chips(chip_index, chip_cache, cache_dir, fitted, spec)
    # Fitted in index order, not as the blocks arrived: float sums depend on their order, and the
    # store's order depends on how its parts were written (which run, which period first), so a
    # PCA accumulated in store order differed in the last bits between two working folders.
    emb.pca = _load_or_refit_pca(Path(cache_dir) / f"{emb.version}.npz", emb.features, spec)
    return emb


def _load_or_refit_pca(path: Path, features: np.ndarray, spec: EmbeddingSpec) -> PCAReduction | None:
    pca_path = _pca_path(path)
    if pca_path.exists():
        try:
            return PCAReduction.from_dict(json.loads(pca_path.read_text()))
        except (EmbeddingError, ValueError):
            pass  # damaged: fit it again below
    pca = fit_feature_pca(features, spec.pca_components)
    if pca is not None:
        write_atomic(pca_path, lambda fh: fh.write(json.dumps(pca.to_dict()).encode()))
    return pca
