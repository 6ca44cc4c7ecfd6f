"""Reducing and checking image embeddings (numpy and scikit-learn only; no torch).

RCF features are many, correlated and on different scales, so nuisance models get a few
principal components of the standardised features instead (``analysis.image_components``).
``validate_embeddings`` is the embeddings rule of DESIGN §8: finite and non-constant, with
problems named by unit id.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from eocausal.embed import EmbeddingError

__all__ = ["PCAMoments", "PCAReduction", "fit_pca", "image_reduction", "pca_from_moments", "validate_embeddings"]

_FORMAT = "eocausal.pca/1"
# A column whose std is below this share of its typical magnitude is treated as constant: float32
# round-off on a constant feature leaves a std of ~1e-7 relative, which must not be blown up to 1.
_CONSTANT_RTOL = 1e-6


def _constant_columns(features: np.ndarray) -> np.ndarray:
    std = features.std(axis=0)
    magnitude = np.abs(features).max(axis=0)
    return std <= _CONSTANT_RTOL * np.maximum(magnitude, 1e-30)


class PCAReduction:
    """Column standardisation followed by a PCA projection; plain arrays, storable as JSON.

    ``transform(x) = ((x - mean_) / scale_ - center_) @ components_.T``. Constant columns get
    scale 1, so they standardise to 0 and take no part in the components.
    """

    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        center: np.ndarray,
        components: np.ndarray,
        explained_variance: np.ndarray,
        explained_variance_ratio: np.ndarray,
    ) -> None:
        # C order, so a reduction restored from JSON gives bit-identical scores to the fitted one.
        self.mean_ = np.ascontiguousarray(mean, dtype=np.float64)
        self.scale_ = np.ascontiguousarray(scale, dtype=np.float64)
        self.center_ = np.ascontiguousarray(center, dtype=np.float64)
        self.components_ = np.ascontiguousarray(components, dtype=np.float64)
        self.explained_variance_ = np.ascontiguousarray(explained_variance, dtype=np.float64)
        self.explained_variance_ratio_ = np.ascontiguousarray(
            explained_variance_ratio, dtype=np.float64
        )
        p = self.mean_.shape[0]
        k = self.components_.shape[0] if self.components_.ndim == 2 else -1
        if (
            self.mean_.shape != (p,)
            or self.scale_.shape != (p,)
            or self.center_.shape != (p,)
            or self.components_.shape != (k, p)
            or self.explained_variance_.shape != (k,)
            or self.explained_variance_ratio_.shape != (k,)
        ):
            raise EmbeddingError(
                "inconsistent PCA reduction: mean/scale/center must be [p], components [k, p], "
                f"explained variance [k]; got {self.mean_.shape}, {self.scale_.shape}, "
                f"{self.center_.shape}, {self.components_.shape}, "
                f"{self.explained_variance_.shape}, {self.explained_variance_ratio_.shape}"
            )

    @property
    def n_features_in_(self) -> int:
        return self.mean_.shape[0]

    @property
    def n_components_(self) -> int:
        return self.components_.shape[0]

    def transform(self, features: np.ndarray) -> np.ndarray:
        """[N, p] features -> [N, k] float64 component scores."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise EmbeddingError(
                f"features must be [N, {self.n_features_in_}] (the fitted width), "
                f"got shape {x.shape}"
            )
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise EmbeddingError(
                f"{len(bad)} row(s) have non-finite features (rows {bad[:10].tolist()}); "
                "drop or repair them before reducing"
            )
        return ((x - self.mean_) / self.scale_ - self.center_) @ self.components_.T

    def leading(self, k: int) -> "PCAReduction":
        """The reduction to the first ``k`` components (the ones of largest variance)."""
        if not 1 <= k <= self.n_components_:
            raise EmbeddingError(f"cannot keep {k} of {self.n_components_} components")
        return PCAReduction(self.mean_, self.scale_, self.center_, self.components_[:k],
                            self.explained_variance_[:k], self.explained_variance_ratio_[:k])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, to store next to the embeddings' version."""
        return {
            "format": _FORMAT,
            "n_features_in": self.n_features_in_,
            "n_components": self.n_components_,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "center": self.center_.tolist(),
            "components": self.components_.tolist(),
            "explained_variance": self.explained_variance_.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio_.tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "PCAReduction":
        if state.get("format") != _FORMAT:
            raise EmbeddingError(
                f"not a stored PCA reduction: format {state.get('format')!r}, expected {_FORMAT!r}"
            )
        try:
            components = np.asarray(state["components"], dtype=np.float64).reshape(
                state["n_components"], state["n_features_in"]
            )
            arrays = {
                name: np.asarray(state[name], dtype=np.float64)
                for name in (
                    "mean", "scale", "center", "explained_variance", "explained_variance_ratio"
                )
            }
        except (KeyError, ValueError, TypeError) as exc:
            raise EmbeddingError(
                f"stored PCA reduction is incomplete or malformed: {exc!r}"
            ) from exc
        return cls(components=components, **arrays)


def image_reduction(
    embedding: np.ndarray, n_components: int, seed: int = 0, stored: PCAReduction | None = None
) -> PCAReduction:
    """The PCA that turns an embedding into the estimators' image components.

    ``stored``: the PCA the embedding stage fitted once over every embedded unit and stored with
    the embeddings' version (DESIGN §6); its leading ``n_components`` are used when it has that
    many and the embedding's width. Otherwise (no stored PCA, or too few components) one is fitted
    here on ``embedding``, as before.
    """
    width = np.asarray(embedding).shape[1] if np.ndim(embedding) == 2 else -1
    if stored is not None and stored.n_components_ >= n_components and stored.n_features_in_ == width:
        return stored.leading(n_components)
    return fit_pca(embedding, n_components, seed=seed)


def fit_pca(features: np.ndarray, n_components: int, seed: int = 0) -> PCAReduction:
    """Standardise the columns (constant columns guarded), then PCA to n_components.

    ``n_components`` is capped at min(N, p); the cap shows in ``n_components_``.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise EmbeddingError(f"features must be a 2-D [N, p] array, got shape {x.shape}")
    n, p = x.shape
    if n < 2 or p < 1:
        raise EmbeddingError(f"PCA needs at least 2 rows and 1 column, got shape {x.shape}")
    if isinstance(n_components, bool) or int(n_components) != n_components or n_components < 1:
        raise EmbeddingError(f"n_components must be a positive integer, got {n_components!r}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise EmbeddingError(
            f"{len(bad)} row(s) have non-finite features (rows {bad[:10].tolist()}); "
            "run validate_embeddings and drop them before fitting the PCA"
        )
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    constant = _constant_columns(x)
    scale = np.where(constant, 1.0, std)
    standardised = (x - mean) / scale
    standardised[:, constant] = 0.0  # exactly zero, not round-off noise scaled up

    k = min(int(n_components), n, p)
    # "auto": exact (LAPACK / covariance eigh) for small or tall inputs, seeded randomized SVD for
    # wide, large ones, where a full SVD inside every cross-fitting fold would dominate run time.
    pca = PCA(n_components=k, svd_solver="auto", random_state=seed).fit(standardised)
    ratio = pca.explained_variance_ratio_
    if not np.isfinite(ratio).all():  # every column constant: no variance to explain
        ratio = np.zeros_like(pca.explained_variance_)
    return PCAReduction(
        mean=mean,
        scale=scale,
        center=pca.mean_,
        components=pca.components_,
        explained_variance=pca.explained_variance_,
        explained_variance_ratio=ratio,
    )


class PCAMoments:
    """Count, mean and centred cross-product of feature rows, accumulated block by block (or tile by
    tile) and merged exactly (Chan, Golub & LeVeque's pairwise update), so a PCA over every unit
    needs p x p numbers in memory instead of the N x p features. Non-finite rows are skipped (and
    counted in ``n_skipped``), as :func:`fit_pca`'s callers drop them."""

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.n_skipped = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros((n_features, n_features))
        self.max_abs = np.zeros(n_features)

    def update(self, block: np.ndarray) -> "PCAMoments":
        x = np.asarray(block, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise EmbeddingError(f"features must be [N, {self.mean.shape[0]}], got shape {x.shape}")
        finite = np.isfinite(x).all(axis=1)
        self.n_skipped += int((~finite).sum())
        x = x[finite]
        if len(x):
            part = PCAMoments(x.shape[1])
            part.n, part.mean = len(x), x.mean(axis=0)
            centred = x - part.mean
            part.m2 = centred.T @ centred
            part.max_abs = np.abs(x).max(axis=0)
            self.merge(part)
        return self

    def merge(self, other: "PCAMoments") -> "PCAMoments":
        if other.n == 0:
            self.n_skipped += other.n_skipped
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.max_abs = np.maximum(self.max_abs, other.max_abs)
        self.n, self.n_skipped = n, self.n_skipped + other.n_skipped
        return self


def pca_from_moments(moments: PCAMoments, n_components: int) -> PCAReduction | None:
    """The exact PCA of the standardised features from their moments: the same reduction as
    :func:`fit_pca` with an exact solver (eigenvectors of the correlation matrix, signs fixed as
    scikit-learn fixes them), without the features. None with fewer than 2 rows."""
    n, p = moments.n, moments.mean.shape[0]
    if n < 2:
        return None
    std = np.sqrt(np.clip(np.diag(moments.m2) / n, 0.0, None))
    constant = std <= _CONSTANT_RTOL * np.maximum(moments.max_abs, 1e-30)
    scale = np.where(constant, 1.0, std)
    covariance = moments.m2 / (n - 1) / np.outer(scale, scale)
    covariance[constant, :] = 0.0
    covariance[:, constant] = 0.0
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order].T
    k = min(int(n_components), n, p)
    components = vectors[:k]
    # scikit-learn's svd_flip(u_based_decision=False): each component's largest |entry| positive
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    total = values.sum()
    ratio = values[:k] / total if total > 0 else np.zeros(k)
    return PCAReduction(mean=moments.mean, scale=scale, center=np.zeros(p), components=components,
                        explained_variance=values[:k], explained_variance_ratio=ratio)


def _name_units(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def validate_embeddings(features: np.ndarray, unit_ids: list[str]) -> list[str]:
    """Human-readable problems with an embedding table; an empty list when it is fine.

    Checks: shape and id count; rows with NaN/inf (named by unit id, first 10 and a count);
    constant columns (a count); rows whose values are all equal (e.g. a blank chip); repeated ids.
    """
    x = np.asarray(features)
    ids = [str(u) for u in unit_ids]
    if x.ndim != 2:
        return [f"embeddings must be a 2-D [units, features] array, got shape {x.shape}"]
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        return [f"embeddings must be numeric, got dtype {x.dtype}"]
    n, p = x.shape
    if len(ids) != n:
        return [f"{n} embedding rows but {len(ids)} unit ids: they must match one to one"]
    if n == 0 or p == 0:
        return [f"embeddings are empty (shape {x.shape})"]

    problems: list[str] = []
    repeated = sorted(u for u, count in Counter(ids).items() if count > 1)
    if repeated:
        problems.append(
            f"{len(repeated)} unit id(s) appear more than once: {_name_units(repeated)}"
        )

    finite = np.isfinite(x)
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    if len(bad_rows):
        problems.append(
            f"{len(bad_rows)} unit(s) have non-finite embedding values (NaN or inf): "
            f"{_name_units([ids[i] for i in bad_rows])}"
        )
    good = x[finite.all(axis=1)].astype(np.float64)
    if len(good) >= 2:
        n_constant = int(_constant_columns(good).sum())
        if n_constant:
            problems.append(
                f"{n_constant} of {p} embedding column(s) are constant across the "
                f"{len(good)} units with finite values"
            )
    if p >= 2:
        row_span = np.ptp(good, axis=1) if len(good) else np.empty(0)
        flat_rows = np.flatnonzero(finite.all(axis=1))[row_span == 0]
        if len(flat_rows):
            problems.append(
                f"{len(flat_rows)} unit(s) have all-constant embeddings (every feature the same "
                f"value, e.g. a blank chip): {_name_units([ids[i] for i in flat_rows])}"
            )
    return problems
