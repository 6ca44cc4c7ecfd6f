"""Transport: the grid over a region, the study's image pipeline on cell chips, GeoTIFF and map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.warp import transform as warp_transform

from eocausal.embed.rcf import RCFEmbedder
from eocausal.embed.reduce import fit_pca
from eocausal.estimate.cate import FinalStage
from eocausal.estimate.clusters import fit_effect_clusters
from eocausal.estimate.transport import (
    TransportError,
    fitted_embedder,
    imagery_footprint,
    make_grid,
    plot_transport_map,
    predict_grid,
    write_geotiff,
)
from eocausal.imagery.chips import extract_chips, load_chips
from eocausal.imagery.geotiff import GeoTiffSource
from eocausal.simulate import write_procedural_scene


def test_grid_tiles_the_box_with_about_the_requested_cells():
    box = (10.0, 45.0, 10.5, 45.3)
    grid = make_grid(box, 150)
    assert 100 <= len(grid.cells) <= 200
    assert grid.width * grid.height == len(grid.cells)
    assert grid.cells["cell_id"].is_unique
    # cell centres inside the box, and consistent with the raster transform
    assert grid.cells["lon"].between(box[0], box[2]).all() and grid.cells["lat"].between(box[1], box[3]).all()
    t = grid.transform
    c = grid.cells.iloc[7]
    assert c["x"] == pytest.approx(t.c + (c["col"] + 0.5) * t.a)
    assert c["y"] == pytest.approx(t.f + (c["row"] + 0.5) * t.e)
    assert "UTM zone 32N" in grid.crs_wkt  # a projected CRS chosen for a geographic box
    with pytest.raises(TransportError, match="west < east"):
        make_grid((10.5, 45.0, 10.0, 45.3), 10)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_procedural_scene(tmp_path_factory.mktemp("transport_scene") / "scene.tif", 320, 256, seed=9,
                                  zero_border=False)


def test_footprint_of_the_imagery(scene):
    (west, south, east, north), crs_wkt = imagery_footprint([scene])
    with rasterio.open(scene) as src:
        cx, cy = (src.bounds.left + src.bounds.right) / 2, (src.bounds.bottom + src.bounds.top) / 2
        lon, lat = warp_transform(src.crs, "EPSG:4326", [cx], [cy])
        assert rasterio.crs.CRS.from_wkt(crs_wkt) == src.crs
    assert west < lon[0] < east and south < lat[0] < north


def test_cells_beyond_the_units_get_the_study_models_predictions(scene, tmp_path):
    source = GeoTiffSource(scene)
    (west, south, east, north), crs_wkt = imagery_footprint([scene])
    mid = (west + east) / 2
    rng = np.random.default_rng(0)
    # study units in the west half of the scene only
    units = pd.DataFrame({
        "unit_id": [f"U{i}" for i in range(60)],
        "lon": rng.uniform(west + 0.1 * (mid - west), mid - 0.05 * (mid - west), 60),
        "lat": rng.uniform(south + 0.1 * (north - south), north - 0.1 * (north - south), 60),
    })
    cache = tmp_path / "chips"
    index = extract_chips(units, source, 32, cache, 0.2).index
    chips, valid = load_chips(index, cache)
    embedder = RCFEmbedder(n_features=16, seed=0, device="cpu", dtype="float32").fit(chips, valid)
    features = embedder.transform(chips, valid)
    pca = fit_pca(features, 4, seed=0)
    comps = pca.transform(features)
    gamma = 1.0 + comps[:, 0] / comps[:, 0].std() + rng.normal(scale=0.5, size=len(comps))
    final = FinalStage().fit(comps, gamma, shared_scale=np.ones(4, dtype=bool))
    clusters = fit_effect_clusters(comps, gamma, np.full(len(gamma), 0.25), 2)

    # the transport region: the east half, where there are no units
    grid = make_grid((mid, south, east, north), 24, crs_wkt)
    table = predict_grid(
        grid, source, chip_size_px=32, max_nodata_share=0.2, chip_cache=cache, embedder=embedder,
        embedder_key="test", embedding_cache=tmp_path / "emb", pca=pca, final_stage=final, cluster_fit=clusters,
        unit_lonlat=units[["lon", "lat"]].to_numpy(), study_name="s", version="v",
    )
    assert len(table) == len(grid.cells)
    ok = table["status"] == "ok"
    assert ok.sum() >= 0.7 * len(table)
    assert not table["inside_study_hull"].any()  # every cell is beyond the units
    assert (table["distance_to_unit_km"] > 0).all()
    # predictions are exactly the study pipeline applied to the cells' chips
    cells = grid.cells.rename(columns={"cell_id": "unit_id"})
    cell_index = extract_chips(cells[["unit_id", "lat", "lon"]], source, 32, cache, 0.2).index
    cell_chips, cell_valid = load_chips(cell_index, cache)
    expected, expected_se = final.predict(pca.transform(embedder.transform(cell_chips, cell_valid)))
    np.testing.assert_allclose(table.loc[ok, "cate"], expected, rtol=1e-6)
    np.testing.assert_allclose(table.loc[ok, "cate_std_error"], expected_se, rtol=1e-6)
    assert (table.loc[ok, "cate_ci_low"] < table.loc[ok, "cate"]).all()
    memberships = np.array(table.loc[ok, "cluster_membership"].tolist())
    np.testing.assert_allclose(memberships.sum(axis=1), 1.0)
    assert table.loc[~ok, "cate"].isna().all() and table.loc[~ok, "reason"].notna().all()
    # a second call embeds nothing: the cells' features come from the cache
    again = predict_grid(
        grid, source, chip_size_px=32, max_nodata_share=0.2, chip_cache=cache, embedder=None,
        embedder_key="test", embedding_cache=tmp_path / "emb", pca=pca, final_stage=final, cluster_fit=None,
        unit_lonlat=units[["lon", "lat"]].to_numpy(),
    )
    np.testing.assert_allclose(again["cate"], table["cate"])

    tif = write_geotiff(grid, table, tmp_path / "out" / "cate.tif")
    with rasterio.open(tif) as src:
        assert src.count == 3 and src.crs.to_epsg() == 32633
        assert src.descriptions == ("cate", "cate_std_error", "effect_cluster")
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"  # a Cloud-Optimised GeoTIFF
        band = src.read(1)
    r, c = table.loc[ok, "row"].to_numpy(), table.loc[ok, "col"].to_numpy()
    np.testing.assert_allclose(band[r, c], table.loc[ok, "cate"], rtol=1e-6)
    assert np.isnan(band[table.loc[~ok, "row"], table.loc[~ok, "col"]]).all()
    png = plot_transport_map(grid, table, units[["lon", "lat"]].to_numpy(), tmp_path / "out" / "map.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_fitted_embedder_is_cached_and_checked(scene, tmp_path):
    source = GeoTiffSource(scene)
    (west, south, east, north), _ = imagery_footprint([scene])
    rng = np.random.default_rng(1)
    units = pd.DataFrame({"unit_id": [f"U{i}" for i in range(20)],
                          "lon": rng.uniform(west + 0.01, east - 0.01, 20), "lat": rng.uniform(south + 0.01, north - 0.01, 20)})
    index = extract_chips(units, source, 32, tmp_path / "chips", 0.2).index
    chips, valid = load_chips(index, tmp_path / "chips")

    def make():
        return RCFEmbedder(n_features=16, seed=3, device="cpu", dtype="float32")

    stored = make().fit(chips, valid).transform(chips, valid)
    ids = index.loc[index["status"] == "ok", "unit_id"].tolist()
    emb = fitted_embedder(index, tmp_path / "chips", make, "v1", tmp_path / "models", reference=(ids, stored))
    np.testing.assert_allclose(emb.transform(chips[:3], valid[:3]), stored[:3], rtol=1e-5)
    assert (tmp_path / "models" / "v1.pkl").exists()
    # a different feature space (another seed) is caught by the check, and the bad cache dropped
    with pytest.raises(TransportError, match="does not reproduce"):
        fitted_embedder(index, tmp_path / "chips", lambda: RCFEmbedder(n_features=16, seed=4, device="cpu", dtype="float32"),
                        "v2", tmp_path / "models", reference=(ids, stored))
    assert not (tmp_path / "models" / "v2.pkl").exists()
