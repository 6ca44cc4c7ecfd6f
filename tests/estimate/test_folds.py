import numpy as np
import pytest

from eocausal.estimate.folds import KM_PER_DEGREE, make_folds, spatial_blocks


def test_stratified_folds_balance_sizes_and_treated_counts():
    rng = np.random.default_rng(0)
    d = (rng.random(103) < 0.3).astype(int)
    ids = make_folds(103, 5, seed=1, stratify=d)
    assert set(ids) == set(range(5))
    sizes = np.bincount(ids)
    treated = np.bincount(ids, weights=d)
    assert sizes.max() - sizes.min() <= 1
    assert treated.max() - treated.min() <= 1


def test_folds_are_reproducible_and_depend_on_seed():
    d = np.tile([0, 1], 50)
    a = make_folds(100, 4, seed=7, stratify=d)
    b = make_folds(100, 4, seed=7, stratify=d)
    c = make_folds(100, 4, seed=8, stratify=d)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_group_folds_never_split_a_group_and_stay_balanced():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, size=600)
    # Treatment assigned per group, as in a cluster-randomised programme.
    group_treated = rng.random(40) < 0.4
    d = group_treated[groups].astype(int)
    ids = make_folds(600, 5, seed=0, stratify=d, groups=groups)
    for g in np.unique(groups):
        assert len(np.unique(ids[groups == g])) == 1, f"group {g} split across folds"
    sizes = np.bincount(ids, minlength=5)
    assert sizes.min() > 0.6 * 600 / 5
    # Every training set (all folds but one) holds both arms.
    for k in range(5):
        assert set(d[ids != k]) == {0, 1}


def test_group_folds_need_enough_groups():
    with pytest.raises(ValueError, match="at least as many groups as folds"):
        make_folds(10, 5, seed=0, groups=np.repeat([0, 1, 2], [4, 3, 3]))


def test_make_folds_rejects_bad_arguments():
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        make_folds(10, 1, seed=0)
    with pytest.raises(ValueError, match="at least one unit per fold"):
        make_folds(3, 5, seed=0)
    with pytest.raises(ValueError, match="length 10"):
        make_folds(10, 2, seed=0, stratify=np.zeros(9))


def test_spatial_blocks_group_near_points_and_separate_far_ones():
    # Two points 1 km apart inside one 10 km block, a third 30 km east.
    lat0, lon0 = 5.0, 30.0
    km_lon = KM_PER_DEGREE * np.cos(np.deg2rad(lat0))
    base_lat = (np.floor(lat0 * KM_PER_DEGREE / 10) + 0.5) * 10 / KM_PER_DEGREE  # a row centre
    lat = np.array([base_lat, base_lat + 1 / KM_PER_DEGREE, base_lat])
    lon = np.array([lon0, lon0, lon0 + 30 / km_lon])
    ids = spatial_blocks(lat, lon, 10.0)
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]
    assert ids.dtype.kind == "i" and ids.min() == 0


def test_spatial_blocks_are_square_in_km_at_high_latitude():
    # 100 km x 100 km of points at 60N in 20 km blocks: about 5 x 5 blocks (up to 6 x 6 with
    # edges). Blocks measured in degrees of longitude would be half as wide there: ~50-66.
    rng = np.random.default_rng(0)
    lat = 60.0 + rng.random(4000) * 100 / KM_PER_DEGREE
    lon = 10.0 + rng.random(4000) * 100 / (KM_PER_DEGREE * np.cos(np.deg2rad(60.0)))
    n_blocks = len(np.unique(spatial_blocks(lat, lon, 20.0)))
    assert 25 <= n_blocks <= 42


def test_spatial_blocks_validate_inputs():
    with pytest.raises(ValueError, match="block_km"):
        spatial_blocks([0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match=r"\[-90, 90\]"):
        spatial_blocks([95.0], [0.0], 10.0)
    with pytest.raises(ValueError, match="finite"):
        spatial_blocks([np.nan], [0.0], 10.0)
