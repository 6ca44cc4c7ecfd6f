"""The fast RCF path (im2col x filters as a matrix multiply, fused ReLU, pooled sums) against the
plain conv2d reference, in float32 and bfloat16, and the settings it adds (branches, pool grid,
dtype, streaming)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eocausal.embed import EmbeddingError
from eocausal.embed.rcf import RCFEmbedder

from tests.embed.test_rcf import all_valid, normalise, textured_chips

# bf16 unit roundoff: a bf16 number is within 2**-9 (relative) of the float32 it was rounded from.
BF16_U = 2.0**-9


def masked_cases():
    """(name, chips, valid) of several shapes, with and without nodata."""
    cases = []
    chips = textured_chips(5, bands=3, size=16, seed=1)
    cases.append(("3x16 all valid", chips, all_valid(chips)))
    chips = textured_chips(4, bands=6, size=21, seed=2)
    valid = all_valid(chips)
    valid[0, 5:11, 3:9] = False
    valid[2, :, :4] = False
    cases.append(("6x21 nodata", chips, valid))
    chips = textured_chips(3, bands=1, size=12, seed=3)
    valid = all_valid(chips)
    valid[1, 0, 0] = False
    cases.append(("1x12 one bad pixel", chips, valid))
    return cases


def bf16_bound(emb: RCFEmbedder, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-feature worst-case error of the bf16 path, from the same masked pooling of
    2u * (|w| . |x|) + 2u * |z - bias| + u * |bias|: both inputs rounded to bf16, the activation
    rounded once and its per-tile sum once more, the bias rounded; float32 accumulation."""
    x = normalise(emb, chips.astype(np.float64))
    x = np.where(valid[:, None], x, 0.0)
    xt = torch.from_numpy(x.astype(np.float32))
    w = torch.from_numpy(emb.filters_)
    z = F.conv2d(xt, w)
    slack = 2 * BF16_U * F.conv2d(xt.abs(), w.abs()) + 2 * BF16_U * (z - emb.bias).abs() + BF16_U * abs(emb.bias)
    k = emb.patch_size
    field = F.max_pool2d((~torch.from_numpy(valid)).float().unsqueeze(1), k, stride=1) == 0
    field = field.float()
    slack = slack * field
    h, w_ = field.shape[2:]
    g = emb.pool_grid
    rows = np.linspace(0, h, g + 1).round().astype(int)
    cols = np.linspace(0, w_, g + 1).round().astype(int)
    per_cell = []
    for a in range(g):
        for b in range(g):
            s = slack[:, :, rows[a] : rows[a + 1], cols[b] : cols[b + 1]].sum((2, 3))
            n = field[:, :, rows[a] : rows[a + 1], cols[b] : cols[b + 1]].sum((2, 3))
            per_cell.append(s / n)
    bound = torch.stack(per_cell, 1)  # [N, cells, F]
    branches = 2 if emb.branches == "both" else 1
    # The negative branch adds the mean-z term, bounded by the same input rounding: twice the slack.
    bound = torch.stack([bound] + [2 * bound] * (branches - 1), 1)
    return bound.reshape(len(chips), -1).numpy()


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize(
    "settings",
    [
        {"n_features": 24},
        {"n_features": 48, "branches": "both", "bias": 0.3},
        {"n_features": 64, "pool_grid": 2, "patch_size": 2},
        {"n_features": 72, "pool_grid": 3, "branches": "both", "bias": -0.2, "patch_size": 4},
    ],
    ids=["plain", "both+bias", "grid2-k2", "grid3-both-negbias-k4"],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_path_matches_conv2d_reference(case, settings, dtype):
    name, chips, valid = masked_cases()[case]
    fast = RCFEmbedder(seed=case, device="cpu", dtype=dtype, batch_size=3, **settings)
    fast.fit(chips, valid)
    reference = RCFEmbedder(**{**fast.config(), "impl": "reference"})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_"):
        setattr(reference, attr, getattr(fast, attr))
    want = reference.transform(chips, valid)
    got = fast.transform(chips, valid)
    assert got.shape == want.shape == (len(chips), settings["n_features"])
    assert np.isfinite(want).all() and want.std() > 0
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    else:
        error = np.abs(got.astype(np.float64) - want)
        bound = bf16_bound(fast, chips, valid)
        assert (error <= bound + 1e-6 * np.abs(want).max()).all(), (name, (error / bound).max())
        relative = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert relative < 1e-2, relative
        assert not np.array_equal(got, want)  # it really ran in bf16


def test_bf16_error_at_the_product_shape():
    """6-band 64 px chips, many filters: the relative error of the pooled features is ~1e-3."""
    chips = textured_chips(3, bands=6, size=64, seed=9) * 20000
    valid = all_valid(chips)
    fast = RCFEmbedder(n_features=256, dtype="bfloat16", batch_size=2).fit(chips, valid)
    reference = RCFEmbedder(**{**fast.config(), "impl": "reference"})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_"):
        setattr(reference, attr, getattr(fast, attr))
    want, got = reference.transform(chips, valid), fast.transform(chips, valid)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-3
    assert (np.abs(got - want) <= bf16_bound(fast, chips, valid)).all()


def test_negative_branch_is_relu_of_minus_z():
    chips = textured_chips(4, seed=4)
    valid = all_valid(chips)
    valid[1, 2:6, 2:6] = False
    emb = RCFEmbedder(n_features=16, branches="both", bias=0.25, dtype="float32").fit(chips, valid)
    features = emb.transform(chips, valid)
    pos, neg = features[:, :8], features[:, 8:]
    x = torch.from_numpy(np.where(valid[:, None], normalise(emb, chips), 0).astype(np.float32))
    z = F.conv2d(x, torch.from_numpy(emb.filters_)) - 0.25
    field = (F.max_pool2d((~torch.from_numpy(valid)).float().unsqueeze(1), 3, stride=1) == 0).float()
    manual_pos = (F.relu(z) * field).sum((2, 3)) / field.sum((2, 3))
    manual_neg = (F.relu(-z) * field).sum((2, 3)) / field.sum((2, 3))
    np.testing.assert_allclose(pos, manual_pos.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(neg, manual_neg.numpy(), rtol=1e-4, atol=1e-5)


def test_pool_grid_cells_are_means_over_quadrants():
    chips = textured_chips(3, size=18, seed=5)  # 16 x 16 output positions -> 8 x 8 quadrants
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=4 * 8, pool_grid=2, dtype="float32").fit(chips, valid)
    features = emb.transform(chips, valid).reshape(3, 4, 8)
    x = torch.from_numpy(normalise(emb, chips).astype(np.float32))
    act = F.relu(F.conv2d(x, torch.from_numpy(emb.filters_)))
    quadrants = [act[:, :, :8, :8], act[:, :, :8, 8:], act[:, :, 8:, :8], act[:, :, 8:, 8:]]
    for cell, block in enumerate(quadrants):
        np.testing.assert_allclose(features[:, cell], block.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def test_stream_equals_transform_and_warns_once_with_global_indexes():
    chips = textured_chips(10, seed=6)
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=16, batch_size=4).fit(chips, valid)
    blank = valid.copy()
    blank[[3, 8], :, ::2] = False  # no fully-valid window in chips 3 and 8
    with pytest.warns(RuntimeWarning, match=r"2 chip\(s\).*indexes 3, 8") as caught:
        whole = emb.transform(chips, blank)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    batches = [(chips[:3], blank[:3]), (chips[3:4], blank[3:4]), (chips[4:], blank[4:])]
    with pytest.warns(RuntimeWarning, match=r"2 chip\(s\).*indexes 3, 8"):
        streamed = list(emb.transform_stream(iter(batches)))
    assert [len(b) for b in streamed] == [3, 1, 6]
    np.testing.assert_array_equal(np.concatenate(streamed), whole)
    assert np.isnan(whole[[3, 8]]).all() and np.isfinite(np.delete(whole, [3, 8], 0)).all()


def test_bf16_is_deterministic_and_thread_count_does_not_matter():
    chips = textured_chips(6, bands=6, size=24, seed=7)
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=64, dtype="bfloat16").fit(chips, valid)
    first = emb.transform(chips, valid)
    np.testing.assert_array_equal(emb.transform(chips, valid), first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = emb.transform(chips, valid)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(one_thread, first, rtol=1e-2, atol=1e-3 * np.abs(first).max())


def test_dtype_and_device_resolution():
    assert RCFEmbedder(dtype="float32").dtype_ == "float32"
    assert RCFEmbedder(dtype="bfloat16").dtype_ == "bfloat16"
    assert RCFEmbedder(dtype="bfloat16", impl="reference").dtype_ == "float32"
    assert RCFEmbedder(dtype="auto", device="cpu").dtype_ in ("float32", "bfloat16")
    with pytest.raises(EmbeddingError, match="dtype 'float16'"):
        RCFEmbedder(dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(EmbeddingError, match="CUDA is not available"):
            RCFEmbedder(device="cuda")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_features": 10, "branches": "both", "pool_grid": 2}, "multiple of 8"),
        ({"branches": "negative"}, "branches"),
        ({"impl": "triton"}, "impl"),
        ({"pool_grid": 0}, "pool_grid"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(EmbeddingError, match=message):
        RCFEmbedder(**kwargs)


def test_pool_grid_finer_than_the_output_is_refused():
    chips = textured_chips(2, size=6)  # 4 x 4 output positions
    with pytest.raises(EmbeddingError, match="pool_grid 5"):
        RCFEmbedder(n_features=25, pool_grid=5).fit(chips, all_valid(chips))


def test_mkldnn_fallback_gives_the_same_features(monkeypatch):
    import eocausal.embed.rcf as rcf

    chips = textured_chips(4, seed=8)
    valid = all_valid(chips)
    valid[0, :3] = False
    emb = RCFEmbedder(n_features=32, bias=0.1, dtype="float32").fit(chips, valid)
    fused = emb.transform(chips, valid)
    monkeypatch.setattr(rcf, "_MKLDNN_RELU_LINEAR", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = emb.transform(chips, valid)
    np.testing.assert_allclose(plain, fused, rtol=1e-5, atol=1e-6)


def test_refit_and_pickling_do_not_reuse_stale_device_state():
    import pickle

    chips = textured_chips(4, seed=13)
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=16, dtype="float32").fit(chips, valid)
    first = emb.transform(chips, valid)
    restored = pickle.loads(pickle.dumps(emb))
    assert "_transform_state" not in restored.__dict__
    np.testing.assert_array_equal(restored.transform(chips, valid), first)
    emb.seed = 1
    emb.fit(chips, valid)  # new filters: the cached device state must not be used
    assert not np.allclose(emb.transform(chips, valid), first)
    emb.bias = 0.5  # a changed setting is seen too
    shifted = emb.transform(chips, valid)
    emb.bias = 0.0
    assert not np.allclose(shifted, emb.transform(chips, valid))


@pytest.mark.parametrize("rows", [64, 100, 200, 1000], ids=["uneven-tiles", "one-chip", "two-chips", "all-chips"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiling_matches_the_reference(monkeypatch, rows, dtype):
    """Multiplies of any size (several tiles per chip, uneven last tiles, several chips per
    multiply) give the reference features, with nodata, NaN pixels and the all-valid shortcut."""
    import eocausal.embed.rcf as rcf

    chips = textured_chips(5, bands=3, size=20, seed=21)  # 2 x 2 cells of 9 x 9 = 81 positions
    valid = all_valid(chips)
    emb = RCFEmbedder(n_features=40, dtype=dtype, batch_size=5, bias=0.2, branches="both", pool_grid=2).fit(chips, valid)
    reference = RCFEmbedder(**{**emb.config(), "impl": "reference"})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_"):
        setattr(reference, attr, getattr(emb, attr))
    row_bytes = emb.n_filters * (2 if dtype == "bfloat16" else 4)
    monkeypatch.setattr(rcf, "_CPU_MIN_MACS_PER_MULTIPLY", 0)
    monkeypatch.setattr(rcf, "cpu_cache_bytes", lambda: rows * row_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        holes = valid.copy()
        holes[1, 2:5, 3:7] = False
        holes[4, 12:, :] = False
        nan_chips = chips.copy()
        nan_chips[3, 1, 6, 6] = np.nan
        for c, v in ((chips, valid), (chips, holes), (nan_chips, valid)):
            want = reference.transform(c, v)
            got = emb.transform(c, v)
            assert emb._transform_state[1].rows_per_multiply() == max(64, rows)
            if dtype == "float32":
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
            else:
                v_eff = v & np.isfinite(c).all(1)
                error = np.abs(got.astype(np.float64) - want)
                bound = bf16_bound(emb, np.nan_to_num(c), v_eff)
                assert (error <= bound + 1e-6 * np.abs(want).max()).all(), (error / bound).max()
    finally:
        torch.set_num_threads(threads)
