"""The embedding stage: streaming from the chip cache, the cache key, the stored PCA, backbones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import eocausal.embed.embeddings as stage
from eocausal.embed import EmbeddingError
from eocausal.embed.backbone import build_backbone
from eocausal.embed.embeddings import compute_embeddings
from eocausal.embed.merge import MissingTiles, merge_period, write_tile
from eocausal.embed.rcf import RCFEmbedder
from eocausal.imagery import chips as chips_module
from eocausal.imagery import chipstore
from eocausal.imagery.chips import _store, chip_path
from eocausal.imagery.geotiff import Chip
from eocausal.lake import tile_path, write_frame
from eocausal.study import EmbeddingSpec
from tests.embed.test_rcf import textured_chips


@pytest.fixture
def chip_cache(tmp_path):
    """12 usable chips (3 bands, 16 px, one with a nodata corner) and one excluded unit."""
    chips = textured_chips(12, bands=3, size=16, seed=11) * 10000
    valid = np.ones((12, 16, 16), dtype=bool)
    valid[4, :3, :3] = False
    cache = tmp_path / "chips"
    rows = []
    for i in range(12):
        key = f"{i:02d}" + "ab" * 31
        _store(chip_path(cache, key), Chip(chips[i] * valid[i], valid[i], "scene.tif"))
        rows.append({"unit_id": f"u{i}", "chip_key": key, "status": "ok", "reason": None})
    rows.insert(5, {"unit_id": "gone", "chip_key": None, "status": "excluded", "reason": "outside_coverage"})
    return pd.DataFrame(rows), cache, chips, valid


def spec(**kw) -> EmbeddingSpec:
    # The paper's filter bank on the whole chip (the stage's mechanics; the study default's
    # level filters and pooling scales are tested in test_rcf*).
    return EmbeddingSpec(**{"n_features": 16, "dtype": "float32", "pca_components": 4, "filters": "whitened",
                            "pool_scales": [1.0], **kw})


def test_streams_in_batches_and_matches_the_embedder(chip_cache, tmp_path, monkeypatch):
    index, cache, chips, valid = chip_cache
    monkeypatch.setattr(stage, "LOAD_CHIPS", 5)
    loads = []
    real_load = chips_module.load_chips

    def counting_load(idx, cache_dir, stored=None):
        loads.append(int((idx["status"] == "ok").sum()))
        return real_load(idx, cache_dir, stored)

    monkeypatch.setattr(stage, "load_chips", counting_load)
    emb = compute_embeddings(index, cache, tmp_path / "emb", spec())
    assert emb.unit_ids == [f"u{i}" for i in range(12)] and not emb.from_cache
    assert loads == [12, 5, 5, 2]  # one fit sample, then the stream
    expected = RCFEmbedder(n_features=16, dtype="float32").fit_transform(chips, valid)
    np.testing.assert_allclose(emb.features, expected, rtol=1e-5, atol=1e-6)
    assert emb.dtype == "float32"


def test_cache_hit_returns_features_and_stored_pca(chip_cache, tmp_path):
    index, cache, *_ = chip_cache
    first = compute_embeddings(index, cache, tmp_path / "emb", spec())
    assert first.pca is not None and first.pca.n_components_ == 4
    stored = list((tmp_path / "emb").glob("*.pca.json"))
    assert [p.name for p in stored] == [f"{first.version}.pca.json"]
    again = compute_embeddings(index, cache, tmp_path / "emb", spec(batch_size=3, device="cpu"))
    assert again.from_cache and again.version == first.version
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.pca.transform(again.features), first.pca.transform(first.features))
    # The stored PCA is the standardised PCA of these features.
    scores = first.pca.transform(first.features)
    assert np.allclose(scores.mean(axis=0), 0, atol=1e-6)
    assert np.all(np.diff(scores.var(axis=0)) <= 1e-9)  # components by decreasing variance


def test_a_lost_pca_file_is_refitted(chip_cache, tmp_path):
    index, cache, *_ = chip_cache
    first = compute_embeddings(index, cache, tmp_path / "emb", spec())
    pca_file = tmp_path / "emb" / f"{first.version}.pca.json"
    pca_file.write_text("{broken")
    again = compute_embeddings(index, cache, tmp_path / "emb", spec())
    assert again.from_cache
    np.testing.assert_allclose(again.pca.components_, first.pca.components_)
    assert json.loads(pca_file.read_text())["format"] == "eocausal.pca/1"


@pytest.mark.parametrize(
    "change", [{"dtype": "bfloat16"}, {"branches": "both"}, {"pool_grid": 2}, {"bias": 0.1},
               {"pca_components": 3}, {"seed": 1}],
)
def test_method_changes_make_a_new_version(chip_cache, tmp_path, change):
    index, cache, *_ = chip_cache
    base = compute_embeddings(index, cache, tmp_path / "emb", spec())
    other = compute_embeddings(index, cache, tmp_path / "emb", spec(**change))
    assert other.version != base.version and not other.from_cache


def test_tiles_embedded_and_merged_equal_the_whole_period(chip_cache, tmp_path):
    """The tile path (embedder fitted once, tiles transformed, merged with the PCA from their
    moments) gives what one whole-period embedding gives: features, version, PCA, chip index."""
    index, cache, *_ = chip_cache
    tiles = ["0231", "0232", "0233"]
    index = index.assign(tile=[tiles[i % 3] for i in range(len(index))])
    whole = compute_embeddings(index, cache, tmp_path / "whole", spec())
    lake, emb_cache = tmp_path / "lake", tmp_path / "emb"
    fitted = stage.fit_embedder(stage.fit_sample(index, 0), cache, emb_cache, spec())
    for t in tiles[::-1]:  # any order: the merge is in tile order
        part = index[index["tile"] == t]
        write_frame(part, tile_path(lake, "image_chips", "p", t))
        write_tile(lake, "p", t, stage.embed_chips(part, cache, emb_cache, fitted, spec()), fitted.version)
    merged = merge_period(lake, "p", index[["unit_id", "tile"]], spec())
    assert merged.unit_ids == whole.unit_ids and merged.version == whole.version and merged.tiles == tiles
    np.testing.assert_allclose(merged.features, whole.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged.pca.components_, whole.pca.components_, atol=1e-8)
    np.testing.assert_allclose(merged.pca.explained_variance_, whole.pca.explained_variance_, rtol=1e-9)
    pd.testing.assert_frame_equal(merged.chip_index, index)
    # a tile without embeddings, or a unit without a chip record: the partitions to materialise are named
    tile_path(lake, "image_embeddings", "p", "0232").unlink()
    with pytest.raises(MissingTiles, match=r"1 tile\(s\) of the survey have no chips or embeddings yet.*p\|0232"):
        merge_period(lake, "p", index[["unit_id", "tile"]], spec())
    grown = pd.concat([index[["unit_id", "tile"]], pd.DataFrame({"unit_id": ["new"], "tile": ["0231"]})])
    write_tile(lake, "p", "0232", stage.embed_chips(index[index["tile"] == "0232"], cache, emb_cache, fitted,
                                                     spec()), fitted.version)
    with pytest.raises(MissingTiles, match=r"hold chips of an older survey.*'new'.*p\|0231"):
        merge_period(lake, "p", grown, spec())


def test_the_fit_sample_does_not_depend_on_the_tiling(chip_cache, tmp_path, monkeypatch):
    index, cache, *_ = chip_cache
    monkeypatch.setattr(stage, "FIT_CHIPS", 4)
    a = stage.fit_sample(index, seed=0)
    b = stage.fit_sample(index.assign(tile="0"), seed=0)
    assert a["unit_id"].tolist() == b["unit_id"].tolist()


def test_fit_sample_is_seeded_and_bounded(chip_cache, tmp_path, monkeypatch):
    index, cache, *_ = chip_cache
    monkeypatch.setattr(stage, "FIT_CHIPS", 4)
    a = compute_embeddings(index, cache, tmp_path / "a", spec())
    b = compute_embeddings(index, cache, tmp_path / "b", spec())
    np.testing.assert_array_equal(a.features, b.features)
    sample = stage.fit_sample(index, seed=0)
    assert len(sample) == 4 and sample.index.is_monotonic_increasing


def test_backbone_method(chip_cache, tmp_path):
    index, cache, *_ = chip_cache
    weights = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18").state_dict(), weights)
    emb = compute_embeddings(index, cache, tmp_path / "emb",
                             EmbeddingSpec(method="backbone", weights="r18.pth", dtype="float32", pca_components=5),
                             weights_path=weights)
    assert emb.features.shape == (12, 512) and np.isfinite(emb.features).all()
    assert emb.method == "backbone" and emb.pca.n_components_ == 5
    # Other weights, same architecture: a different version.
    torch.manual_seed(5)
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "other.pth")
    other = compute_embeddings(index, cache, tmp_path / "emb",
                               EmbeddingSpec(method="backbone", weights="other.pth", dtype="float32"),
                               weights_path=tmp_path / "other.pth")
    assert other.version != emb.version


def test_backbone_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="needs embedding.weights"):
        EmbeddingSpec(method="backbone")
    with pytest.raises(EmbeddingError, match="n_features 1024 does not match resnet50"):
        stage.make_embedder(EmbeddingSpec(method="backbone", weights="w.pth", backbone="resnet50", n_features=1024))
    missing = EmbeddingSpec(method="backbone", weights="w.pth")
    index = pd.DataFrame({"unit_id": ["a"], "chip_key": ["k" * 64], "status": ["ok"]})
    with pytest.raises(EmbeddingError, match="weights file not found"):
        compute_embeddings(index, tmp_path, tmp_path / "emb", missing, weights_path=tmp_path / "w.pth")


def test_cpu_threads_hold_during_the_stage_only(chip_cache, tmp_path, monkeypatch):
    index, cache, _, _ = chip_cache
    before = torch.get_num_threads()
    seen = []
    real_load = chips_module.load_chips

    def load_noting_threads(idx, cache_dir, stored=None):
        seen.append(torch.get_num_threads())
        return real_load(idx, cache_dir, stored)

    monkeypatch.setattr(stage, "load_chips", load_noting_threads)
    first = compute_embeddings(index, cache, tmp_path / "one", spec(cpu_threads=1))
    assert set(seen) == {1} and torch.get_num_threads() == before
    # the thread count is not part of the embeddings' version
    again = compute_embeddings(index, cache, tmp_path / "one", spec())
    assert again.from_cache and again.version == first.version
    with pytest.raises(ValueError):
        EmbeddingSpec(cpu_threads=0)


def test_chips_stream_in_store_order_and_land_in_index_order(chip_cache, tmp_path, monkeypatch):
    index, _, chips, valid = chip_cache
    # the same chips in the Parquet store, written in two parts in another order than the index's
    cache = tmp_path / "store"
    writer = chipstore.PartWriter(cache)
    ok = index[index["status"] == "ok"].reset_index(drop=True)
    for n, i in enumerate([7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6]):
        writer.add(ok["chip_key"][i], (chips[i] * valid[i]).astype(np.uint16), valid[i], "scene.tif", None)
        if n == 5:
            writer.flush()
    writer.close()
    monkeypatch.setattr(stage, "LOAD_CHIPS", 5)
    shuffled = index.iloc[np.random.default_rng(3).permutation(len(index))].reset_index(drop=True)
    usable = shuffled[shuffled["status"] == "ok"]
    order = stage.storage_order(usable, chipstore.scan(cache, set(usable["chip_key"])))
    assert sorted(order.tolist()) == list(range(len(usable))) and order.tolist() != list(range(len(usable)))
    ours = compute_embeddings(shuffled, cache, tmp_path / "store_order", spec())
    monkeypatch.setattr(stage, "storage_order", lambda rows, _: np.arange(len(rows)))
    plain = compute_embeddings(shuffled, cache, tmp_path / "index_order", spec())
    assert ours.unit_ids == plain.unit_ids == usable["unit_id"].astype(str).tolist()
    np.testing.assert_allclose(ours.features, plain.features, rtol=1e-5, atol=1e-6)
    if np.array_equal(ours.features, plain.features):  # the fused kernel: per chip, whatever the batch
        # the stored PCA is a function of the features in index order, not of the store's layout
        assert ours.pca.to_dict() == plain.pca.to_dict()
