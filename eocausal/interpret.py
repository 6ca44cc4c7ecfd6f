"""Which pixels of a chip move the treatment model and the effect-cluster membership.

The random convolutional features are a differentiable function of the pixels (normalise,
correlate with fixed filters, ReLU, masked mean), and so are the PCA, the logistic propensity head
and the clusters' softmax gate. :class:`DifferentiableImageFeatures` re-runs the fitted embedder's
forward pass under autograd (the plain float32 ``conv2d`` form of ``RCFEmbedder``'s reference
implementation), so the gradient of the treatment logit — or of a cluster's log-probability — with
respect to every pixel comes from one backward pass (vanilla gradient saliency; causalimages'
"sensitivity factor" for cluster membership).

Gradients are taken with respect to the *normalised* pixels ((value - band median) / band IQR), so
bands of different scales are comparable; a pixel's saliency is the L2 norm over bands. Nodata
pixels get zero saliency (they enter no feature).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eocausal.embed.rcf import filter_bias, pool_layout
from eocausal.embed.reduce import PCAReduction

# Bump when the saliency code changes what it computes.
CODE_VERSION = "saliency-1"


class DifferentiableImageFeatures(torch.nn.Module):
    """Pixels -> RCF features -> principal components, differentiable (float32, CPU).

    ``embedder``: a fitted ``RCFEmbedder``; ``pca``: the study's :class:`PCAReduction` of its
    features. ``normalised(chips, valid)`` gives the normalised input to differentiate against;
    ``forward(normalised, valid)`` the components.
    """

    def __init__(self, embedder, pca: PCAReduction):
        super().__init__()
        for attr in ("filters_", "band_center_", "band_scale_"):
            if not hasattr(embedder, attr):
                raise ValueError(f"the embedder is not fitted (no {attr})")
        self.patch_size = int(embedder.patch_size)
        self.branches = str(getattr(embedder, "branches", "positive"))
        self.pool_grid = int(getattr(embedder, "pool_grid", 1))
        self.pool_scales = tuple(getattr(embedder, "pool_scales", (1.0,)))
        self.register_buffer("bias", torch.as_tensor(filter_bias(embedder), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("filters", torch.as_tensor(np.asarray(embedder.filters_), dtype=torch.float32))
        self.register_buffer("center", torch.as_tensor(embedder.band_center_, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.as_tensor(embedder.band_scale_, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pca_mean", torch.as_tensor(pca.mean_, dtype=torch.float32))
        self.register_buffer("pca_scale", torch.as_tensor(pca.scale_, dtype=torch.float32))
        self.register_buffer("pca_center", torch.as_tensor(pca.center_, dtype=torch.float32))
        self.register_buffer("components", torch.as_tensor(pca.components_, dtype=torch.float32))
        regions = self.pool_grid**2 if self.pool_scales == (1.0,) else len(self.pool_scales)
        n_out = self.filters.shape[0] * regions * (2 if self.branches == "both" else 1)
        if n_out != pca.n_features_in_:
            raise ValueError(f"the embedder gives {n_out} features but the PCA expects {pca.n_features_in_}")

    def normalised(self, chips: np.ndarray, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.ascontiguousarray(chips, dtype=np.float32))
        ok = torch.as_tensor(np.ascontiguousarray(valid, dtype=bool)) & torch.isfinite(x).all(1)
        x = torch.where(ok.unsqueeze(1), (torch.nan_to_num(x) - self.center) / self.scale, 0.0)
        return x, ok

    def embedding(self, x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """RCF features [B, n_features] of normalised chips (feature order: branch, cell, filter)."""
        k = self.patch_size
        invalid = (~ok).unsqueeze(1).to(torch.float32)
        field = (F.max_pool2d(invalid, k, stride=1) == 0).to(torch.float32)  # [B, 1, H', W']
        # Invalid pixels contribute nothing to the gradient: they are constants here.
        x = torch.where(ok.unsqueeze(1), x, x.detach() * 0.0)
        z = F.conv2d(x, self.filters) - self.bias
        acts = [F.relu(z) * field]
        if self.branches == "both":
            acts.append(F.relu(-z) * field)
        cells, groups = pool_layout(field.shape[2], field.shape[3], self.pool_grid, self.pool_scales)
        pooled = []
        for act in acts:
            sums = torch.stack([act[:, :, r0:r1, c0:c1].sum(dim=(2, 3)) for r0, r1, c0, c1 in cells], 2)
            counts = torch.stack([field[:, 0, r0:r1, c0:c1].sum(dim=(1, 2)) for r0, r1, c0, c1 in cells], 1)
            counts = counts.to(act.dtype)
            g = torch.from_numpy(groups).to(act.dtype)
            pooled.append((sums @ g / (counts @ g)[:, None, :]).transpose(1, 2).reshape(len(x), -1))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        features = self.embedding(x, ok)
        return ((features - self.pca_mean) / self.pca_scale - self.pca_center) @ self.components.T


@dataclass
class LinearHead:
    """logit = ((components - mean) / scale) @ weights + bias; weights [k] (or [k, K] for a gate)."""

    mean: np.ndarray
    scale: np.ndarray | float
    weights: np.ndarray
    bias: np.ndarray | float

    def logits(self, components: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=torch.float32)
        scale = torch.as_tensor(self.scale, dtype=torch.float32)
        w = torch.as_tensor(self.weights, dtype=torch.float32)
        b = torch.as_tensor(self.bias, dtype=torch.float32)
        return ((components - mean) / scale) @ w + b

    def numpy_logits(self, components: np.ndarray) -> np.ndarray:
        return ((np.asarray(components) - self.mean) / self.scale) @ self.weights + self.bias


def fit_propensity_head(components: np.ndarray, treatment: np.ndarray, seed: int = 0) -> LinearHead:
    """The image-only treatment model for interpretation: l2 logistic regression of D on the
    standardised image components, penalty by 3-fold CV log-loss, fitted on all units."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(components, dtype=float)
    d = np.asarray(treatment).astype(int)
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's changing-default notices
        model = LogisticRegressionCV(
            Cs=10, cv=StratifiedKFold(3, shuffle=True, random_state=seed), scoring="neg_log_loss", max_iter=500
        ).fit((X - mean) / std, d)
    return LinearHead(mean, std, model.coef_.ravel().astype(float), float(model.intercept_[0]))


def saliency(
    model: DifferentiableImageFeatures, chips: np.ndarray, valid: np.ndarray, target
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel saliency [B, H, W] (L2 over bands of d target / d normalised pixel) and the
    target's value [B]. ``target``: components [B, k] tensor -> [B] tensor."""
    x, ok = model.normalised(chips, valid)
    x = x.clone().requires_grad_(True)
    value = target(model(x, ok))
    grad = torch.autograd.grad(value.sum(), x)[0]  # chips are independent: sum = per-chip grads
    magnitude = grad.pow(2).sum(dim=1).sqrt() * ok
    return magnitude.detach().numpy(), value.detach().numpy()


def display_rgb(chip: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A chip [C, H, W] as an RGB image [H, W, 3] in 0..1 for display (see :func:`_rgb`)."""
    return _rgb(np.asarray(chip, dtype=float), np.asarray(valid, dtype=bool))


def _rgb(chip: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A display image: the first three bands in reverse order (ascending-wavelength blue, green,
    red -> RGB), each stretched between its 2nd and 98th valid-pixel percentile; nodata black."""
    bands = chip[:3][::-1] if chip.shape[0] >= 3 else np.repeat(chip[:1], 3, axis=0)
    out = np.zeros(bands.shape[1:] + (3,), dtype=float)
    for i, band in enumerate(bands):
        values = band[valid] if valid.any() else band.ravel()
        lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        out[..., i] = np.clip((band - lo) / max(hi - lo, 1e-9), 0, 1)
    out[~valid] = 0
    return out


def _smooth(saliency_map: np.ndarray, valid: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Gaussian-smoothed saliency for display: pixel gradients through 3x3 random filters are
    speckled, while what a reader wants to see is which parts of the chip matter."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(saliency_map, dtype=float), sigma) * valid


def plot_saliency_panel(
    chips: np.ndarray, valid: np.ndarray, treatment_maps: np.ndarray, cluster_maps: np.ndarray | None,
    labels: list[str], title: str, path: Path,
) -> Path:
    """:func:`saliency_figure` written as a PNG at ``path``."""
    from eocausal.figures import save_figure

    return save_figure(saliency_figure(chips, valid, treatment_maps, cluster_maps, labels, title), path, dpi=80)


def saliency_figure(
    chips: np.ndarray, valid: np.ndarray, treatment_maps: np.ndarray, cluster_maps: np.ndarray | None,
    labels: list[str], title: str,
):
    """Rows = units; columns: chip, treatment-model saliency, (cluster-membership saliency); the
    maps are smoothed for display (see :func:`_smooth`) and scaled to their 99th percentile."""
    from eocausal.figures import new_figure

    n = len(chips)
    n_cols = 3 if cluster_maps is not None else 2
    fig = new_figure((3.0 * n_cols, 2.9 * n + 0.4))
    axes = fig.subplots(n, n_cols, squeeze=False)
    for i in range(n):
        rgb = _rgb(chips[i], valid[i])
        grey = rgb.mean(axis=2)
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_ylabel(labels[i], fontsize=8)
        maps = [("treatment model", treatment_maps[i], "magma")]
        if cluster_maps is not None:
            maps.append(("cluster membership", cluster_maps[i], "viridis"))
        for j, (name, m, cmap) in enumerate(maps, start=1):
            m = _smooth(m, valid[i])
            top = np.percentile(m[m > 0], 99) if (m > 0).any() else 1.0
            axes[i, j].imshow(grey, cmap="gray")
            axes[i, j].imshow(np.clip(m / max(top, 1e-12), 0, 1), cmap=cmap, alpha=0.65)
            if i == 0:
                axes[i, j].set_title(f"saliency: {name}", fontsize=9)
        if i == 0:
            axes[i, 0].set_title("chip (RGB)", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
