"""A period's imagery from its tiles: the chip index and embeddings of every tile (written by the
period x tile partitions of `image_chips` and `image_embeddings`), merged in the survey's unit
order, and the exact PCA of the period from the tiles' moments (merged in tile order, so every
deployment gets the same bits whatever order its tile runs finished in).

The merged tables are the ones the rest of the graph reads (``image_chips/period=<p>.parquet``,
``image_embeddings/period=<p>.parquet`` with the PCA beside it): what one whole-period embedding
(:func:`eocausal.embed.embeddings.compute_embeddings`) gives, with the same embedding version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.embed import EmbeddingError
from eocausal.embed.embeddings import Embeddings, embedding_version, feature_moments, write_atomic
from eocausal.embed.reduce import PCAMoments, PCAReduction, pca_from_moments
from eocausal.lake import embeddings_table, read_vectors, tile_path, write_table_atomic
from eocausal.study import EmbeddingSpec

MOMENTS_SUFFIX = ".moments.npz"


def write_tile(lake: Path, period: str, tile: str, emb: Embeddings, embedder_version: str) -> Path:
    """One tile's embeddings (lake/image_embeddings/period=P/tile=T.parquet) and, beside them, the
    moments of its features (tile=T.moments.npz); the table's path."""
    table = embeddings_table(emb.unit_ids, emb.features, None, embedding_version=emb.version,
                             embedding_method=emb.method, embedder_version=embedder_version, period=period, tile=tile)
    path = write_table_atomic(table, tile_path(lake, "image_embeddings", period, tile))
    moments = feature_moments(emb.features)
    write_atomic(tile_path(lake, "image_embeddings", period, tile, MOMENTS_SUFFIX),
                 lambda fh: np.savez(fh, n=moments.n, n_skipped=moments.n_skipped, mean=moments.mean,
                                     m2=moments.m2, max_abs=moments.max_abs))
    return path


def read_moments(path: Path) -> PCAMoments:
    with np.load(path, allow_pickle=False) as z:
        moments = PCAMoments(int(z["mean"].shape[0]))
        moments.n, moments.n_skipped = int(z["n"]), int(z["n_skipped"])
        moments.mean, moments.m2, moments.max_abs = z["mean"], z["m2"], z["max_abs"]
    return moments


@dataclass
class PeriodImagery:
    chip_index: pd.DataFrame  # one row per survey unit, in the survey's order
    unit_ids: list[str]  # the usable units (status ok), in the survey's order
    features: np.ndarray  # float32 [len(unit_ids), n_features]
    version: str  # eocausal.embed.embeddings.embedding_version of the usable chips
    method: str
    embedder_version: str
    pca: PCAReduction | None
    tiles: list[str]


class MissingTiles(EmbeddingError):
    """Some of the survey's tiles have no (current) chips or embeddings for the period."""


def merge_period(lake: Path, period: str, units: pd.DataFrame, spec: EmbeddingSpec) -> PeriodImagery:
    """The period's imagery from the tiles of ``units`` (the survey's ``unit_id`` and ``tile``, in
    its order). Raises :class:`MissingTiles` naming the tiles (and units) whose partitions are
    missing or older than the survey, and EmbeddingError when the tiles were embedded by different
    embedders (a tile not re-embedded after the period's embedder changed)."""
    tiles = sorted(set(units["tile"].astype(str)))
    absent = [t for t in tiles if not (tile_path(lake, "image_chips", period, t).is_file()
                                       and tile_path(lake, "image_embeddings", period, t).is_file()
                                       and tile_path(lake, "image_embeddings", period, t, MOMENTS_SUFFIX).is_file())]
    if absent:
        raise MissingTiles(_tiles_message(period, absent, "have no chips or embeddings yet"))
    index = pd.concat([pd.read_parquet(tile_path(lake, "image_chips", period, t)) for t in tiles], ignore_index=True)
    ids = units["unit_id"].astype(str)
    position = pd.Index(index["unit_id"].astype(str))
    if not position.is_unique:
        raise MissingTiles(f"period {period!r}: a unit has chip records in two tiles; re-materialise the "
                           f"period's image_chips partitions after the survey's tiles changed")
    rows = position.get_indexer(ids)
    if (rows < 0).any():
        stale = sorted(set(units.loc[(rows < 0), "tile"].astype(str)))
        missing = ids[rows < 0].tolist()
        raise MissingTiles(_tiles_message(period, stale, f"hold chips of an older survey ({len(missing)} unit(s) "
                                                         f"without a chip record, e.g. {missing[:5]})"))
    index = index.iloc[rows].reset_index(drop=True)
    usable = index[index["status"] == "ok"]
    unit_ids = usable["unit_id"].astype(str).tolist()
    want = pd.Index(unit_ids)

    features: np.ndarray | None = None
    filled = np.zeros(len(unit_ids), dtype=bool)
    moments: PCAMoments | None = None
    embedders, methods = set(), set()
    for t in tiles:
        path = tile_path(lake, "image_embeddings", period, t)
        meta = pd.read_parquet(path, columns=["embedder_version", "embedding_method"]).drop_duplicates()
        embedders.update(meta["embedder_version"])
        methods.update(meta["embedding_method"])
        tile_ids, block = read_vectors(path)
        if not tile_ids:
            continue
        at = want.get_indexer(tile_ids)
        if (at < 0).any():
            raise MissingTiles(_tiles_message(period, [t], "hold embeddings of units that are not usable in its "
                                                          "chips: re-materialise its image_embeddings partition"))
        if features is None:
            features = np.full((len(unit_ids), block.shape[1]), np.nan, dtype=np.float32)
        features[at] = block
        filled[at] = True
        tile_moments = read_moments(tile_path(lake, "image_embeddings", period, t, MOMENTS_SUFFIX))
        moments = tile_moments if moments is None else moments.merge(tile_moments)
    if len(embedders) > 1:
        raise EmbeddingError(f"period {period!r}: the tiles were embedded by {len(embedders)} different embedders; "
                             "re-materialise the period's image_embeddings partitions after image_embedder")
    if features is None or moments is None or not embedders:
        raise EmbeddingError(f"period {period!r}: no usable chips to embed (every unit was excluded "
                             "at chip extraction)")
    if not filled.all():
        late = sorted(set(usable.loc[~filled, "tile"].astype(str))) if "tile" in usable else tiles
        raise MissingTiles(_tiles_message(period, late, f"have usable chips without embeddings ({int((~filled).sum())} "
                                                         "unit(s)): re-materialise their image_embeddings partitions"))
    embedder = embedders.pop()
    return PeriodImagery(index, unit_ids, features, embedding_version(usable, embedder, spec), methods.pop(),
                         embedder, pca_from_moments(moments, spec.pca_components), tiles)


def _tiles_message(period: str, tiles: list[str], what: str) -> str:
    shown = ", ".join(f"{period}|{t}" for t in tiles[:10]) + (f" and {len(tiles) - 10} more" if len(tiles) > 10 else "")
    return (f"period {period!r}: {len(tiles)} tile(s) of the survey {what}: materialise image_chips and "
            f"image_embeddings for the partitions {shown} first")
