"""The estimators on the marts' image components (the stored PCA's scores) equal the estimators
on the full embedding through the same PCA; the components come out of DuckDB through Arrow."""

import duckdb
import numpy as np
import pandas as pd
import pytest

from eocausal.embed.embeddings import component_scores
from eocausal.embed.reduce import fit_pca
from eocausal.estimate.cate import build_features
from eocausal.estimate.effects import image_components
from eocausal.lake import embedding_matrix, embeddings_table
from eocausal.study import AnalysisSpec
from eocausal.warehouse import query_units


@pytest.fixture
def units():
    rng = np.random.default_rng(0)
    n, p = 300, 40
    emb = (rng.normal(size=(n, 6)) @ rng.normal(size=(6, p)) + 0.1 * rng.normal(size=(n, p))).astype(np.float32)
    d = rng.binomial(1, 0.4, n)
    return pd.DataFrame({"unit_id": [f"u{i:03d}" for i in range(n)], "treatment": d,
                         "outcome": emb[:, 0] + d + rng.normal(size=n), "cov_a": rng.normal(size=n),
                         "embedding": list(emb)})


def test_components_equal_the_embedding_through_the_stored_pca(units):
    emb = embedding_matrix(units["embedding"])
    pca = fit_pca(emb, 20)
    scores = component_scores(emb.astype(np.float32), pca)
    carried = units.drop(columns="embedding").assign(image_components=list(scores))
    for k in (8, 20, "auto"):
        analysis = AnalysisSpec(image_components=k)
        ours = image_components(carried, ["cov_a"], analysis, pca)
        full = image_components(units, ["cov_a"], analysis, pca)
        assert ours.shape == full.shape
        np.testing.assert_allclose(ours, full, atol=1e-4 * np.abs(full).max())
    cate = build_features(carried, ["cov_a"], 8, 0, pca)
    np.testing.assert_allclose(cate.image, build_features(units, ["cov_a"], 8, 0, pca).image, atol=1e-3)
    assert cate.pca.n_components_ == 8
    with pytest.raises(ValueError, match="21 image components asked for, but the units carry 20"):
        image_components(carried, ["cov_a"], AnalysisSpec(image_components=21), pca)


def test_rows_with_non_finite_features_get_nan_scores():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 5)).astype(np.float32)
    pca = fit_pca(emb, 3)
    emb[7, 2] = np.nan
    scores = component_scores(emb, pca)
    assert np.isnan(scores[7]).all() and np.isfinite(np.delete(scores, 7, axis=0)).all()


def test_the_marts_vectors_come_through_arrow_in_one_piece(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    comps = rng.normal(size=(30, 4)).astype(np.float32)
    table = embeddings_table([f"u{i}" for i in range(30)], emb, comps, period="geotiff")
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db)) as con:
        con.register("t", table)
        con.execute("create table units as select unit_id, image_components, period from t")
    units = query_units(db, "select * from units order by unit_id")
    assert list(units.columns) == ["unit_id", "image_components", "period"]
    assert isinstance(units["image_components"].dtype, pd.ArrowDtype)
    order = np.argsort([f"u{i}" for i in range(30)])
    np.testing.assert_array_equal(embedding_matrix(units["image_components"]), comps[order].astype(np.float64))
    # a subset (as the estimators take for measured outcomes) reads the same rows
    np.testing.assert_array_equal(embedding_matrix(units["image_components"][units.index % 2 == 0]),
                                  comps[order][::2].astype(np.float64))


def test_lake_vectors_are_read_from_the_flat_buffer_whole_or_first_rows(tmp_path):
    from eocausal.lake import read_vectors, write_table_atomic

    rng = np.random.default_rng(4)
    features = rng.standard_normal((30, 12)).astype(np.float32)
    ids = [f"u{i:02d}" for i in range(30)]
    path = write_table_atomic(embeddings_table(ids, features, None, embedding_version="v", embedding_method="rcf",
                                               period="geotiff"), tmp_path / "emb.parquet")
    got_ids, got = read_vectors(path)
    assert got_ids == ids and got.dtype == np.float32 and np.array_equal(got, features)
    first_ids, first = read_vectors(path, rows=8)
    assert first_ids == ids[:8] and np.array_equal(first, features[:8])
