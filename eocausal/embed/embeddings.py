"""The embedding stage: embed every usable chip, cached by content (chips + method).

The cache key hashes the ordered chip keys and the embedder's configuration, so a re-run on the
same chips costs one file read, and any change to chips or method computes afresh.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from eocausal.embed.rcf import RCF_ALGORITHM_VERSION
from eocausal.imagery.chips import load_chips
from eocausal.study import EmbeddingSpec
from eocausal.versioning import json_version

# Bump when the embedding code changes what it computes.
CODE_VERSION = "rcf-1"


@dataclass
class Embeddings:
    unit_ids: list[str]
    features: np.ndarray  # float32 [n_units, n_features]
    version: str  # content version: chips + method + code
    method: str
    from_cache: bool
    device: str | None


def _embedder(spec: EmbeddingSpec):
    if spec.method != "rcf":
        raise ValueError(f"embedding.method {spec.method!r} is not available in this build (use 'rcf')")
    from eocausal.embed.rcf import RCFEmbedder
    return RCFEmbedder(
        n_features=spec.n_features, patch_size=spec.patch_size, seed=spec.seed,
        device=spec.device, batch_size=spec.batch_size,
    )


def compute_embeddings(chip_index: pd.DataFrame, chip_cache: Path, cache_dir: Path, spec: EmbeddingSpec) -> Embeddings:
    usable = chip_index[chip_index["status"] == "ok"]
    unit_ids = usable["unit_id"].astype(str).tolist()
    embedder = _embedder(spec)
    # Device and batch size change nothing beyond float tolerance: they stay out of the key.
    config = {k: v for k, v in embedder.config().items() if k not in ("device", "batch_size")}
    version = json_version({
        "code": CODE_VERSION, "algorithm": RCF_ALGORITHM_VERSION, "method": spec.method,
        "config": config, "chips": usable["chip_key"].tolist(),
    })
    path = Path(cache_dir) / f"{version}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if cached["unit_ids"].tolist() == unit_ids:
                return Embeddings(unit_ids, cached["features"], version, spec.method, True, None)
    chips, valid = load_chips(chip_index, chip_cache)
    features = embedder.fit_transform(chips, valid).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".emb.", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, unit_ids=np.array(unit_ids), features=features,
                 config=np.array(json.dumps(embedder.config())))
    os.replace(tmp, path)
    return Embeddings(unit_ids, features, version, spec.method, False, embedder.device_)
