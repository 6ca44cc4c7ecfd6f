"""The fused Triton kernel of the RCF fast path, against the conv2d reference.

Runs on CUDA where Triton is installed (CUDA builds of torch ship it), and on CPU through Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, e.g.
``PYTHONPATH=<dir with triton> TRITON_INTERPRET=1 pytest tests/embed/test_rcf_triton.py``).
Skipped where neither is possible (the CPU-only torch here has no Triton).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eocausal.embed import rcf_triton
from eocausal.embed.rcf import RCFEmbedder, _check_fused_kernel

from tests.embed.test_rcf import all_valid, textured_chips
from tests.embed.test_rcf_fast import bf16_bound

ON_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not rcf_triton.AVAILABLE or not (ON_CUDA or rcf_triton.interpreting()),
    reason="needs Triton with CUDA, or Triton's interpreter (TRITON_INTERPRET=1)",
)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("EOCAUSAL_RCF_FUSED", "auto" if ON_CUDA else "interpret")
    return "cuda" if ON_CUDA else "cpu"


@pytest.mark.parametrize(
    "settings",
    [
        {"n_features": 40},
        {"n_features": 48, "branches": "both", "bias": 0.3, "pool_grid": 2},
        {"n_features": 36, "patch_size": 2, "bias": -0.2, "pool_grid": 3},
    ],
    ids=["plain", "both-bias-grid2", "k2-negbias-grid3"],
)
def test_fused_kernel_matches_reference(fused, settings):
    chips = textured_chips(3, bands=5, size=14, seed=12) * 100
    valid = all_valid(chips)
    valid[0, 3:7, 2:9] = False
    valid[2, :, :3] = False
    emb = RCFEmbedder(device=fused, dtype="bfloat16", **settings).fit(chips, valid)
    reference = RCFEmbedder(**{**emb.config(), "impl": "reference", "device": "cpu"})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_"):
        setattr(reference, attr, getattr(emb, attr))
    want = reference.transform(chips, valid)
    got = emb.transform(chips, valid)
    assert np.isfinite(got).all()
    error = np.abs(got.astype(np.float64) - want)
    assert (error <= bf16_bound(emb, chips, valid) + 1e-6 * np.abs(want).max()).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_kernel_self_check_passes(fused):
    assert _check_fused_kernel(torch.device(fused))


def test_the_kernel_is_what_runs(fused, monkeypatch):
    calls = []
    real = rcf_triton.rcf_pool_sums

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(rcf_triton, "rcf_pool_sums", spy)
    chips = textured_chips(2, bands=3, size=10)
    emb = RCFEmbedder(n_features=16, device=fused, dtype="bfloat16").fit(chips, all_valid(chips))
    emb.transform(chips, all_valid(chips))
    assert calls == [(2, 10, 10, 3)]
    emb.dtype = "float32"  # float32 never uses the kernel (tl.dot would be TF32)
    emb.transform(chips, all_valid(chips))
    assert len(calls) == 1
