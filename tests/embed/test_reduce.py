"""PCA reduction of embeddings and the embeddings validation rule."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from eocausal.embed import EmbeddingError
from eocausal.embed.reduce import PCAReduction, fit_pca, validate_embeddings


def low_rank_features(n: int = 200, p: int = 30, rank: int = 3, seed: int = 0) -> np.ndarray:
    """Columns on wildly different scales, driven by `rank` latent factors plus a little noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, rank)) * np.array([5.0, 3.0, 1.0])[:rank]
    mixed = latent @ rng.normal(size=(rank, p)) + 0.01 * rng.normal(size=(n, p))
    return mixed * np.logspace(-3, 4, p) + 100.0


def test_pca_matches_standardised_svd_and_ignores_column_scale():
    x = low_rank_features()
    reduction = fit_pca(x, n_components=5, seed=0)
    scores = reduction.transform(x)
    assert scores.shape == (200, 5) and scores.dtype == np.float64
    assert reduction.components_.shape == (5, 30)

    # Independent check: SVD of the z-scored matrix.
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    _, singular, vt = np.linalg.svd(z, full_matrices=False)
    for got, want in zip(reduction.components_, vt[:5]):
        assert abs(abs(got @ want) - 1) < 1e-8  # same direction up to sign
    expected_ratio = singular[:5] ** 2 / (singular**2).sum()
    np.testing.assert_allclose(reduction.explained_variance_ratio_, expected_ratio, rtol=1e-8)
    # Three latent factors: three components explain nearly everything despite the column scales.
    assert reduction.explained_variance_ratio_[:3].sum() > 0.99
    np.testing.assert_allclose(scores.mean(axis=0), 0.0, atol=1e-9)


def test_constant_columns_are_guarded():
    x = low_rank_features(p=10)
    x[:, 4] = 7.0
    x[:, 7] = 0.0
    reduction = fit_pca(x, n_components=3)
    assert np.isfinite(reduction.transform(x)).all()
    assert reduction.scale_[4] == 1.0 and reduction.scale_[7] == 1.0
    np.testing.assert_allclose(reduction.components_[:, [4, 7]], 0.0, atol=1e-12)


def test_components_capped_at_min_n_p():
    x = low_rank_features(n=6, p=30)
    assert fit_pca(x, n_components=64).n_components_ == 6
    narrow = fit_pca(low_rank_features(n=50, p=4), n_components=64)
    assert narrow.transform(np.ones((2, 4))).shape == (2, 4)


def test_round_trip_through_json():
    x = low_rank_features()
    reduction = fit_pca(x, n_components=4)
    state = json.loads(json.dumps(reduction.to_dict()))
    restored = PCAReduction.from_dict(state)
    np.testing.assert_array_equal(restored.transform(x), reduction.transform(x))
    np.testing.assert_array_equal(
        restored.explained_variance_ratio_, reduction.explained_variance_ratio_
    )

    broken = dict(state, components=state["components"][:-1])
    with pytest.raises(EmbeddingError, match="malformed"):
        PCAReduction.from_dict(broken)
    with pytest.raises(EmbeddingError, match="format"):
        PCAReduction.from_dict({"mean": []})


def test_pca_input_errors():
    x = low_rank_features(p=8)
    with pytest.raises(EmbeddingError, match=r"\[N, 8\]"):
        fit_pca(x, 2).transform(x[:, :5])
    x[3, 2] = np.nan
    with pytest.raises(EmbeddingError, match=r"1 row\(s\) have non-finite features \(rows \[3\]\)"):
        fit_pca(x, 2)
    with pytest.raises(EmbeddingError, match="at least 2 rows"):
        fit_pca(x[:1], 2)
    with pytest.raises(EmbeddingError, match="n_components"):
        fit_pca(x[4:], 0)


def test_validate_clean_embeddings():
    x = low_rank_features(n=20, p=6)
    assert validate_embeddings(x, [f"u{i}" for i in range(20)]) == []


def test_validate_names_non_finite_units():
    x = low_rank_features(n=40, p=6).astype(np.float32)
    bad = [2, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    x[bad[:6], 1] = np.nan
    x[bad[6:], 4] = np.inf
    ids = [f"village_{i:02d}" for i in range(40)]
    problems = validate_embeddings(x, ids)
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith("11 unit(s) have non-finite embedding values")
    assert "village_02" in message and "village_31" in message  # first ten are named
    assert "village_37" not in message and "(and 1 more)" in message


def test_validate_counts_constant_columns_and_flat_rows():
    x = low_rank_features(n=30, p=8)
    x[:, [1, 6]] = 3.5
    x[[4, 9], :] = 3.5  # blank chips: every feature the same
    problems = validate_embeddings(x, [f"u{i}" for i in range(30)])
    assert any("2 of 8 embedding column(s) are constant" in p for p in problems)
    flat_rows = [p for p in problems if p.startswith("2 unit(s) have all-constant embeddings")]
    assert len(flat_rows) == 1 and "u4, u9" in flat_rows[0]


def test_validate_shape_and_ids():
    x = low_rank_features(n=5, p=3)
    assert "5 embedding rows but 4 unit ids" in validate_embeddings(x, list("abcd"))[0]
    assert "appear more than once: a" in validate_embeddings(x, list("abcae"))[0]
    assert "2-D" in validate_embeddings(x[0], ["a"])[0]


def test_reduce_imports_without_torch():
    code = "import sys, eocausal.embed.reduce; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_leading_components_and_the_estimators_reduction(tmp_path):
    from eocausal.embed.reduce import image_reduction
    from eocausal.lake import stored_pca

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 20)) @ rng.normal(size=(20, 20))
    full = fit_pca(x, 10)
    first4 = full.leading(4)
    np.testing.assert_array_equal(first4.transform(x), full.transform(x)[:, :4])
    np.testing.assert_allclose(np.abs(first4.transform(x)), np.abs(fit_pca(x, 4).transform(x)), atol=1e-8)
    with pytest.raises(EmbeddingError):
        full.leading(11)
    # the stored PCA serves when it has enough components for the embedding's width, else one is fitted
    assert image_reduction(x, 4, stored=full).components_.shape == (4, 20)
    np.testing.assert_array_equal(image_reduction(x, 4, stored=full).components_, full.components_[:4])
    refit = image_reduction(x, 12, stored=full)  # the stored one has only 10
    assert refit.n_components_ == 12
    assert image_reduction(x[:, :15], 4, stored=full).n_features_in_ == 15  # another width: refitted

    # lake: the stored PCA is read only under its own embeddings' version
    lake = tmp_path / "lake"
    path = lake / "image_embeddings" / "period=geotiff.pca.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"embedding_version": "v1", "pca": full.to_dict()}))
    loaded = stored_pca(lake, "geotiff", "v1")
    np.testing.assert_array_equal(loaded.components_, full.components_)
    assert stored_pca(lake, "geotiff", "v2") is None
    assert stored_pca(lake, "2019", "v1") is None
    path.write_text("{not json")
    assert stored_pca(lake, "geotiff", "v1") is None


def test_pca_from_moments_is_the_exact_pca_and_merges_tile_by_tile():
    from eocausal.embed.reduce import PCAMoments, pca_from_moments

    rng = np.random.default_rng(3)
    latent = rng.standard_normal((3000, 4))
    x = latent @ rng.standard_normal((4, 30)) * 5 + rng.standard_normal((3000, 30)) + 40.0
    x[:, 7] = 2.5  # a constant column
    x[11, 3] = np.nan  # a non-finite row is skipped
    finite = np.isfinite(x).all(axis=1)
    exact = fit_pca(x[finite], 6)  # tall and narrow: scikit-learn's exact covariance solver
    whole = pca_from_moments(PCAMoments(30).update(x), 6)
    tiles = [PCAMoments(30).update(part) for part in np.array_split(x, 7)]
    merged = tiles[0]
    for tile in tiles[1:]:
        merged.merge(tile)
    assert merged.n == 2999 and merged.n_skipped == 1
    for pca in (whole, pca_from_moments(merged, 6)):
        np.testing.assert_allclose(pca.explained_variance_, exact.explained_variance_, rtol=1e-9)
        np.testing.assert_allclose(pca.explained_variance_ratio_, exact.explained_variance_ratio_, rtol=1e-9)
        np.testing.assert_allclose(pca.components_, exact.components_, atol=1e-9)
        np.testing.assert_allclose(pca.transform(x[finite]), exact.transform(x[finite]), atol=1e-8)
    assert pca_from_moments(PCAMoments(30).update(x[:1]), 6) is None
