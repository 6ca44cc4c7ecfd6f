"""RCFEmbedder: checked against independent computations on small synthetic chips."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score

from eocausal.embed import EmbeddingError
from eocausal.embed.rcf import RCFEmbedder


def textured_chips(n: int, bands: int = 3, size: int = 16, seed: int = 0) -> np.ndarray:
    """Reflectance-like chips (0..1): spatially correlated texture, bands correlated too."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, bands, size + 2, size + 2))
    # A 3x3 box blur gives neighbouring pixels the correlation real imagery has.
    smooth = sum(noise[:, :, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3
    shared = smooth.mean(axis=1, keepdims=True)
    return (0.2 + 0.05 * (0.7 * shared + 0.3 * smooth)).astype(np.float32)


def all_valid(chips: np.ndarray) -> np.ndarray:
    return np.ones((chips.shape[0],) + chips.shape[2:], dtype=bool)


def normalise(emb: RCFEmbedder, chips: np.ndarray) -> np.ndarray:
    return (chips - emb.band_center_[:, None, None]) / emb.band_scale_[:, None, None]


@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_transform_matches_plain_conv_relu_mean(bias):
    chips = textured_chips(12)
    emb = RCFEmbedder(n_features=32, seed=3, bias=bias, device="cpu", dtype="float32")
    emb.fit(chips, all_valid(chips))

    # Band statistics: median and IQR over all (valid) pixels, computed here independently.
    pixels = chips.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    q25, median, q75 = np.percentile(pixels, [25, 50, 75], axis=1)
    np.testing.assert_allclose(emb.band_center_, median, rtol=1e-12)
    np.testing.assert_allclose(emb.band_scale_, q75 - q25, rtol=1e-12)

    x = torch.from_numpy(normalise(emb, chips.astype(np.float64)).astype(np.float32))
    w = torch.from_numpy(emb.filters_)
    reference = F.relu(F.conv2d(x, w) - bias).mean(dim=(2, 3)).numpy()
    features = emb.transform(chips, all_valid(chips))
    assert features.shape == (12, 32) and features.dtype == np.float32
    assert reference.std() > 0  # the comparison means something
    np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_filters_are_whitened_patches_as_in_mosaiks():
    chips = textured_chips(6)
    emb = RCFEmbedder(n_features=16, seed=0).fit(chips, all_valid(chips))
    raw = emb.raw_filters_.reshape(16, -1)
    np.testing.assert_allclose(raw.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, rtol=1e-12)
    # Paper code: patches . ZCA . ZCA^T (whitened filters for unwhitened input).
    expected = (raw @ emb.zca_ @ emb.zca_.T).reshape(emb.filters_.shape)
    np.testing.assert_allclose(emb.filters_, expected, rtol=1e-5, atol=1e-5)


def test_zca_whitens_the_patch_sample():
    # Bands on different scales, so per-band normalisation visibly matters for the patches.
    chips = textured_chips(8, seed=1) * np.array([1.0, 30.0, 0.01], dtype=np.float32)[:, None, None]
    eps = 1e-3
    # More samples than windows: the fit sees every window, so the test can rebuild the sample.
    emb = RCFEmbedder(n_features=16, seed=0, zca_bias=eps).fit(chips, all_valid(chips))

    normalised = normalise(emb, chips.astype(np.float64))
    windows = np.lib.stride_tricks.sliding_window_view(normalised, (3, 3), axis=(2, 3))
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 27)
    patches = patches - patches.mean(axis=1, keepdims=True)
    patches /= np.linalg.norm(patches, axis=1, keepdims=True)
    covariance = patches.T @ patches / len(patches)
    np.testing.assert_allclose(emb.patch_covariance_, covariance, rtol=1e-8, atol=1e-12)
    # Every filter is one of these normalised patches (before whitening).
    raw = emb.raw_filters_.reshape(16, 27)
    nearest = np.sqrt(((raw[:, None, :] - patches[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
    assert nearest.max() < 1e-9

    correlation = covariance / np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    assert np.abs(correlation - np.eye(27)).max() > 0.5  # neighbouring pixels really are correlated

    whitened = patches @ emb.zca_
    whitened_cov = whitened.T @ whitened / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # Directions the eps regulariser barely shrinks must come out white.
    strong = eigenvectors[:, eigenvalues > 20 * eps]
    assert strong.shape[1] >= 10
    np.testing.assert_allclose(strong.T @ whitened_cov @ strong, np.eye(strong.shape[1]), atol=0.05)
    assert np.linalg.eigvalsh(whitened_cov).max() <= 1 + 1e-9  # nothing amplified beyond white


@pytest.mark.parametrize("to_other_scale", [lambda x: x * 1000, lambda x: x * 10000 + 1000])
def test_scale_invariance(to_other_scale):
    reflectance = textured_chips(10)
    valid = all_valid(reflectance)
    valid[0, :4, :4] = False
    a = RCFEmbedder(n_features=32, seed=0).fit_transform(reflectance, valid)
    rescaled = to_other_scale(reflectance).astype(np.float32)
    b = RCFEmbedder(n_features=32, seed=0).fit_transform(rescaled, valid)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * np.abs(a).max())


def test_same_seed_same_features_other_seed_differs():
    chips = textured_chips(10)
    valid = all_valid(chips)
    first = RCFEmbedder(n_features=32, seed=7, n_patch_samples=300)
    second = RCFEmbedder(n_features=32, seed=7, n_patch_samples=300)
    other = RCFEmbedder(n_features=32, seed=8, n_patch_samples=300)
    f1, f2, f3 = (e.fit_transform(chips, valid) for e in (first, second, other))
    np.testing.assert_array_equal(first.filters_, second.filters_)
    np.testing.assert_array_equal(f1, f2)
    assert not np.allclose(first.filters_, other.filters_)
    assert not np.allclose(f1, f3)


def manual_masked_features(emb: RCFEmbedder, chip: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Every window in turn; mean relu(w . patch - bias) over windows wholly on valid pixels."""
    k = emb.patch_size
    x = normalise(emb, chip.astype(np.float64))
    total = np.zeros(emb.n_features)
    count = 0
    for i in range(chip.shape[1] - k + 1):
        for j in range(chip.shape[2] - k + 1):
            if valid[i : i + k, j : j + k].all():
                z = (emb.filters_ * x[:, i : i + k, j : j + k]).sum(axis=(1, 2, 3))
                total += np.maximum(z - emb.bias, 0.0)
                count += 1
    return total / count


def test_nodata_block_pools_only_valid_receptive_fields():
    chips = textured_chips(6, size=14)
    valid = all_valid(chips)
    valid[0, 3:8, 4:10] = False  # a nodata block
    chips[0, :, 3:8, 4:10] = -9999.0  # a nodata fill value that must not leak into anything
    chips[1, 2, 5, 6] = np.nan  # NaN in one band, mask says valid: treated as invalid
    emb = RCFEmbedder(n_features=16, seed=0, dtype="float32").fit(chips, valid)
    assert emb.band_center_.min() > 0  # fill values were not in the band statistics
    features = emb.transform(chips, valid)
    assert np.isfinite(features).all()

    expected = manual_masked_features(emb, chips[0], valid[0])
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-5)
    nan_as_invalid = valid[1].copy()
    nan_as_invalid[5, 6] = False
    expected = manual_masked_features(emb, np.nan_to_num(chips[1]), nan_as_invalid)
    np.testing.assert_allclose(features[1], expected, rtol=1e-4, atol=1e-5)
    # The caller's arrays are left as they were (NaN stays NaN, the mask is not edited).
    assert np.isnan(chips[1, 2, 5, 6]) and valid[1, 5, 6] and valid.sum() == valid.size - 30
    # And what hides under the mask does not matter.
    refilled = chips.copy()
    refilled[0, :, 3:8, 4:10] = 5e4
    np.testing.assert_allclose(emb.transform(refilled, valid)[0], features[0], rtol=1e-6)


def test_chip_without_valid_window_gives_nan_row_and_warns():
    chips = textured_chips(4)
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=8, seed=0).fit(chips, valid)
    valid[2, :, ::2] = False  # every 3x3 window touches a nodata column
    message = r"1 chip\(s\) have no fully-valid 3x3 window.*indexes 2"
    with pytest.warns(RuntimeWarning, match=message):
        features = emb.transform(chips, valid)
    assert np.isnan(features[2]).all()
    assert np.isfinite(np.delete(features, 2, axis=0)).all()


def test_batch_size_does_not_change_features():
    chips = textured_chips(9)
    valid = all_valid(chips)
    valid[3, 10:, :] = False
    emb = RCFEmbedder(n_features=24, seed=0, batch_size=64).fit(chips, valid)
    by_64 = emb.transform(chips, valid)
    emb.batch_size = 1
    by_1 = emb.transform(chips, valid)
    np.testing.assert_allclose(by_1, by_64, rtol=1e-5, atol=1e-6 * np.abs(by_64).max())


def test_features_predict_bright_share():
    """Brightness share of textured chips is linearly recoverable from the features."""
    rng = np.random.default_rng(5)
    n, size, block = 120, 16, 4
    share = rng.uniform(0, 1, size=n)
    bright_level = np.array([0.30, 0.35, 0.40])[:, None, None]
    dark_level = np.array([0.06, 0.08, 0.05])[:, None, None]
    chips = np.empty((n, 3, size, size), dtype=np.float32)
    blocks = (size // block) ** 2
    for i in range(n):
        bright_blocks = rng.permutation(blocks) < round(share[i] * blocks)
        grid = bright_blocks.reshape(size // block, size // block)
        bright = np.kron(grid, np.ones((block, block), bool))
        level = np.where(bright, bright_level, dark_level)
        # Reflectance texture: its amplitude grows with brightness.
        chips[i] = level * (1 + 0.3 * rng.normal(size=(3, size, size)))
        share[i] = bright.mean()
    features = RCFEmbedder(n_features=64, seed=0).fit_transform(chips, all_valid(chips))
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(features[:80], share[:80])
    assert r2_score(share[80:], model.predict(features[80:])) > 0.8


# --- edge cases -------------------------------------------------------------------------------


def test_band_count_mismatch():
    chips = textured_chips(4)
    emb = RCFEmbedder(n_features=8).fit(chips, all_valid(chips))
    four_bands = np.concatenate([chips, chips[:, :1]], axis=1)
    with pytest.raises(EmbeddingError, match="4 bands but the embedder was fitted on 3"):
        emb.transform(four_bands, all_valid(chips))


def test_chips_smaller_than_patch():
    chips = textured_chips(4, size=2)
    with pytest.raises(EmbeddingError, match="2x2 px, smaller than patch_size 3"):
        RCFEmbedder(n_features=8).fit(chips, all_valid(chips))


def test_no_fully_valid_patch():
    chips = textured_chips(4)
    valid = all_valid(chips)
    valid[:, ::2, ::2] = False
    with pytest.raises(EmbeddingError, match="no fully-valid 3x3 patch"):
        RCFEmbedder(n_features=8).fit(chips, valid)


def test_all_nan_chips():
    chips = np.full((2, 3, 8, 8), np.nan, dtype=np.float32)
    with pytest.raises(EmbeddingError, match="no valid pixel"):
        RCFEmbedder(n_features=8).fit(chips, all_valid(chips))


def test_single_value_patches_are_refused():
    chips = textured_chips(3, bands=1)
    with pytest.raises(EmbeddingError, match="patch_size >= 2"):
        RCFEmbedder(n_features=8, patch_size=1).fit(chips, all_valid(chips))


def test_flat_chips_have_no_texture():
    chips = np.ones((3, 2, 8, 8), dtype=np.float32)
    with pytest.raises(EmbeddingError, match="flat"):
        RCFEmbedder(n_features=8).fit(chips, all_valid(chips))


def test_fewer_patches_than_features_warns_and_samples_with_replacement():
    chips = textured_chips(1, size=5)  # 9 windows of 3x3
    with pytest.warns(RuntimeWarning, match="with replacement"):
        emb = RCFEmbedder(n_features=20).fit(chips, all_valid(chips))
    assert emb.filters_.shape == (20, 3, 3, 3)
    assert len(np.unique(emb.raw_filters_.reshape(20, -1), axis=0)) <= 9
    assert emb.transform(chips, all_valid(chips)).shape == (1, 20)


def test_enough_patches_do_not_warn():
    chips = textured_chips(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RCFEmbedder(n_features=16).fit(chips, all_valid(chips))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_features": 0}, "n_features"),
        ({"patch_size": 2.5}, "patch_size"),
        ({"zca_bias": 0.0}, "zca_bias"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(EmbeddingError, match=message):
        RCFEmbedder(**kwargs)


def test_bad_inputs():
    chips = textured_chips(2)
    with pytest.raises(EmbeddingError, match="not fitted"):
        RCFEmbedder().transform(chips, all_valid(chips))
    with pytest.raises(EmbeddingError, match=r"\[N, C, H, W\]"):
        RCFEmbedder().fit(chips[0], all_valid(chips)[0])
    with pytest.raises(EmbeddingError, match="valid must be"):
        RCFEmbedder().fit(chips, all_valid(chips)[:, :5])


def test_config_round_trips_and_device_resolves():
    emb = RCFEmbedder(
        n_features=12, patch_size=5, seed=4, batch_size=8, n_patch_samples=500,
        zca_bias=0.01, bias=0.2, dtype="float32", branches="both", pool_grid=1, impl="reference",
    )
    config = json.loads(json.dumps(emb.config()))
    assert config == emb.config()
    assert RCFEmbedder(**config).config() == config
    assert emb.device_ == ("cuda" if torch.cuda.is_available() else "cpu")
    assert RCFEmbedder(device="cpu").device_ == "cpu"


def test_integer_chips_like_landsat_dns():
    chips = (textured_chips(6) * 40000 + 7000).astype(np.uint16)
    valid = all_valid(chips)
    as_float = RCFEmbedder(n_features=16).fit_transform(chips.astype(np.float32), valid)
    as_uint16 = RCFEmbedder(n_features=16).fit_transform(chips, valid)
    np.testing.assert_allclose(as_uint16, as_float, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    chips = textured_chips(16)
    valid = all_valid(chips)
    valid[0, 4:9, 4:9] = False
    emb = RCFEmbedder(n_features=64, device="cpu", dtype="float32").fit(chips, valid)
    on_cpu = emb.transform(chips, valid)
    emb.device = "cuda"
    on_cuda = emb.transform(chips, valid)
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-5 * np.abs(on_cpu).max())
