"""Fold assignment for cross-fitting, and square spatial blocks for spatially blocked folds.

Written here rather than borrowed from scikit-learn's splitters so that the assignment is
stable across scikit-learn versions: an estimate's version hash (DESIGN §9) covers our code,
not a third-party shuffling routine.
"""

from __future__ import annotations

import numpy as np

# Mean Earth radius (IUGG) in km, times pi / 180: km per degree of latitude.
KM_PER_DEGREE = 6371.0088 * np.pi / 180.0


def make_folds(
    n: int,
    folds: int,
    seed: int,
    stratify: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Fold ids 0..folds-1 for n units.

    - ``stratify``: labels (e.g. treatment) kept in near-equal shares across folds.
    - ``groups``: cluster labels; all units of a cluster land in the same fold, and clusters are
      spread so that fold sizes (and, with ``stratify``, label counts) are balanced.
    Same inputs and seed give the same ids.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    n = int(n)
    if n < folds:
        raise ValueError(f"cannot split {n} units into {folds} folds: need at least one unit per fold")
    rng = np.random.default_rng(seed)
    labels = None
    if stratify is not None:
        labels = _as_codes(stratify, n, "stratify")
    if groups is None:
        return _unit_folds(n, folds, rng, labels)
    group_codes = _as_codes(groups, n, "groups")
    return _group_folds(group_codes, folds, rng, labels)


def _as_codes(values, n: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {values.shape}")
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise ValueError(f"{name} contains missing values (NaN)")
    if values.dtype == object and any(v is None for v in values):
        raise ValueError(f"{name} contains missing values (None)")
    _, codes = np.unique(values, return_inverse=True)
    return codes.ravel()


def _unit_folds(n: int, folds: int, rng: np.random.Generator, labels: np.ndarray | None) -> np.ndarray:
    fold_ids = np.empty(n, dtype=np.int64)
    if labels is None:
        order = rng.permutation(n)
        fold_ids[order] = np.arange(n) % folds
        return fold_ids
    # Deal each stratum round-robin, continuing where the previous stratum stopped, so both the
    # label shares and the total fold sizes differ by at most one unit between folds.
    offset = 0
    for code in np.unique(labels):
        members = np.flatnonzero(labels == code)
        members = members[rng.permutation(len(members))]
        fold_ids[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return fold_ids


def _group_folds(
    group_codes: np.ndarray, folds: int, rng: np.random.Generator, labels: np.ndarray | None
) -> np.ndarray:
    n_groups = int(group_codes.max()) + 1
    if n_groups < folds:
        raise ValueError(
            f"group-wise folds need at least as many groups as folds: {n_groups} groups, {folds} folds"
        )
    n_labels = 1 if labels is None else int(labels.max()) + 1
    label_codes = np.zeros_like(group_codes) if labels is None else labels
    # counts[g, l]: units of group g with label l.
    counts = np.zeros((n_groups, n_labels))
    np.add.at(counts, (group_codes, label_codes), 1.0)
    targets = counts.sum(axis=0) / folds  # per-label count each fold should get

    # Greedy: big groups first (random order among equal sizes), each to the fold where it
    # leaves the label counts closest to their targets.
    shuffled = rng.permutation(n_groups)
    order = shuffled[np.argsort(-counts[shuffled].sum(axis=1), kind="stable")]
    load = np.zeros((folds, n_labels))
    group_fold = np.empty(n_groups, dtype=np.int64)
    for g in order:
        cost = (((load + counts[g]) / targets) ** 2).sum(axis=1)
        best = int(np.argmin(cost))  # ties go to the lowest fold id
        group_fold[g] = best
        load[best] += counts[g]
    return group_fold[group_codes]


def spatial_blocks(lat, lon, block_km: float) -> np.ndarray:
    """Group ids (0..G-1) of the square blocks, ``block_km`` on a side, that hold each unit.

    Rows are bands of latitude ``block_km`` tall; each row is cut into columns ``block_km`` wide
    measured at the row's central latitude, so blocks stay close to square at any latitude and a
    unit's block does not depend on the other units. Blocks do not wrap across the antimeridian.
    """
    lat = np.asarray(lat, dtype=float)
    lon = np.asarray(lon, dtype=float)
    if lat.shape != lon.shape or lat.ndim != 1:
        raise ValueError(f"lat and lon must be 1-D arrays of equal length, got {lat.shape} and {lon.shape}")
    if not (np.isfinite(block_km) and block_km > 0):
        raise ValueError(f"block_km must be a positive number, got {block_km!r}")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise ValueError("lat and lon must be finite")
    if (np.abs(lat) > 90).any() or (np.abs(lon) > 180).any():
        raise ValueError("lat must lie in [-90, 90] and lon in [-180, 180] (WGS84 degrees)")
    row = np.floor(lat * KM_PER_DEGREE / block_km)
    row_centre_lat = np.clip((row + 0.5) * block_km / KM_PER_DEGREE, -90.0, 90.0)
    # Near the poles a row's circumference shrinks to nothing; keep at least one column.
    km_per_degree_lon = np.maximum(KM_PER_DEGREE * np.cos(np.deg2rad(row_centre_lat)), 1e-9)
    col = np.floor((lon + 180.0) * km_per_degree_lon / block_km)
    _, block_ids = np.unique(np.column_stack([row, col]), axis=0, return_inverse=True)
    return block_ids.ravel().astype(np.int64)
