import numpy as np
import pytest

from eocausal.tiles import MAX_LEVEL, START_LEVEL, assign_tiles, quadkey_bounds


def _units(n, seed=0):
    rng = np.random.default_rng(seed)
    # a dense town and a sparse countryside around it
    lat = np.concatenate([rng.normal(-25.4, 0.01, n // 2), rng.uniform(-26.5, -24.5, n - n // 2)])
    lon = np.concatenate([rng.normal(-54.6, 0.01, n // 2), rng.uniform(-55.5, -53.5, n - n // 2)])
    return lat, lon


def test_every_tile_holds_at_most_the_limit_and_contains_its_units():
    lat, lon = _units(5000)
    tiles = assign_tiles(lat, lon, max_units=400)
    names, counts = np.unique(tiles.astype(str), return_counts=True)
    assert counts.max() <= 400 and len(names) > 10
    assert all(START_LEVEL <= len(t) <= MAX_LEVEL for t in names)
    for t in names[:20]:
        west, south, east, north = quadkey_bounds(t)
        inside = tiles == t
        assert (lon[inside] >= west).all() and (lon[inside] <= east).all()
        assert (lat[inside] >= south).all() and (lat[inside] <= north).all()
    # the dense town is cut finer than the countryside
    town = np.unique(tiles[:2500].astype(str))
    country = np.unique(tiles[2500:].astype(str))
    assert np.mean([len(t) for t in town]) > np.mean([len(t) for t in country])
    # no tile is the ancestor of another: the cells partition the units
    assert not any(a != b and b.startswith(a) for a in names for b in names)


def test_tiles_do_not_depend_on_the_order_of_the_units():
    lat, lon = _units(3000, seed=1)
    order = np.random.default_rng(2).permutation(3000)
    assert (assign_tiles(lat, lon, 200)[order] == assign_tiles(lat[order], lon[order], 200)).all()


def test_a_small_study_is_one_tile_and_quadkeys_match_the_bing_scheme():
    assert set(assign_tiles([-25.4, -25.41], [-54.6, -54.61])) == {"21"}
    # Bing Maps tile system: level-3 tile x=3, y=5 is "213"
    west, south, east, north = quadkey_bounds("213")
    assert west == pytest.approx(-45.0) and east == pytest.approx(0.0)


def test_bad_coordinates_are_refused():
    with pytest.raises(ValueError, match="finite"):
        assign_tiles([np.nan], [0.0])
    with pytest.raises(ValueError, match="max_units"):
        assign_tiles([0.0], [0.0], max_units=0)
