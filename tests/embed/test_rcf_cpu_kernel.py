"""The fused AVX2 RCF kernel (eocausal.embed.rcf_cpu): the same features as the conv2d reference
and as the torch fast path, with nodata, NaN pixels, both branches, every filter kind and pooling
layout; and the torch path whenever the kernel cannot be built, loaded or run."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from eocausal.embed import rcf_cpu
from eocausal.embed.rcf import RCFEmbedder

from tests.embed.test_rcf import all_valid, textured_chips

KERNEL = rcf_cpu.kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the fused CPU kernel is not available here")


def chips_with_nodata(bands: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Five chips: all valid, a nodata block, a NaN pixel, random speckle, and one without any
    valid window in the centre (its smallest square is NaN)."""
    chips = textured_chips(5, bands=bands, size=size, seed=seed)
    valid = all_valid(chips)
    valid[1, 2:7, 3:9] = False
    chips[2, bands - 1, size // 2, 1] = np.nan
    rng = np.random.default_rng(seed)
    valid[3] = rng.random((size, size)) > 0.05
    valid[4, size // 2 - 3 : size // 2 + 3, :] = False
    return chips, valid


def reference_of(emb: RCFEmbedder) -> RCFEmbedder:
    ref = RCFEmbedder(**{**emb.config(), "impl": "reference"})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_", "raw_filters_"):
        setattr(ref, attr, getattr(emb, attr))
    return ref


def transform_quiet(emb: RCFEmbedder, chips: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = emb.transform(chips, valid)
    return out, [str(w.message) for w in caught]


SETTINGS = [
    {"n_features": 24},
    {"n_features": 48, "branches": "both", "bias": 0.3},
    {"n_features": 48, "filters": "mixed", "pool_scales": [1.0, 0.5, 0.25]},  # the study default, small
    {"n_features": 96, "filters": "mixed", "pool_scales": [1.0, 0.5, 0.25], "branches": "both", "bias": -0.2},
    {"n_features": 40, "filters": "raw", "pool_scales": [1.0, 0.4], "raw_bias": 0.2, "patch_size": 2},
    {"n_features": 64, "pool_grid": 2, "patch_size": 4, "branches": "both"},
    {"n_features": 150, "pool_grid": 3, "filters": "mixed"},  # 50 filters: a partial 16-filter block
]
IDS = ["plain", "both-bias", "study-default", "mixed-scales-both", "raw-k2", "grid2-k4-both", "grid3-mixed-odd"]


@needs_kernel
@pytest.mark.parametrize("bands,size", [(6, 23), (3, 16), (1, 19)], ids=["6x23", "3x16", "1x19"])
@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_kernel_matches_the_conv2d_reference(settings, bands, size):
    chips, valid = chips_with_nodata(bands, size, seed=bands + size)
    emb = RCFEmbedder(seed=1, device="cpu", dtype="float32", batch_size=3, **settings)
    emb.fit(chips, valid)
    got, got_warnings = transform_quiet(emb, chips, valid)
    assert emb._transform_state[1].cpu_kernel is not None  # it really ran
    want, want_warnings = transform_quiet(reference_of(emb), chips, valid)
    assert got.shape == want.shape == (len(chips), emb.n_features)
    # NaN exactly where the reference has NaN (regions without a valid window), reported alike.
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert got_warnings == want_warnings
    finite = np.isfinite(want)
    assert finite.any() and want[finite].std() > 0
    scale = np.abs(want[finite]).max()
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5 * scale)


@needs_kernel
@pytest.mark.parametrize("settings", SETTINGS[1:4], ids=IDS[1:4])
def test_kernel_matches_the_torch_fast_path(settings, monkeypatch):
    """The kernel and the torch path (kernel turned off) give the same features and the same
    report of chips without a valid window."""
    chips, valid = chips_with_nodata(6, 23, seed=5)
    chips = chips * 10000  # raw DN scale
    emb = RCFEmbedder(seed=2, dtype="float32", batch_size=2, **settings).fit(chips, valid)
    got, got_warnings = transform_quiet(emb, chips, valid)
    assert emb._transform_state[1].cpu_kernel is not None
    torch_path = RCFEmbedder(**emb.config())
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_", "raw_filters_"):
        setattr(torch_path, attr, getattr(emb, attr))
    monkeypatch.setenv("EOCAUSAL_RCF_CPU_KERNEL", "0")
    want, want_warnings = transform_quiet(torch_path, chips, valid)
    assert torch_path._transform_state[1].cpu_kernel is None
    # Chip 4's centre has no valid window: its smallest square is NaN and reported.
    assert got_warnings == want_warnings and len(got_warnings) == ("pool_scales" in settings)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5 * np.abs(want[finite]).max())


@needs_kernel
def test_integer_chips_streams_and_thread_counts_agree():
    chips = (textured_chips(7, bands=4, size=20, seed=3) * 40000).astype(np.uint16)
    valid = all_valid(chips)
    valid[2, :5] = False
    emb = RCFEmbedder(n_features=90, filters="mixed", pool_scales=[1.0, 0.5, 0.25], dtype="float32",
                      batch_size=3).fit(chips, valid)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = emb.transform(chips, valid)
        torch.set_num_threads(3)
        three = emb.transform(chips, valid)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one, three)  # each (chip, filter group) is summed by one thread
    streamed = np.concatenate(list(emb.transform_stream([(chips[:4], valid[:4]), (chips[4:], valid[4:])])))
    np.testing.assert_array_equal(streamed, one)
    want = reference_of(emb).transform(chips, valid)
    np.testing.assert_allclose(one, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


@needs_kernel
def test_kernel_is_only_for_float32_fast_on_cpu():
    chips = textured_chips(3, seed=4)
    valid = all_valid(chips)
    for kwargs, used in (({"dtype": "float32"}, True), ({"dtype": "bfloat16"}, False),
                         ({"dtype": "float32", "impl": "reference"}, False)):
        emb = RCFEmbedder(n_features=16, **kwargs).fit(chips, valid)
        emb.transform(chips, valid)
        assert (emb._transform_state[1].cpu_kernel is not None) is used, kwargs


def fresh_kernel_state(monkeypatch, tmp_path):
    monkeypatch.setattr(rcf_cpu, "_state", {})
    monkeypatch.setenv("EOCAUSAL_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("failure", ["no-compiler", "compile-error", "no-avx2", "disabled"])
def test_unavailable_kernel_falls_back_to_the_torch_path(failure, monkeypatch, tmp_path, caplog):
    fresh_kernel_state(monkeypatch, tmp_path)
    if failure == "no-compiler":
        monkeypatch.setattr(rcf_cpu, "_compiler", lambda: None)
    elif failure == "compile-error":
        monkeypatch.setattr(rcf_cpu, "FLAGS", [*rcf_cpu.FLAGS, "-DRCF_CPU_BROKEN", "-include", "/nonexistent.h"])
    elif failure == "no-avx2":
        def no_avx2(path):
            raise RuntimeError("this CPU lacks AVX2 or FMA")
        monkeypatch.setattr(rcf_cpu, "_Kernel", no_avx2)
    else:
        monkeypatch.setenv("EOCAUSAL_RCF_CPU_KERNEL", "0")
    chips, valid = chips_with_nodata(3, 16, seed=7)
    emb = RCFEmbedder(n_features=48, filters="mixed", pool_scales=[1.0, 0.5], dtype="float32").fit(chips, valid)
    with caplog.at_level(logging.INFO, logger="eocausal.embed.rcf_cpu"):
        got, messages = transform_quiet(emb, chips, valid)  # no warning about the kernel
    assert emb._transform_state[1].cpu_kernel is None
    assert all("kernel" not in m for m in messages)
    if failure != "disabled":
        assert any("not available" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert not list(tmp_path.rglob("*.so")) or failure == "no-avx2"
    want, _ = transform_quiet(reference_of(emb), chips, valid)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5 * np.abs(want[finite]).max())


@needs_kernel
def test_a_failing_kernel_call_falls_back_once(monkeypatch, caplog):
    chips, valid = chips_with_nodata(3, 16, seed=8)
    emb = RCFEmbedder(n_features=32, branches="both", dtype="float32").fit(chips, valid)
    emb.transform(chips[:1], valid[:1])
    state = emb._transform_state[1]

    class Broken:
        normalise_nhwc = state.cpu_kernel.normalise_nhwc

        def pool_sums(self, *args, **kwargs):
            raise RuntimeError("rcf_cpu_pool_sums failed (-3)")

    state.cpu_kernel = Broken()
    with caplog.at_level(logging.INFO, logger="eocausal.embed.rcf"):
        got, _ = transform_quiet(emb, chips, valid)
    assert state.cpu_kernel is None
    assert any("failed" in r.getMessage() for r in caplog.records)
    want, _ = transform_quiet(reference_of(emb), chips, valid)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5 * np.abs(want[finite]).max())


@needs_kernel
def test_build_is_cached_and_the_command_line_never_fails(monkeypatch, tmp_path, capsys):
    fresh_kernel_state(monkeypatch, tmp_path)
    assert rcf_cpu.main() == 0
    built = list(tmp_path.rglob("librcf_cpu.so"))
    assert len(built) == 1 and "built and checked" in capsys.readouterr().out
    mtime = built[0].stat().st_mtime_ns
    assert rcf_cpu.build() == built[0] and built[0].stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setattr(rcf_cpu, "_state", {})
    monkeypatch.setattr(rcf_cpu, "_compiler", lambda: None)
    assert rcf_cpu.main() == 0 and "not available" in capsys.readouterr().out


@needs_kernel
def test_kernel_rejects_inconsistent_position_lists():
    xh = torch.zeros(2, 5, 5, 1)
    packed, shift = rcf_cpu.pack(torch.ones(3, 9), None)
    offset = np.zeros(4, np.int32)
    with pytest.raises(ValueError):
        KERNEL.pool_sums(xh, packed, shift, offset, np.zeros(4, np.int32), np.array([0, 2, 3]), 1, 3, False, 1)
    with pytest.raises(ValueError):
        KERNEL.pool_sums(xh, packed, shift, offset, np.full(4, 1, np.int32), np.array([0, 2, 4]), 1, 3, False, 1)


@pytest.mark.parametrize("rows", [64, 1000], ids=["uneven-tiles", "all-chips"])
def test_torch_fp32_path_still_matches_the_reference(rows, monkeypatch):
    """With the kernel off, the torch float32 path (the fallback) keeps matching the reference."""
    import eocausal.embed.rcf as rcf

    monkeypatch.setenv("EOCAUSAL_RCF_CPU_KERNEL", "0")
    chips, valid = chips_with_nodata(3, 20, seed=9)
    emb = RCFEmbedder(n_features=72, dtype="float32", batch_size=5, bias=0.2, branches="both",
                      filters="mixed", pool_scales=[1.0, 0.5, 0.25]).fit(chips, valid)
    monkeypatch.setattr(rcf, "_CPU_MIN_MACS_PER_MULTIPLY", 0)
    monkeypatch.setattr(rcf, "cpu_cache_bytes", lambda: rows * emb.n_filters * 4)
    got, _ = transform_quiet(emb, chips, valid)
    assert emb._transform_state[1].cpu_kernel is None
    want, _ = transform_quiet(reference_of(emb), chips, valid)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5 * np.abs(want[finite]).max())
