"""Content hashes for data versions and estimate versions (DESIGN §9).

An estimate's version hashes the estimator code version, the data versions of its inputs and
the analysis spec: unchanged inputs give the same version (so no duplicate rows), any change
gives a new one.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def frame_version(df: pd.DataFrame) -> str:
    """A hash of a table's logical content (column names, dtypes and values, in row order)."""
    h = hashlib.sha256()
    h.update(json.dumps([(c, str(t)) for c, t in df.dtypes.items()]).encode())
    for col in df.columns:
        values = df[col]
        if values.dtype == object and len(values) and isinstance(values.iloc[0], (list, np.ndarray)):
            h.update(np.ascontiguousarray(np.stack(values.to_numpy()), dtype=np.float32).tobytes())
        else:
            h.update(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def array_version(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def json_version(obj) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str).encode())


def estimate_version(code_version: str, input_versions: dict[str, str], spec: dict) -> str:
    return json_version({"code": code_version, "inputs": input_versions, "spec": spec})
