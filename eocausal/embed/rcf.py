"""Random convolutional features (MOSAIKS; Rolf et al. 2021, Nat. Commun. 12:4392).

The algorithm follows the paper's reference code (``mosaiks-paper/code/mosaiks/featurization.py``):

fit
    1. Per-band normalisation statistics (median, IQR) from *valid* pixels only, so that raw
       Landsat DNs, reflectance in [0, 1], or any other scale give the same normalised chips.
    2. Random ``patch_size x patch_size x C`` patches of the normalised chips, drawn (seeded)
       only where the whole patch is valid. Each patch is mean-centred and scaled to unit L2 norm;
       the patch covariance gives a ZCA whitening matrix ``Z = V diag((E + zca_bias)^-1/2) V^T``.
    3. ``n_features`` of the patches become the filters ``w = p Z Z^T``, exactly as the paper code
       does. Since ``Z`` is symmetric, ``w . x = (Z p) . (Z x)``: correlating *unwhitened* chips
       with these filters equals correlating whitened chips with whitened patches, which is what
       Coates & Ng's features are defined on, without ever whitening the chips themselves.

transform
    Normalise, zero the invalid pixels, ``conv2d`` (no padding), ``relu(z - bias)``, and average
    over the output positions whose whole receptive field is valid, so nodata never leaks into a
    feature. Only the positive branch is kept: at ``bias = 0`` the paper's negative branch is
    ``relu(-z) = relu(z) - z``, a linear function of the positive branch and the mean patch, so it
    would add at most ``C * patch_size**2`` new directions for twice the cost.

One consequence of mean-centred filters worth knowing: the features do not see a shift of all
bands by the same (normalised) amount; brightness reaches them through contrast (texture scales
with brightness in reflectance data) and through differences between bands.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from eocausal.embed import EmbeddingError

__all__ = ["EmbeddingError", "RCFEmbedder", "RCF_ALGORITHM_VERSION"]

# Bump when a change alters the features for the same config: it belongs in embedding cache keys.
RCF_ALGORITHM_VERSION = "1"

# Band statistics come from at most this many valid pixels (a seeded sample): plenty for a median
# and an IQR, and bounded in time and memory however many chips there are.
_MAX_STAT_PIXELS = 1 << 20
# A normalised patch with a smaller L2 norm is flat (constant in every band). It carries no texture
# and would become an all-zero filter, i.e. a constant feature, so it is not used.
_FLAT_PATCH_NORM = 1e-6
# Chips per block while building masks and sampling in fit; patches per block while normalising.
_CHIP_BLOCK = 1024
_PATCH_BLOCK = 16384
# Upper bound for one chunk of conv activations (chips x filters x positions x 4 bytes). On CPU a
# chunk that stays in cache is fastest, and many filters per conv call beat many chips with few
# filters (measured here: one 3x64x64 chip x ~270 filters per call ran ~5x faster than 64 chips x
# 8 filters at the same size). A GPU wants large kernels.
_ACTIVATION_BYTES = {"cpu": 4 << 20, "cuda": 1 << 30}


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EmbeddingError(
            f"device {device!r} is not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise EmbeddingError(f"device {device!r}: only 'cpu' and 'cuda' devices are supported")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbeddingError(f"device {device!r} was requested but CUDA is not available here")
    return str(resolved)


@contextlib.contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """Full float32 convolutions on CUDA (cuDNN uses TF32 by default), so CPU and GPU agree."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = saved
    else:  # torch before the fp32_precision API
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved


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


def _normalized_patches(
    windows: np.ndarray,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches at (chip, row, col), band-normalised, mean-centred, unit L2 norm: ([M, d], flat)."""
    n_idx, i_idx, j_idx = where
    patches = windows[n_idx, :, i_idx, j_idx].astype(np.float64)  # [M, C, k, k]
    patches = (patches - center[:, None, None]) / scale[:, None, None]
    patches = patches.reshape(len(patches), -1)
    patches -= patches.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(patches, axis=1)
    flat = norms < _FLAT_PATCH_NORM
    patches[~flat] /= norms[~flat, None]
    patches[flat] = 0.0
    return patches, flat


def _zca_matrix(covariance: np.ndarray, zca_bias: float) -> np.ndarray:
    """ZCA whitening matrix V diag((E + eps)^-1/2) V^T of a patch covariance."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # rounding can leave tiny negatives
    return (eigenvectors * (eigenvalues + zca_bias) ** -0.5) @ eigenvectors.T


class RCFEmbedder:
    """Random convolutional features (MOSAIKS-style) with a scikit-learn-like API.

    ``fit`` learns the band statistics and filters from chips (float [N, C, H, W], raw values of
    any scale) and their valid-pixel mask (bool [N, H, W]); ``transform`` returns float32
    [N, n_features]. Learned state ends in ``_``: ``band_center_``, ``band_scale_``,
    ``raw_filters_`` (normalised patches before whitening), ``zca_``, ``filters_`` (conv weights).
    NaN/inf pixels count as invalid.
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
    ) -> None:
        for name, value in (
            ("n_features", n_features),
            ("patch_size", patch_size),
            ("batch_size", batch_size),
            ("n_patch_samples", n_patch_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EmbeddingError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(zca_bias, numbers.Real) and math.isfinite(zca_bias) and zca_bias > 0):
            raise EmbeddingError(f"zca_bias must be a finite number > 0, got {zca_bias!r}")
        if not (isinstance(bias, numbers.Real) and math.isfinite(bias)):
            raise EmbeddingError(f"bias must be a finite number, got {bias!r}")
        self.n_features = int(n_features)
        self.patch_size = int(patch_size)
        self.seed = int(seed)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.n_patch_samples = int(n_patch_samples)
        self.zca_bias = float(zca_bias)
        self.bias = float(bias)
        _resolve_device(self.device)  # fail at construction on a bad device, not mid-pipeline

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
        }

    @property
    def device_(self) -> str:
        """The device transform runs on ('auto' resolved on this machine)."""
        return _resolve_device(self.device)

    def _check_size(self, chips: np.ndarray) -> None:
        h, w = chips.shape[2:]
        if h < self.patch_size or w < self.patch_size:
            raise EmbeddingError(
                f"chips are {h}x{w} px, smaller than patch_size {self.patch_size}"
            )

    def fit(self, chips: np.ndarray, valid: np.ndarray) -> "RCFEmbedder":
        chips, valid = _check_chips(chips, valid)
        self._check_size(chips)
        n_bands, k = chips.shape[1], self.patch_size
        if n_bands * k * k < 2:
            raise EmbeddingError(
                "patch_size 1 on single-band chips gives one-value patches, which mean-centring "
                "turns into zeros: use patch_size >= 2"
            )
        # Independent streams: changing n_patch_samples does not move the band statistics.
        rng_stats, rng_patches, rng_select = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)
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
        n_draw = min(n_candidates, max(self.n_patch_samples, self.n_features))
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

        replace = len(textured) < self.n_features
        if replace:
            warnings.warn(
                f"only {len(textured)} usable {k}x{k} patches (fully valid, not flat; "
                f"{n_candidates} fully-valid windows in all) for n_features={self.n_features}: "
                "filters are drawn with replacement, so some features are duplicates",
                RuntimeWarning,
                stacklevel=2,
            )
        chosen = textured[rng_select.choice(len(textured), self.n_features, replace=replace)]
        raw, _ = _normalized_patches(windows, tuple(ix[chosen] for ix in where), center, scale)

        self.n_bands_ = n_bands
        self.band_center_ = center
        self.band_scale_ = scale
        self.patch_covariance_ = covariance
        self.zca_ = zca
        self.raw_filters_ = raw.reshape(self.n_features, n_bands, k, k)
        whitened = raw @ zca @ zca.T
        self.filters_ = whitened.astype(np.float32).reshape(self.n_features, n_bands, k, k)
        self.n_patch_candidates_ = n_candidates
        self.n_patches_sampled_ = len(textured)
        return self

    def transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if not hasattr(self, "filters_"):
            raise EmbeddingError("this RCFEmbedder is not fitted yet: call fit first")
        chips, valid = _check_chips(chips, valid)
        if chips.shape[1] != self.n_bands_:
            raise EmbeddingError(
                f"chips have {chips.shape[1]} bands but the embedder was fitted on {self.n_bands_}"
            )
        self._check_size(chips)
        n, _, h, w = chips.shape
        k, n_filters = self.patch_size, self.n_features
        n_positions = (h - k + 1) * (w - k + 1)

        device = torch.device(self.device_)
        weights = torch.from_numpy(self.filters_).to(device)
        center = torch.as_tensor(self.band_center_, dtype=torch.float32, device=device)
        scale = torch.as_tensor(self.band_scale_, dtype=torch.float32, device=device)
        center, scale = center.view(1, -1, 1, 1), scale.view(1, -1, 1, 1)
        # Activation chunks: as many filters per conv call as fit the budget, then as many chips.
        budget = _ACTIVATION_BYTES[device.type]
        filter_chunk = min(n_filters, max(1, budget // (4 * n_positions)))
        chip_group = max(1, budget // (4 * n_positions * filter_chunk))

        features = np.empty((n, n_filters), dtype=np.float32)
        no_valid_field: list[int] = []
        with torch.no_grad(), _ieee_float32(device):
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                batch = np.ascontiguousarray(chips[start:stop], dtype=np.float32)
                x = torch.from_numpy(batch).to(device)
                # Not in place: on CPU the tensor shares memory with the caller's mask.
                pixel_ok = torch.from_numpy(valid[start:stop]).to(device) & torch.isfinite(x).all(1)
                # Invalid pixels become 0 (the band median); windows touching them are not pooled.
                x = torch.where(pixel_ok.unsqueeze(1), (x - center) / scale, 0.0)
                field_ok = _receptive_field_valid(pixel_ok, k).reshape(stop - start, 1, n_positions)
                all_valid = bool(field_ok.all())
                field = field_ok.to(torch.float32)
                n_fields = field.sum(dim=2)  # [B, 1]

                pooled = torch.empty(stop - start, n_filters, device=device)
                for g0 in range(0, stop - start, chip_group):
                    g1 = min(g0 + chip_group, stop - start)
                    for f0 in range(0, n_filters, filter_chunk):
                        f1 = min(f0 + filter_chunk, n_filters)
                        z = F.conv2d(x[g0:g1], weights[f0:f1])
                        z = z.reshape(g1 - g0, f1 - f0, n_positions)
                        if self.bias:
                            z.sub_(self.bias)
                        z.relu_()
                        if not all_valid:
                            z.mul_(field[g0:g1])
                        pooled[g0:g1, f0:f1] = z.sum(dim=2)
                pooled /= n_fields  # 0/0 -> NaN for a chip without a valid window (reported below)
                features[start:stop] = pooled.cpu().numpy()
                empty = torch.nonzero(n_fields[:, 0] == 0).flatten().tolist()
                no_valid_field.extend(start + i for i in empty)

        if no_valid_field:
            shown = ", ".join(map(str, no_valid_field[:10]))
            more = f" and {len(no_valid_field) - 10} more" if len(no_valid_field) > 10 else ""
            warnings.warn(
                f"{len(no_valid_field)} chip(s) have no fully-valid {k}x{k} window, so their "
                f"features are NaN (chip indexes {shown}{more})",
                RuntimeWarning,
                stacklevel=2,
            )
        return features

    def fit_transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.fit(chips, valid).transform(chips, valid)
