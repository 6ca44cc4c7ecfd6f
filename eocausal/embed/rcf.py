"""Random convolutional features (MOSAIKS; Rolf et al. 2021, Nat. Commun. 12:4392).

The algorithm follows the paper's reference code (``mosaiks-paper/code/mosaiks/featurization.py``):

fit
    1. Per-band normalisation statistics (median, IQR) from *valid* pixels only, so that raw
       Landsat DNs, reflectance in [0, 1], or any other scale give the same normalised chips.
    2. Random ``patch_size x patch_size x C`` patches of the normalised chips, drawn (seeded)
       only where the whole patch is valid. Each patch is mean-centred and scaled to unit L2 norm;
       the patch covariance gives a ZCA whitening matrix ``Z = V diag((E + zca_bias)^-1/2) V^T``.
    3. ``n_filters`` of the patches become the filters ``w = p Z Z^T``, exactly as the paper code
       does. Since ``Z`` is symmetric, ``w . x = (Z p) . (Z x)``: correlating *unwhitened* chips
       with these filters equals correlating whitened chips with whitened patches, which is what
       Coates & Ng's features are defined on, without ever whitening the chips themselves.

transform
    Normalise, zero the invalid pixels, correlate with the filters (no padding), ``relu(z - bias)``,
    and average over the output positions whose whole receptive field is valid, so nodata never
    leaks into a feature. ``pool_grid = g`` averages over each cell of a g x g grid of the output
    positions instead of the whole chip (MOSAIKS' ``pool_size`` smaller than the image).

    ``branches = "both"`` adds the paper's negative branch ``relu(-(z - bias))``. Because
    ``relu(u) - relu(-u) = u``, its pooled value is ``pos - (w . mean_patch - bias)``: it is computed
    from the positive branch and the mean patch, never by a second pass over the activations. It
    adds at most ``C * patch_size**2`` new linear directions (the paper's 8,192 features have rank
    <= 4,096 + 27), but it does let linear models see each band's mean level, which mean-centred
    filters alone see only through contrast. At ``bias = 0`` it is exactly the paper's
    ``relu(-z)``; for ``bias != 0`` it is torchgeo's convention (``relu(-(z + b))`` with b = -bias).

Two implementations compute the same pooled features:

- ``impl="fast"`` (default): im2col patches in the compute dtype, ``patches @ filters.T`` as one
  matrix multiply per tile of positions with the ReLU fused into it (oneDNN post-op on CPU), summed
  over positions with float32 accumulation. Tiles are sized on CPU so that each multiply is large
  next to its fixed call cost while its activations stay within a few MiB (L2 to L3), and to a
  bounded slice of device memory on CUDA; nothing of the size of all the activations is ever held.
  With ``dtype = bfloat16`` the multiply runs on bf16 matrix units (AVX512-BF16/AMX, tensor cores)
  with float32 accumulation.
  In float32 on a CPU with AVX2 and FMA (``dtype`` auto there), a fused kernel compiled from
  source (``rcf_cpu``) does the same per chip without an im2col matrix or activations in memory:
  each valid position's patch times every filter, the bias and ReLU, added straight to its pooling
  rectangle's sums. Without a compiler or those CPU features it is not used (logged at INFO).
- ``impl="reference"``: a plain float32 ``torch.nn.functional.conv2d``, ``relu`` and masked mean,
  both branches computed explicitly. Slow and simple: the fast path is tested against it.

Filters and pooling (``filters``, ``pool_scales``; RCF algorithm 3)
    Whitened, mean-centred filters see texture but see absolute levels and low-frequency
    land-cover shares (bright or bare land, water, vegetation cover) poorly, and those are what
    real confounders often are. ``filters="mixed"`` (the study default, ``EmbeddingSpec``) makes half of the
    filters as above and the other half *level* filters: band-normalised patches that are neither
    whitened nor mean-centred, scaled to unit L2 norm, each used as ``+w`` and ``-w`` with the ReLU
    threshold ``raw_bias`` (``relu(w . x - b)``, ``relu(-w . x - b)``): soft indicators of
    "this pixel's spectrum lies beyond b along w", whose pooled means are soft land-cover
    shares. ``filters="whitened"`` (this class's default) is the paper's filter bank alone.

    ``pool_scales`` averages every filter over nested, centred squares of the output positions
    whose sides are these fractions of the chip's (study default 1, 1/2, 1/4; class default 1): a linear model on the
    three means approximates a share within any radius up to the chip's half-width, which the
    whole-chip mean alone dilutes when the confounder's footprint is smaller than the chip (a
    user never knows that footprint). The squares are summed from disjoint rectangles (the inner
    square and the rings around it), so the multiply runs once per position as before.
    The confounder zoo (``eocausal.zoo``) is the evidence for both defaults.

One consequence of mean-centred filters worth knowing: the positive features do not see a shift of
all bands by the same (normalised) amount; brightness reaches them through contrast (texture
scales with brightness in reflectance data) and through differences between bands.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from eocausal.embed import EmbeddingError, rcf_cpu, rcf_triton
from eocausal.embed.devices import (
    HostStaging,
    cpu_cache_bytes,
    cuda_batch_chips,
    dtype_name,
    ieee_float32,
    resolve_device,
    resolve_dtype,
)

__all__ = ["EmbeddingError", "RCFEmbedder", "RCF_ALGORITHM_VERSION"]

log = logging.getLogger(__name__)

# Bump when a change alters the features for the same config: it belongs in embedding cache keys.
RCF_ALGORITHM_VERSION = "3"  # 3: level filters (filters="mixed") and nested pooling scales

BRANCHES = ("positive", "both")
FILTERS = ("whitened", "raw", "mixed")
# Nested centred squares the features are averaged over, as fractions of the chip's side.
DEFAULT_POOL_SCALES = (1.0, 0.5, 0.25)
# ReLU threshold of the level filters (unit-norm, band-normalised patches): pixels must lie this
# far along the filter's direction to count, so +w and -w see different pixels.
DEFAULT_RAW_BIAS = 0.5
# A band-normalised patch with a smaller L2 norm (every value at its band median) cannot be
# scaled to unit norm; it is not used as a level filter.
_ZERO_PATCH_NORM = 1e-6
IMPLEMENTATIONS = ("fast", "reference")

# Band statistics come from at most this many valid pixels (a seeded sample): plenty for a median
# and an IQR, and bounded in time and memory however many chips there are.
_MAX_STAT_PIXELS = 1 << 20
# A normalised patch with a smaller L2 norm is flat (constant in every band). It carries no texture
# and would become an all-zero filter, i.e. a constant feature, so it is not used.
_FLAT_PATCH_NORM = 1e-6
# Chips per block while building masks and sampling in fit; patches per block while normalising.
_CHIP_BLOCK = 1024
_PATCH_BLOCK = 16384
# Reference path: upper bound for one chunk of conv activations (chips x filters x positions x 4 B).
_REFERENCE_ACTIVATION_BYTES = {"cpu": 4 << 20, "cuda": 1 << 30}
# Fast path on CUDA: activations of one matrix multiply (rows x filters x dtype size). Large enough
# to fill an H100-class device, small next to its memory.
_CUDA_ACTIVATION_BYTES = 512 << 20
# Fast path on CPU: multiply-adds per matrix multiply, at least. Each oneDNN call costs ~20 us
# however small (primitive lookup and setup), ~40 rows' worth of a 54 x 1024 bf16 multiply on a
# Zen 4 core. Tiles of 512 rows (1 MiB of bf16 activations, the L2) paid 5-10 % for it; tiles of
# ~1,000-2,000 rows, whose activations are summed partly from L3 (the bf16 sum runs at the same
# speed from either), measured ~10 % more chips/s overall. 64 Mi MACs: ~1,200 rows at 54 x 1,024.
_CPU_MIN_MACS_PER_MULTIPLY = 64 << 20
# ... but the activations of one multiply (per thread) stay within this (small patches, e.g. one band
# with patch_size 2, would otherwise ask for tens of MiB).
_CPU_MAX_ACTIVATION_BYTES = 8 << 20


def _check_chips(chips: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and types; chips keep their dtype (converted to float32 a block at a time)."""
    chips = np.asarray(chips)
    if chips.ndim != 4:
        raise EmbeddingError(f"chips must be a [N, C, H, W] array, got shape {chips.shape}")
    if not (np.issubdtype(chips.dtype, np.floating) or np.issubdtype(chips.dtype, np.integer)):
        raise EmbeddingError(f"chips must hold numbers, got dtype {chips.dtype}")
    if chips.shape[0] == 0:
        raise EmbeddingError("no chips given (N = 0)")
    valid = np.asarray(valid)
    n, _, h, w = chips.shape
    if valid.shape != (n, h, w):
        raise EmbeddingError(
            f"valid must be a [N, H, W] mask matching chips {chips.shape}, got shape {valid.shape}"
        )
    if valid.dtype != np.bool_ and not np.issubdtype(valid.dtype, np.integer):
        raise EmbeddingError(f"valid must be a boolean mask, got dtype {valid.dtype}")
    # Contiguous bool, so blocks of it can be handed to torch without copies or stride surprises.
    valid = np.ascontiguousarray(valid, dtype=bool)
    return chips, valid


def _finite_valid(chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``valid`` with every pixel that is NaN/inf in any band switched off."""
    if not np.issubdtype(chips.dtype, np.floating):
        return valid
    valid = valid.copy()
    for start in range(0, len(chips), _CHIP_BLOCK):
        stop = start + _CHIP_BLOCK
        valid[start:stop] &= np.isfinite(chips[start:stop]).all(axis=1)
    return valid


def _receptive_field_valid(valid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, H, W] pixel mask -> [B, H-k+1, W-k+1] mask of windows lying wholly on valid pixels."""
    invalid = (~valid).unsqueeze(1).to(torch.float32)
    return F.max_pool2d(invalid, patch_size, stride=1).squeeze(1) == 0


def _sample_true(mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of ``size`` True entries of ``mask``, uniform without replacement.

    Ranks are drawn among the True entries and resolved one block of rows at a time, so the
    full list of True positions (hundreds of MB for a large study) is never built.
    """
    rows = mask.reshape(mask.shape[0], -1)
    per_row = rows.sum(axis=1, dtype=np.int64)
    total = int(per_row.sum())
    if size >= total:
        return np.flatnonzero(rows)
    ranks = np.sort(rng.choice(total, size=size, replace=False))
    ends = np.cumsum(per_row)
    out = np.empty(size, dtype=np.int64)
    for start in range(0, rows.shape[0], _CHIP_BLOCK):
        stop = min(start + _CHIP_BLOCK, rows.shape[0])
        lo = int(ends[start - 1]) if start else 0
        hi = int(ends[stop - 1])
        a, b = np.searchsorted(ranks, [lo, hi])
        if a == b:
            continue
        block_positions = np.flatnonzero(rows[start:stop])
        out[a:b] = block_positions[ranks[a:b] - lo] + start * rows.shape[1]
    return out


def _band_statistics(
    chips: np.ndarray, valid: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band median and spread (IQR; std if the IQR is 0; 1 if the band is constant)."""
    picked = _sample_true(valid, _MAX_STAT_PIXELS, rng)
    n_idx, i_idx, j_idx = np.unravel_index(picked, valid.shape)
    values = chips[n_idx, :, i_idx, j_idx].astype(np.float64)  # [M, C]
    q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
    iqr = q75 - q25
    std = values.std(axis=0)
    # A band that is mostly one value (water, saturation) has IQR 0; its std still sets the scale.
    spread = np.where(iqr > 0, iqr, np.where(std > 0, std, 1.0))
    return median, spread


def _band_normalised(
    windows: np.ndarray, where: tuple[np.ndarray, np.ndarray, np.ndarray], center: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Patches at (chip, row, col) as float64 rows [M, C*k*k], each band (value - center) / scale."""
    n_idx, i_idx, j_idx = where
    patches = windows[n_idx, :, i_idx, j_idx].astype(np.float64)  # [M, C, k, k]
    patches = (patches - center[:, None, None]) / scale[:, None, None]
    return patches.reshape(len(patches), -1)


def _normalized_patches(
    windows: np.ndarray,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches at (chip, row, col), band-normalised, mean-centred, unit L2 norm: ([M, d], flat)."""
    patches = _band_normalised(windows, where, center, scale)
    patches -= patches.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(patches, axis=1)
    flat = norms < _FLAT_PATCH_NORM
    patches[~flat] /= norms[~flat, None]
    patches[flat] = 0.0
    return patches, flat


def pool_layout(
    n_rows: int, n_cols: int, grid: int = 1, scales: tuple[float, ...] = (1.0,)
) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """Where features are pooled: disjoint rectangles of the output positions, and a 0/1
    [rectangles, outputs] matrix saying which rectangles make up each output's region.

    ``scales == (1.0,)``: the ``grid x grid`` cells, one output each. Otherwise (``grid`` 1):
    nested centred squares with sides ``scales`` of the field's, built from the innermost square
    and the rings around it (each ring as up to four rectangles), so that every position is
    multiplied once however many squares contain it.
    """
    if tuple(scales) == (1.0,):
        cells = _grid_cells(n_rows, n_cols, grid)
        return cells, np.eye(len(cells), dtype=np.float32)
    if grid != 1:
        raise EmbeddingError("pool_grid and pool_scales cannot be combined: use one of them")

    def square(scale: float) -> tuple[int, int, int, int]:
        h = max(1, int(round(n_rows * scale)))
        w = max(1, int(round(n_cols * scale)))
        r0, c0 = (n_rows - h) // 2, (n_cols - w) // 2
        return r0, r0 + h, c0, c0 + w

    squares = [square(s) for s in scales]
    cells: list[tuple[int, int, int, int]] = []
    owner: list[int] = []  # index of the smallest square holding each rectangle
    for j, (r0, r1, c0, c1) in enumerate(squares):
        if j + 1 == len(squares):
            parts = [(r0, r1, c0, c1)]
        else:
            i0, i1, j0, j1 = squares[j + 1]
            parts = [(r0, i0, c0, c1), (i1, r1, c0, c1), (i0, i1, c0, j0), (i0, i1, j1, c1)]
        for part in parts:
            if part[1] > part[0] and part[3] > part[2]:
                cells.append(part)
                owner.append(j)
    groups = np.zeros((len(cells), len(squares)), dtype=np.float32)
    for c, j in enumerate(owner):
        groups[c, : j + 1] = 1.0  # a rectangle of ring j lies in squares 0..j
    return cells, groups


def _level_filters(
    windows: np.ndarray,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: np.ndarray,
    scale: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` level filters [n, d]: band-normalised patches of the sampled valid windows, not
    mean-centred and not whitened, at unit L2 norm (patches at the band medians are skipped)."""
    if n == 0:
        return np.zeros((0, windows.shape[1] * windows.shape[-1] * windows.shape[-2]))
    order = rng.permutation(len(where[0]))
    out = []
    for start in range(0, len(order), max(4 * n, 1024)):
        pick = order[start : start + max(4 * n, 1024)]
        patches = _band_normalised(windows, tuple(ix[pick] for ix in where), center, scale)
        norms = np.linalg.norm(patches, axis=1)
        keep = norms > _ZERO_PATCH_NORM
        out.append(patches[keep] / norms[keep, None])
        if sum(len(o) for o in out) >= n:
            break
    levels = np.concatenate(out)
    if len(levels) < n:
        raise EmbeddingError(
            f"only {len(levels)} sampled patches differ from the band medians, for {n} level filters"
        )
    return levels[:n]


def _zca_matrix(covariance: np.ndarray, zca_bias: float) -> np.ndarray:
    """ZCA whitening matrix V diag((E + eps)^-1/2) V^T of a patch covariance."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # rounding can leave tiny negatives
    return (eigenvectors * (eigenvalues + zca_bias) ** -0.5) @ eigenvectors.T


def _grid_cells(n_rows: int, n_cols: int, grid: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of the cells of a grid x grid split of the output positions."""
    rows = np.linspace(0, n_rows, grid + 1).round().astype(int)
    cols = np.linspace(0, n_cols, grid + 1).round().astype(int)
    return [
        (int(rows[a]), int(rows[a + 1]), int(cols[b]), int(cols[b + 1]))
        for a in range(grid)
        for b in range(grid)
    ]


_MKLDNN_RELU_LINEAR = hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _relu_linear(
    patches: torch.Tensor, weights: torch.Tensor, shift: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """relu(patches @ weights.T + shift), [M, D] x [F, D] -> [M, F], in the inputs' dtype with
    float32 accumulation. On CPU the ReLU is a oneDNN post-op of the multiply, so the activations
    are written once and never re-read before pooling; ``packed`` is ``weights`` already reordered
    into oneDNN's blocked layout (saves a reorder per call)."""
    global _MKLDNN_RELU_LINEAR
    if patches.device.type == "cpu" and _MKLDNN_RELU_LINEAR:
        try:
            return torch.ops.mkldnn._linear_pointwise(
                patches, packed if packed is not None else weights, shift, "relu", [], ""
            )
        except (RuntimeError, NotImplementedError):  # a build without the fused op: plain path
            _MKLDNN_RELU_LINEAR = False
    return F.linear(patches, weights, shift).relu_()


def _pack_for_onednn(weights: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The filter matrix in oneDNN's blocked layout for multiplies of about ``rows`` rows, or None
    where this torch build cannot (the plain matrix then works, a little slower)."""
    if weights.device.type != "cpu" or not _MKLDNN_RELU_LINEAR:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weights, rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class RCFEmbedder:
    """Random convolutional features (MOSAIKS-style) with a scikit-learn-like API.

    ``fit`` learns the band statistics and filters from chips (float [N, C, H, W], raw values of
    any scale) and their valid-pixel mask (bool [N, H, W]); ``transform`` returns float32
    [N, n_features]; ``transform_stream`` does the same for an iterable of (chips, valid) batches,
    so chips that do not fit in memory stream through. Learned state ends in ``_``:
    ``band_center_``, ``band_scale_``, ``raw_filters_`` (normalised patches before whitening),
    ``zca_``, ``filters_`` (conv weights). NaN/inf pixels count as invalid.

    ``n_features`` is the output width: ``n_filters * pool_grid**2`` for ``branches="positive"``,
    twice that for ``"both"``. Feature columns are ordered (branch, grid cell, filter).
    """

    def __init__(
        self,
        n_features: int = 1024,
        patch_size: int = 3,
        seed: int = 0,
        device: str = "auto",
        batch_size: int = 64,
        n_patch_samples: int = 100_000,
        zca_bias: float = 1e-3,
        bias: float = 0.0,
        dtype: str = "auto",
        branches: str = "positive",
        pool_grid: int = 1,
        impl: str = "fast",
        filters: str = "whitened",
        raw_bias: float = DEFAULT_RAW_BIAS,
        pool_scales: tuple[float, ...] | list[float] = (1.0,),
    ) -> None:
        for name, value in (
            ("n_features", n_features),
            ("patch_size", patch_size),
            ("batch_size", batch_size),
            ("n_patch_samples", n_patch_samples),
            ("pool_grid", pool_grid),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EmbeddingError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(zca_bias, numbers.Real) and math.isfinite(zca_bias) and zca_bias > 0):
            raise EmbeddingError(f"zca_bias must be a finite number > 0, got {zca_bias!r}")
        if not (isinstance(bias, numbers.Real) and math.isfinite(bias)):
            raise EmbeddingError(f"bias must be a finite number, got {bias!r}")
        if branches not in BRANCHES:
            raise EmbeddingError(f"branches must be one of {BRANCHES}, got {branches!r}")
        if impl not in IMPLEMENTATIONS:
            raise EmbeddingError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        if filters not in FILTERS:
            raise EmbeddingError(f"filters must be one of {FILTERS}, got {filters!r}")
        if not (isinstance(raw_bias, numbers.Real) and math.isfinite(raw_bias)):
            raise EmbeddingError(f"raw_bias must be a finite number, got {raw_bias!r}")
        scales = tuple(float(x) for x in pool_scales)
        if (not scales or scales[0] != 1.0 or any(not 0 < x <= 1 for x in scales)
                or any(a <= b for a, b in zip(scales, scales[1:]))):
            raise EmbeddingError(
                f"pool_scales must start at 1.0 and decrease strictly within (0, 1], got {list(pool_scales)}"
            )
        if int(pool_grid) != 1 and scales != (1.0,):
            raise EmbeddingError("pool_grid and pool_scales cannot be combined: set pool_scales [1.0] "
                                 "for a grid, or pool_grid 1 for nested scales")
        outputs = int(pool_grid) ** 2 if scales == (1.0,) else len(scales)
        per_filter = (2 if branches == "both" else 1) * outputs
        minimum = per_filter * (2 if filters == "raw" else 1)
        if filters == "whitened" and scales == (1.0,):
            # The paper's layout: the width is exactly n_features, or an error.
            if n_features % per_filter:
                raise EmbeddingError(
                    f"n_features={n_features} must be a multiple of {per_filter} (branches={branches!r} "
                    f"x pool_grid {pool_grid}x{pool_grid} cells): each filter gives {per_filter} features"
                )
        elif n_features < minimum:
            raise EmbeddingError(f"n_features={n_features} is below {minimum}, the width of one filter's "
                                 f"features (filters={filters!r}, {outputs} pooling region(s), branches={branches!r})")
        else:
            # Level filters and pooling scales: the width is n_features rounded down to a whole
            # number of filters (1,024 -> 1,023 at 3 scales), so study files written for the
            # paper's layout keep working.
            n_features = (int(n_features) // per_filter) * per_filter
        self.n_features = int(n_features)
        self.patch_size = int(patch_size)
        self.seed = int(seed)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.n_patch_samples = int(n_patch_samples)
        self.zca_bias = float(zca_bias)
        self.bias = float(bias)
        self.dtype = str(dtype)
        self.branches = str(branches)
        self.pool_grid = int(pool_grid)
        self.impl = str(impl)
        self.filters = str(filters)
        self.raw_bias = float(raw_bias)
        self.pool_scales = scales
        # Fail at construction on a bad device or dtype, not mid-pipeline.
        resolve_dtype(self.dtype, resolve_device(self.device))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"RCFEmbedder({args})"

    def config(self) -> dict:
        """The constructor parameters (JSON-able), for cache keys and versioning."""
        return {
            "n_features": self.n_features,
            "patch_size": self.patch_size,
            "seed": self.seed,
            "device": self.device,
            "batch_size": self.batch_size,
            "n_patch_samples": self.n_patch_samples,
            "zca_bias": self.zca_bias,
            "bias": self.bias,
            "dtype": self.dtype,
            "branches": self.branches,
            "pool_grid": self.pool_grid,
            "impl": self.impl,
            "filters": self.filters,
            "raw_bias": self.raw_bias,
            "pool_scales": list(self.pool_scales),
        }

    @property
    def n_outputs(self) -> int:
        """Pooling regions per filter and branch: grid cells, or nested squares."""
        return self.pool_grid**2 if self.pool_scales == (1.0,) else len(self.pool_scales)

    @property
    def n_filters(self) -> int:
        return self.n_features // ((2 if self.branches == "both" else 1) * self.n_outputs)

    @property
    def n_whitened(self) -> int:
        """Whitened (texture) filters; the rest are level filters in +w/-w pairs (an odd one out
        is whitened: a "raw" bank of 2k + 1 filters has one whitened filter)."""
        levels = {"whitened": 0, "raw": self.n_filters, "mixed": self.n_filters // 2}[self.filters]
        return self.n_filters - 2 * (levels // 2)

    @property
    def device_(self) -> str:
        """The device transform runs on ('auto' resolved on this machine)."""
        return str(resolve_device(self.device))

    @property
    def dtype_(self) -> str:
        """The compute dtype transform uses ('auto' resolved for the device). The reference
        implementation always computes in float32."""
        if self.impl == "reference":
            return "float32"
        return dtype_name(resolve_dtype(self.dtype, resolve_device(self.device)))

    def _check_size(self, chips: np.ndarray) -> None:
        h, w = chips.shape[2:]
        if h < self.patch_size or w < self.patch_size:
            raise EmbeddingError(
                f"chips are {h}x{w} px, smaller than patch_size {self.patch_size}"
            )
        out = min(h, w) - self.patch_size + 1
        if self.pool_grid > out:
            raise EmbeddingError(
                f"pool_grid {self.pool_grid} needs at least {self.pool_grid} output positions per "
                f"side; {h}x{w} px chips with patch_size {self.patch_size} have {out}"
            )
        if len(self.pool_scales) > 1 and round(out * self.pool_scales[-1]) < 1:
            raise EmbeddingError(
                f"pool_scales {list(self.pool_scales)}: the smallest square of {h}x{w} px chips "
                f"(patch_size {self.patch_size}, {out} output positions per side) holds no position"
            )

    def fit(self, chips: np.ndarray, valid: np.ndarray) -> "RCFEmbedder":
        chips, valid = _check_chips(chips, valid)
        self._check_size(chips)
        n_bands, k = chips.shape[1], self.patch_size
        n_filters = self.n_filters
        if n_bands * k * k < 2:
            raise EmbeddingError(
                "patch_size 1 on single-band chips gives one-value patches, which mean-centring "
                "turns into zeros: use patch_size >= 2"
            )
        # Independent streams: changing n_patch_samples does not move the band statistics.
        # (spawn(4)[:3] equals spawn(3): the whitened filters are those of algorithm 2.)
        rng_stats, rng_patches, rng_select, rng_levels = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(4)
        )

        valid = _finite_valid(chips, valid)
        if not valid.any():
            raise EmbeddingError("no valid pixel in any chip (all nodata or NaN): nothing to fit")
        center, scale = _band_statistics(chips, valid, rng_stats)

        patch_ok = np.concatenate([
            _receptive_field_valid(torch.from_numpy(valid[s : s + _CHIP_BLOCK]), k).numpy()
            for s in range(0, len(valid), _CHIP_BLOCK)
        ])
        n_candidates = int(patch_ok.sum())
        if n_candidates == 0:
            raise EmbeddingError(
                f"no fully-valid {k}x{k} patch in any chip: every window touches nodata or NaN, "
                "so there is nothing to draw filters from"
            )
        n_draw = min(n_candidates, max(self.n_patch_samples, n_filters))
        where = np.unravel_index(_sample_true(patch_ok, n_draw, rng_patches), patch_ok.shape)
        windows = np.lib.stride_tricks.sliding_window_view(chips, (k, k), axis=(2, 3))

        # Covariance of the textured patches, accumulated a block at a time to bound memory.
        d = n_bands * k * k
        covariance = np.zeros((d, d))
        is_flat = np.empty(n_draw, dtype=bool)
        for start in range(0, n_draw, _PATCH_BLOCK):
            block = slice(start, start + _PATCH_BLOCK)
            patches, is_flat[block] = _normalized_patches(
                windows, tuple(ix[block] for ix in where), center, scale
            )
            covariance += patches.T @ patches  # flat patches are zero rows: they add nothing
        textured = np.flatnonzero(~is_flat)
        if len(textured) == 0:
            raise EmbeddingError(
                f"all {n_draw} sampled {k}x{k} patches are flat (constant in every band): "
                "the chips have no texture to draw filters from"
            )
        covariance /= len(textured)
        zca = _zca_matrix(covariance, self.zca_bias)

        n_whitened = self.n_whitened
        replace = len(textured) < n_whitened
        if replace:
            warnings.warn(
                f"only {len(textured)} usable {k}x{k} patches (fully valid, not flat; "
                f"{n_candidates} fully-valid windows in all) for {n_whitened} filters: "
                "filters are drawn with replacement, so some features are duplicates",
                RuntimeWarning,
                stacklevel=2,
            )
        chosen = textured[rng_select.choice(len(textured), n_whitened, replace=replace)]
        if n_whitened:
            raw, _ = _normalized_patches(windows, tuple(ix[chosen] for ix in where), center, scale)
        else:
            raw = np.zeros((0, d))
        whitened = raw @ zca @ zca.T
        levels = _level_filters(windows, where, center, scale, (n_filters - n_whitened) // 2, rng_levels)

        self.__dict__.pop("_transform_state", None)
        self.n_bands_ = n_bands
        self.band_center_ = center
        self.band_scale_ = scale
        self.patch_covariance_ = covariance
        self.zca_ = zca
        self.raw_filters_ = raw.reshape(n_whitened, n_bands, k, k)  # the whitened filters' patches
        bank = np.concatenate([whitened, levels, -levels]) if len(levels) else whitened
        self.filters_ = bank.astype(np.float32).reshape(n_filters, n_bands, k, k)

        self.n_patch_candidates_ = n_candidates
        self.n_patches_sampled_ = len(textured)
        return self

    # --- transform ------------------------------------------------------------------------------

    def transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """float32 [N, n_features] for chips [N, C, H, W] and their valid mask [N, H, W]."""
        chips, valid = _check_chips(chips, valid)
        features = np.empty((len(chips), self.n_features), dtype=np.float32)
        start = 0
        for block in self.transform_stream([(chips, valid)], _stacklevel=3):
            features[start : start + len(block)] = block
            start += len(block)
        return features

    def transform_stream(
        self, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, _stacklevel: int = 2
    ) -> Iterator[np.ndarray]:
        """Features for each (chips, valid) batch of an iterable, one float32 array per batch.

        Memory stays bounded by the batch the caller hands in plus one compute step (``batch_size``
        chips; on CUDA as many as fill a share of the free device memory), never by the stream's
        length. Chips without a fully-valid window get NaN features and one warning at the end.
        """
        if not hasattr(self, "filters_"):
            raise EmbeddingError("this RCFEmbedder is not fitted yet: call fit first")
        device = resolve_device(self.device)
        dtype = torch.float32 if self.impl == "reference" else resolve_dtype(self.dtype, device)
        # The device-side filters (and their oneDNN packing) are reused across calls with the same
        # settings: small batches should not pay for them every time.
        key = (str(device), dtype, id(self.filters_), self.bias, self.branches, self.pool_grid,
               self.impl, self.batch_size, self.patch_size, self.pool_scales, self.raw_bias)
        cached = getattr(self, "_transform_state", None)
        if cached is not None and cached[0] == key:
            state = cached[1]
        else:
            state = _TransformState(self, device, dtype)
            self._transform_state = (key, state)
        no_valid_field: list[int] = []
        seen = 0
        try:
            for chips, valid in batches:
                chips, valid = _check_chips(chips, valid)
                if chips.shape[1] != self.n_bands_:
                    raise EmbeddingError(
                        f"chips have {chips.shape[1]} bands but the embedder was fitted on "
                        f"{self.n_bands_}"
                    )
                self._check_size(chips)
                out = np.empty((len(chips), self.n_features), dtype=np.float32)
                step = state.step_chips(chips.shape)
                for start in range(0, len(chips), step):
                    stop = min(start + step, len(chips))
                    out[start:stop], empty = state.embed(chips[start:stop], valid[start:stop])
                    no_valid_field.extend(seen + start + i for i in empty)
                seen += len(chips)
                yield out
        finally:
            if no_valid_field:
                shown = ", ".join(map(str, no_valid_field[:10]))
                more = f" and {len(no_valid_field) - 10} more" if len(no_valid_field) > 10 else ""
                cells = "window" if self.n_outputs == 1 else "window in some pooling region"
                warnings.warn(
                    f"{len(no_valid_field)} chip(s) have no fully-valid {self.patch_size}x"
                    f"{self.patch_size} {cells}, so (some of) their features are NaN "
                    f"(chip indexes {shown}{more})",
                    RuntimeWarning,
                    stacklevel=_stacklevel,
                )

    def fit_transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.fit(chips, valid).transform(chips, valid)

    def __getstate__(self) -> dict:
        # Pickles (e.g. the transport stage's cached embedder) hold the fitted state, not device
        # buffers.
        state = dict(self.__dict__)
        state.pop("_transform_state", None)
        return state

    def flops_per_chip(self, height: int, width: int) -> int:
        """Multiply-adds x 2 of the correlation for one chip: the work both implementations do
        (the reference does it once; the negative branch costs no extra multiply-adds)."""
        k = self.patch_size
        n_bands = getattr(self, "n_bands_", None)
        if n_bands is None:
            raise EmbeddingError("flops_per_chip needs a fitted embedder (the band count)")
        return 2 * (height - k + 1) * (width - k + 1) * self.n_filters * n_bands * k * k


def _im2col(xh: torch.Tensor, cell: tuple[int, int, int, int], k: int) -> torch.Tensor:
    """[B, rows, cols, k, k, C] patches of a cell's windows from NHWC chips, in k copies of
    contiguous k*C runs (twice as fast as one 6-d strided copy of the window view)."""
    r0, r1, c0, c1 = cell
    n_chips, _, _, n_bands = xh.shape
    out = torch.empty(n_chips, r1 - r0, c1 - c0, k, k, n_bands, dtype=xh.dtype, device=xh.device)
    s = xh.stride()
    for di in range(k):
        offset = xh.storage_offset() + (r0 + di) * s[1] + c0 * s[2]
        out[:, :, :, di] = xh.as_strided((n_chips, r1 - r0, c1 - c0, k, n_bands),
                                         (s[0], s[1], s[2], s[2], s[3]), offset)
    return out


def _masked_patch_sum(xh: torch.Tensor, field_ok: torch.Tensor, cell: tuple[int, int, int, int],
                      k: int) -> torch.Tensor:
    """float32 [B, k*k*C]: the sum of the patches of a cell's valid windows, without im2col."""
    r0, r1, c0, c1 = cell
    ok = field_ok[:, r0:r1, c0:c1].unsqueeze(-1).to(torch.float32)
    parts = [
        (xh[:, r0 + di : r1 + di, c0 + dj : c1 + dj, :].to(torch.float32) * ok).sum(dim=(1, 2))
        for di in range(k)
        for dj in range(k)
    ]
    return torch.cat(parts, dim=1)


# Per device: whether the fused Triton kernel passed its check against the torch path.
_FUSED_KERNEL_OK: dict[str, bool] = {}


def _check_fused_kernel(device: torch.device) -> bool:
    """Run the fused kernel once on a small case with nodata, a bias and a 2x2 grid, and compare
    it with the torch path; any error or mismatch disables it for this device, with a warning."""
    key = str(device)
    if key not in _FUSED_KERNEL_OK:
        try:
            gen = torch.Generator().manual_seed(0)
            n, h, w, c, k, f = 3, 13, 11, 5, 3, 40
            xh = torch.randn(n, h, w, c, generator=gen).to(device, torch.bfloat16)
            field_ok = torch.rand(n, h - k + 1, w - k + 1, generator=gen).to(device) > 0.2
            weights = torch.randn(f, k * k * c, generator=gen).to(device, torch.bfloat16)
            shift = torch.full((f,), -0.3, device=device, dtype=torch.bfloat16)
            cells = _grid_cells(h - k + 1, w - k + 1, 2)
            got = rcf_triton.rcf_pool_sums(xh, field_ok, weights, shift, cells, k)
            s = xh.stride()
            windows = xh.as_strided((n, h - k + 1, w - k + 1, k, k, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
            z = F.linear(windows.reshape(-1, k * k * c).float(), weights.float(), shift.float()).relu()
            z = z.reshape(n, h - k + 1, w - k + 1, f) * field_ok.unsqueeze(-1)
            want = torch.stack([z[:, r0:r1, c0:c1].sum(dim=(1, 2)) for r0, r1, c0, c1 in cells], 1)
            scale = want.abs().max().clamp_min(1e-6)
            ok = bool(((got - want).abs().max() / scale) < 2e-2)
            if not ok:
                warnings.warn(f"the fused RCF kernel disagrees with the torch path on {device}: "
                              "using the torch path", RuntimeWarning, stacklevel=4)
        except Exception as exc:  # compile errors, driver or Triton version problems
            ok = False
            warnings.warn(f"the fused RCF kernel is not usable on {device} ({type(exc).__name__}: {exc}); "
                          "using the torch path", RuntimeWarning, stacklevel=4)
        _FUSED_KERNEL_OK[key] = ok
    return _FUSED_KERNEL_OK[key]


def filter_bias(embedder: "RCFEmbedder") -> np.ndarray:
    """Each filter's ReLU threshold: ``bias`` for the whitened filters (the first
    ``len(raw_filters_)``), ``raw_bias`` for the level filters after them. Read at transform time,
    so a changed setting applies without refitting."""
    n_filters = len(embedder.filters_)
    n_whitened = len(getattr(embedder, "raw_filters_", embedder.filters_))
    raw_bias = getattr(embedder, "raw_bias", DEFAULT_RAW_BIAS)
    return np.concatenate([np.full(n_whitened, float(embedder.bias)), np.full(n_filters - n_whitened, raw_bias)])


class _TransformState:
    """Per-stream device state: filters in the compute layout, staging buffers, step sizes."""

    def __init__(self, emb: RCFEmbedder, device: torch.device, dtype: torch.dtype) -> None:
        self.emb = emb
        self.device = device
        self.dtype = dtype
        self.stage_chips = HostStaging(device)
        self.stage_masks = HostStaging(device)
        self._rows: tuple[int, int] | None = None  # (threads, rows per multiply)
        filters = torch.from_numpy(emb.filters_)
        self.conv_weights = filters.to(device)  # [F, C, k, k] float32, reference path
        # Fast path: [F, k*k*C], matching NHWC im2col rows ordered (row offset, col offset, band).
        self.matrix = filters.permute(0, 2, 3, 1).reshape(len(filters), -1).to(device, dtype)
        self.matrix_f32 = self.matrix.float()  # the same (rounded) weights, for the mean-patch term
        # The bias enters the multiply as a per-filter shift, rounded to the compute dtype; the
        # pooled correction below uses the same rounded value so that masked rows cancel exactly.
        self.shift = None
        self.bias_used = torch.zeros(len(filters), dtype=torch.float32, device=device)
        bias = filter_bias(emb)
        if bias.any():
            self.shift = torch.as_tensor(-bias, dtype=torch.float32).to(device, dtype)
            self.bias_used = -self.shift.float()
        # Masked (zeroed) rows give relu(shift) per filter: taken back out of the sums.
        self.masked_row_value = self.bias_used.neg().clamp_min(0.0)
        self.packed = _pack_for_onednn(self.matrix, self.rows_per_multiply()) if emb.impl == "fast" else None
        # The fused AVX2 kernel (float32 on CPU): filters packed in 16-filter blocks.
        self.cpu_kernel = None
        if emb.impl == "fast" and device.type == "cpu" and dtype == torch.float32:
            self.cpu_kernel = rcf_cpu.kernel()
            if self.cpu_kernel is not None:
                self.cpu_packed, self.cpu_shift = rcf_cpu.pack(self.matrix, self.shift)
        # Per chip shape: each output position's rectangle and patch offset (``_positions``).
        self._position_maps: dict[tuple, tuple] = {}
        self._tiled_positions: dict[int, tuple] = {}  # the same for a batch of all-valid chips
        self.center = torch.as_tensor(emb.band_center_, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = torch.as_tensor(emb.band_scale_, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._step = None
        # Per chip shape: the all-valid window mask and the grid cells (rebuilt per call otherwise;
        # with a few chips per call such small tensors and numpy calls are a visible share).
        self._shape_cache: dict[tuple[int, ...], tuple[torch.Tensor, list]] = {}

    def step_chips(self, shape: tuple[int, ...]) -> int:
        if self._step is None:
            self._step = self.emb.batch_size
            if self.device.type == "cuda":
                _, c, h, w = shape
                k = self.emb.patch_size
                positions = (h - k + 1) * (w - k + 1)
                elt = torch.finfo(self.dtype).bits // 8
                per_chip = 4 * c * h * w * 3 + positions * c * k * k * elt + positions * 8
                self._step = cuda_batch_chips(self.device, per_chip, self.emb.batch_size)
        return self._step

    def use_fused_kernel(self) -> bool:
        """The fused Triton kernel: bf16 on CUDA when Triton is present and passed its check.
        ``EOCAUSAL_RCF_FUSED=interpret`` with ``TRITON_INTERPRET=1`` runs it on CPU (tests);
        ``EOCAUSAL_RCF_FUSED=0`` turns it off."""
        setting = os.environ.get("EOCAUSAL_RCF_FUSED", "auto")
        if setting == "0" or not rcf_triton.AVAILABLE or self.dtype != torch.bfloat16:
            return False
        if self.device.type == "cpu":
            return setting == "interpret" and rcf_triton.interpreting()
        return _check_fused_kernel(self.device)

    def rows_per_multiply(self) -> int:
        """Rows (positions) per matrix multiply: CPU, per thread, enough that the activations of
        one multiply fill the core's L2 and that the multiply is large next to the per-call
        overhead (``_CPU_MIN_MACS_PER_MULTIPLY``); CUDA, a bounded slice of device memory."""
        threads = torch.get_num_threads()
        if self._rows is None or self._rows[0] != threads:
            elt = torch.finfo(self.dtype).bits // 8
            row_bytes = self.emb.n_filters * elt
            if self.device.type == "cuda":
                rows = max(1024, _CUDA_ACTIVATION_BYTES // row_bytes)
            else:
                depth = self.emb.n_bands_ * self.emb.patch_size**2
                fill_l2 = cpu_cache_bytes() // row_bytes
                amortise = -(-_CPU_MIN_MACS_PER_MULTIPLY // (depth * self.emb.n_filters))
                per_thread = max(fill_l2, min(amortise, _CPU_MAX_ACTIVATION_BYTES // row_bytes))
                rows = max(64, per_thread) * max(1, threads)
            self._rows = (threads, rows)
        return self._rows[1]

    def tiling(self, per_chip: int) -> tuple[int, int]:
        """(tiles per chip, rows per tile) for a cell of ``per_chip`` positions: tiles split a chip
        evenly, so there is one multiply shape per cell. One tile: whole chips, several per
        multiply (``rows_per_multiply() // per_chip`` of them)."""
        tiles = -(-per_chip // self.rows_per_multiply())
        return tiles, -(-per_chip // tiles)

    def _all_valid_field(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple]:
        """(window mask of all True, grid cells) for chips of ``shape`` [B, C, H, W]."""
        n, _, h, w = shape
        key = (n, h, w)
        if key not in self._shape_cache:
            k = self.emb.patch_size
            field_ok = torch.ones((n, h - k + 1, w - k + 1), dtype=torch.bool, device=self.device)
            self._shape_cache.clear()  # one shape at a time (the last batch may be shorter)
            self._shape_cache[key] = (field_ok, self.layout(h - k + 1, w - k + 1))
        return self._shape_cache[key]

    def layout(self, n_rows: int, n_cols: int) -> tuple[list, torch.Tensor]:
        """(rectangles pooled, [rectangles, outputs] membership) for a field of this size."""
        cells, groups = pool_layout(n_rows, n_cols, self.emb.pool_grid, self.emb.pool_scales)
        return cells, torch.from_numpy(groups).to(self.device)

    def embed(self, chips: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[int]]:
        if self.cpu_kernel is not None:
            try:
                return self._embed_cpu_kernel(chips, valid)
            except (RuntimeError, ValueError) as exc:
                log.info("RCF: fused CPU kernel failed (%s); using the torch path", exc)
                self.cpu_kernel = None
        emb, device = self.emb, self.device
        k = emb.patch_size
        with torch.no_grad(), ieee_float32(device):
            x = self.stage_chips(np.ascontiguousarray(chips, dtype=np.float32))
            pixel_ok = self.stage_masks(np.ascontiguousarray(valid))
            # The common case, no nodata: every mask entry is set and every value finite (a finite
            # sum proves the latter in one cheap pass; NaN/inf or an overflow take the exact path).
            if bool(pixel_ok.all() & torch.isfinite(x.sum())):  # one device sync
                x = (x - self.center) / self.scale
                field_ok, cells = self._all_valid_field(tuple(x.shape))
            else:
                # Not in place: on CPU the tensor shares memory with the caller's mask.
                pixel_ok = pixel_ok & torch.isfinite(x).all(1)
                # Invalid pixels become 0 (the band median); windows touching them are not pooled.
                x = torch.where(pixel_ok.unsqueeze(1), (x - self.center) / self.scale, 0.0)
                if bool(pixel_ok.all()):  # NaN-free after all (the sum overflowed)
                    field_ok, cells = self._all_valid_field(tuple(x.shape))
                else:
                    field_ok = _receptive_field_valid(pixel_ok, k)  # [B, H', W']
                    cells = self.layout(field_ok.shape[1], field_ok.shape[2])
            cells, groups = cells
            if emb.impl == "reference":
                pooled, counts = self._reference(x, field_ok, cells)
            else:
                pooled, counts = self._fast(x, field_ok, cells)
            if len(emb.pool_scales) > 1:
                # Rectangle means -> nested squares: count-weighted sums over each square's parts.
                sums = torch.nan_to_num(pooled) * counts[:, None, :, None]
                counts = counts @ groups  # [B, outputs]
                pooled = torch.einsum("bkcf,co->bkof", sums, groups) / counts[:, None, :, None]
            features = pooled.reshape(len(chips), -1).cpu().numpy()
            empty = torch.nonzero((counts == 0).any(dim=1)).flatten().tolist()
        return features, empty

    # Both return pooled [B, branches, cells, F] float32 and valid-window counts [B, cells].

    def _fast(self, x: torch.Tensor, field_ok: torch.Tensor, cells) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb
        k, n_filters = emb.patch_size, emb.n_filters
        n_chips, n_bands = x.shape[:2]
        both = emb.branches == "both"
        all_valid = bool(field_ok.all())
        # NHWC in the compute dtype: a window's k x k x C patch is k runs of k*C contiguous values.
        xh = torch.empty((n_chips, x.shape[2], x.shape[3], n_bands), dtype=self.dtype, device=x.device)
        xh.copy_(x.permute(0, 2, 3, 1))  # one pass: layout and dtype together
        depth = k * k * n_bands
        rows = self.rows_per_multiply()

        pooled = torch.empty(n_chips, 2 if both else 1, len(cells), n_filters, device=x.device)
        counts = torch.empty(n_chips, len(cells), device=x.device)
        fused_sums = None
        if self.use_fused_kernel():
            # One fused kernel for all cells: masked windows contribute exactly 0 there.
            fused_sums = rcf_triton.rcf_pool_sums(xh, field_ok, self.matrix, self.shift, cells, k)
        for c, (r0, r1, c0, c1) in enumerate(cells):
            per_chip = (r1 - r0) * (c1 - c0)
            ok = field_ok[:, r0:r1, c0:c1].reshape(n_chips, per_chip)
            n_valid = ok.sum(dim=1, dtype=torch.float32)
            counts[:, c] = n_valid
            if fused_sums is not None:
                pos = fused_sums[:, c] / n_valid[:, None]
                pooled[:, 0, c] = pos
                if both:
                    patch_sum = _masked_patch_sum(xh, field_ok, (r0, r1, c0, c1), k)
                    mean_z = (patch_sum @ self.matrix_f32.T) / n_valid[:, None]
                    pooled[:, 1, c] = pos - (mean_z - self.bias_used)
                continue
            patches = _im2col(xh, (r0, r1, c0, c1), k).view(n_chips * per_chip, depth)
            if not all_valid:
                patches.mul_(ok.reshape(-1, 1).to(self.dtype))  # masked windows: zero rows, z = 0
            # Each multiply's activations are summed over positions right away, while they are
            # still in cache (L2/L3). The sum accumulates in float32 inside torch's reduction and
            # rounds once per tile to the compute dtype (asking for a float32 result would first copy
            # the whole tile to float32, costing a third of the multiply); tiles are then added
            # in float32. Tiles split a chip evenly, so there is one tile shape per cell.
            tiles, tile = self.tiling(per_chip)
            partial = torch.empty(n_chips, tiles, n_filters, dtype=self.dtype, device=x.device)
            if tiles == 1:
                group = max(1, rows // per_chip)
                for b0 in range(0, n_chips, group):
                    b1 = min(b0 + group, n_chips)
                    z = _relu_linear(patches[b0 * per_chip : b1 * per_chip], self.matrix, self.shift, self.packed)
                    torch.sum(z.view(b1 - b0, per_chip, n_filters), 1, out=partial[b0:b1, 0])
            else:
                for b in range(n_chips):
                    for t in range(tiles):
                        p0 = b * per_chip + t * tile
                        p1 = b * per_chip + min((t + 1) * tile, per_chip)
                        z = _relu_linear(patches[p0:p1], self.matrix, self.shift, self.packed)
                        torch.sum(z, 0, out=partial[b, t])
            sums = partial.sum(1, dtype=torch.float32)
            if self.shift is not None:
                # A zeroed (masked) row gave relu(shift): take those back out of the sums.
                sums -= (per_chip - n_valid)[:, None] * self.masked_row_value
            pos = sums / n_valid[:, None]  # 0/0 -> NaN for a cell without a valid window (reported)
            pooled[:, 0, c] = pos
            if both:
                # relu(-(z - b)) = relu(z - b) - (z - b): its mean is pos - (w . mean patch - b).
                patch_sum = patches.view(n_chips, per_chip, depth).sum(1, dtype=torch.float32)
                mean_z = (patch_sum @ self.matrix_f32.T) / n_valid[:, None]
                pooled[:, 1, c] = pos - (mean_z - self.bias_used)
        return pooled, counts

    def _embed_cpu_kernel(self, chips: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """``embed`` through the fused AVX2 kernel, the rest in numpy (small arrays: no threaded
        torch calls). Same masking as the torch path: invalid or non-finite pixels become 0 (the
        band median) and every window touching one is left out of the position lists, so it adds
        exactly 0 and is not counted."""
        emb = self.emb
        k, n_filters = emb.patch_size, emb.n_filters
        x = np.asarray(chips, dtype=np.float32)
        n_chips, n_bands, h, w = x.shape
        rows, cols = h - k + 1, w - k + 1
        kern = self.cpu_kernel
        assert kern is not None
        # Normalised, NHWC (a patch is k runs of k*C values), in one pass.
        xh = kern.normalise_nhwc(x, self.center.view(-1).numpy(), self.scale.view(-1).numpy())
        pixel_ok = np.asarray(valid, dtype=bool)
        all_valid = bool(pixel_ok.all())
        with np.errstate(over="ignore", invalid="ignore"):
            all_valid = all_valid and bool(np.isfinite(x.sum()))
        if not all_valid:
            pixel_ok = pixel_ok & np.isfinite(x).all(axis=1)
            xh[~pixel_ok] = 0.0
            all_valid = bool(pixel_ok.all())
        layout = self._positions(n_bands, h, w)
        offset_map, cell_map, sizes, cells, groups = layout
        per_chip = rows * cols
        if all_valid:
            tiled = self._tiled_positions.get(n_chips)
            if tiled is None or tiled[0] is not offset_map:
                tiled = (offset_map, np.tile(offset_map, n_chips), np.tile(cell_map, n_chips),
                         np.arange(n_chips + 1, dtype=np.int64) * per_chip, np.tile(sizes, (n_chips, 1)))
                self._tiled_positions = {n_chips: tiled}  # one batch size at a time (the last may be shorter)
            _, offset, cell, start, counts = tiled
        else:
            # Windows lying wholly on valid pixels: a k-wide AND along rows, then along columns.
            field = pixel_ok[:, :rows, :].copy()
            for d in range(1, k):
                field &= pixel_ok[:, d : d + rows, :]
            ok = field[:, :, :cols].copy()
            for d in range(1, k):
                ok &= field[:, :, d : d + cols]
            ok = ok.reshape(n_chips, per_chip)
            flat = np.flatnonzero(ok)
            chip, q = np.divmod(flat, per_chip)
            offset, cell = offset_map[q], cell_map[q]
            start = np.zeros(n_chips + 1, dtype=np.int64)
            np.cumsum(ok.sum(axis=1), out=start[1:])
            counts = np.bincount(chip * len(cells) + cell, minlength=n_chips * len(cells))
            counts = counts.reshape(n_chips, len(cells)).astype(np.float64)
        both = emb.branches == "both"
        sums, patch_sums = kern.pool_sums(torch.from_numpy(xh), self.cpu_packed, self.cpu_shift, offset, cell,
                                          start, len(cells), k, both, torch.get_num_threads())
        sums = sums.numpy()[:, :, :n_filters].astype(np.float64)
        if groups is not None:
            # Rectangles -> nested squares: each square sums its rectangles (sums and counts).
            sums = np.stack([sums[:, g].sum(axis=1) for g in groups], axis=1)
            counts = np.stack([counts[:, g].sum(axis=1) for g in groups], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = sums / counts[:, :, None]  # 0/0 -> NaN for a region without a valid window
            pooled = [pos]
            if both:
                # relu(-(z - b)) = relu(z - b) - (z - b): its mean is pos - (w . mean patch - b).
                patch = patch_sums.numpy()
                if groups is not None:
                    patch = np.stack([patch[:, g].sum(axis=1) for g in groups], axis=1)
                mean_z = (patch @ self.matrix_f32.numpy().astype(np.float64).T) / counts[:, :, None]
                pooled.append(pos - (mean_z - self.bias_used.numpy().astype(np.float64)))
        features = np.stack(pooled, axis=1).reshape(n_chips, -1).astype(np.float32)
        empty = np.flatnonzero((counts == 0).any(axis=1)).tolist()
        return features, empty

    def _positions(self, n_bands: int, h: int, w: int) -> tuple:
        """For chips of C x h x w: each output position's patch offset and rectangle (row-major),
        each rectangle's size, the rectangles, and which rectangles make up each nested square
        (None for grid cells, one output each). Cached per chip shape."""
        key = (n_bands, h, w)
        if key not in self._position_maps:
            if n_bands * h * w >= 2**31:
                raise ValueError("chips too large for the kernel's 32-bit position offsets")
            k = self.emb.patch_size
            rows, cols = h - k + 1, w - k + 1
            cells, groups = pool_layout(rows, cols, self.emb.pool_grid, self.emb.pool_scales)
            cellmap = np.full((rows, cols), -1, dtype=np.int32)
            for c, (r0, r1, c0, c1) in enumerate(cells):
                cellmap[r0:r1, c0:c1] = c
            if (cellmap < 0).any():  # pool_layout partitions the field; anything else is a bug
                raise ValueError("the pooling rectangles do not cover the output positions")
            i, j = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
            offset = ((i * w + j) * n_bands).astype(np.int32)
            sizes = np.bincount(cellmap.reshape(-1), minlength=len(cells)).astype(np.float64)
            members = None
            if not np.array_equal(groups, np.eye(len(cells), dtype=groups.dtype)):
                members = [np.flatnonzero(groups[:, o] > 0) for o in range(groups.shape[1])]
            self._position_maps.clear()
            self._position_maps[key] = (offset, cellmap.reshape(-1), sizes, cells, members)
        return self._position_maps[key]

    def _reference(self, x: torch.Tensor, field_ok: torch.Tensor, cells) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb
        n_filters = emb.n_filters
        n_chips = x.shape[0]
        both = emb.branches == "both"
        n_positions = field_ok.shape[1] * field_ok.shape[2]
        field = field_ok.unsqueeze(1).to(torch.float32)  # [B, 1, H', W']
        budget = _REFERENCE_ACTIVATION_BYTES[self.device.type]
        filter_chunk = min(n_filters, max(1, budget // (4 * n_positions)))
        chip_group = max(1, budget // (4 * n_positions * filter_chunk))
        pooled = torch.empty(n_chips, 2 if both else 1, len(cells), n_filters, device=x.device)
        counts = torch.stack([field[:, 0, r0:r1, c0:c1].sum(dim=(1, 2)) for r0, r1, c0, c1 in cells], 1)
        for g0 in range(0, n_chips, chip_group):
            g1 = min(g0 + chip_group, n_chips)
            for f0 in range(0, n_filters, filter_chunk):
                f1 = min(f0 + filter_chunk, n_filters)
                z = F.conv2d(x[g0:g1], self.conv_weights[f0:f1]) - self.bias_used[f0:f1].view(1, -1, 1, 1)
                branches = [F.relu(z) * field[g0:g1]]
                if both:
                    branches.append(F.relu(-z) * field[g0:g1])
                for br, act in enumerate(branches):
                    for c, (r0, r1, c0, c1) in enumerate(cells):
                        pooled[g0:g1, br, c, f0:f1] = act[:, :, r0:r1, c0:c1].sum(dim=(2, 3))
        pooled /= counts[:, None, :, None]  # 0/0 -> NaN for a cell without a valid window
        return pooled, counts
