"""Image embeddings: random convolutional features (MOSAIKS-style), pretrained backbones from
local weights, and their reduction.

``EmbeddingError`` lives here so that :mod:`eocausal.embed.reduce` (numpy + scikit-learn only)
can be imported without loading torch; :mod:`eocausal.embed.rcf` re-exports it.
The heavier names are loaded on first use.
"""

from __future__ import annotations

import importlib


class EmbeddingError(ValueError):
    """Chips or embeddings that cannot be embedded / used as they are; the message says why."""


_LAZY = {
    "RCFEmbedder": "eocausal.embed.rcf",
    "BackboneEmbedder": "eocausal.embed.backbone",
    "fit_pca": "eocausal.embed.reduce",
    "PCAReduction": "eocausal.embed.reduce",
    "validate_embeddings": "eocausal.embed.reduce",
}

__all__ = ["EmbeddingError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
