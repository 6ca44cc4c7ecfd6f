"""`eocausal run` on a contract-following study made elsewhere: other column names, a Parquet
survey, a UTM GeoTIFF (southern hemisphere) whose nodata 0 is undeclared, units partly outside
the valid area."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import rasterio
import yaml
from rasterio.warp import transform as warp_transform

from eocausal.cli import main as cli_main
from eocausal.simulate import write_procedural_scene


def make_foreign_study(root, n_units=300, seed=11, chip_size_px=32, n_features=64, size=(700, 600)):
    scene = write_procedural_scene(root / "rasters" / "utm_scene.tif", width=size[0], height=size[1], seed=seed,
                                   crs="EPSG:32736", zero_border=True)
    rng = np.random.default_rng(seed)
    with rasterio.open(scene) as src:
        assert src.nodata is None  # undeclared, like many real files
        data = src.read().astype(float)
        left, bottom, right, top = src.bounds
        xs = rng.uniform(left, right, n_units)
        ys = rng.uniform(bottom, top, n_units)
        t = src.transform  # north-up: column from x, row from y
        cols = np.floor((xs - t.c) / t.a).astype(int)
        rows = np.floor((ys - t.f) / t.e).astype(int)
        lons, lats = warp_transform(src.crs, "EPSG:4326", xs, ys)
    brightness = data.mean(axis=0)
    rows, cols = np.clip(rows, 0, brightness.shape[0] - 1), np.clip(cols, 0, brightness.shape[1] - 1)
    conf = np.array([brightness[max(r - 8, 0):r + 8, max(c - 8, 0):c + 8].mean() for r, c in zip(rows, cols)])
    z = (conf - conf.mean()) / (conf.std() + 1e-9)
    treat = (rng.random(n_units) < 1 / (1 + np.exp(-z))).astype(int)
    outcome = 2.0 * z + 1.0 * treat + rng.normal(size=n_units)
    survey = pd.DataFrame({
        "HH Cluster": [f"c-{i:05d}" for i in range(n_units)],
        "gps_lat": lats, "gps_lon": lons,
        "programme": treat, "consumption": outcome,
        "dist road (km)": rng.gamma(2.0, 3.0, n_units),
    })
    survey.to_parquet(root / "clusters.parquet", index=False)
    doc = {
        "name": "foreign_study",
        "survey": {"path": "clusters.parquet", "unit_id": "HH Cluster", "lat": "gps_lat", "lon": "gps_lon",
                   "treatment": "programme", "outcome": "consumption", "covariates": ["dist road (km)"]},
        "imagery": {"source": "geotiff", "path": "rasters", "chip_size_px": chip_size_px, "max_nodata_share": 0.3,
                    "min_usable_share": 0.3},
        "embedding": {"method": "rcf", "n_features": n_features, "seed": 1},
        "analysis": {"estimators": ["difference_in_means", "aipw", "dml"],
                     "feature_sets": ["none", "tabular+image"], "folds": 3, "image_components": 8},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "study.yaml"


def test_run_on_a_study_made_elsewhere(tmp_path, capsys):
    study = make_foreign_study(tmp_path)
    assert cli_main(["run", str(study), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["estimator"], r["feature_set"]) for r in records} == {
        (e, f) for e in ["difference_in_means", "aipw", "dml"] for f in ["none", "tabular+image"]}
    from eocausal.warehouse import query

    db = tmp_path / "eocausal_work" / "published" / "warehouse.duckdb"
    excluded = query(db, "select reason, count(*) as n from marts.unit_exclusions group by reason")
    analysed = query(db, "select count(*) as n, min(cov_dist_road_km) as m from marts.analysis_units")
    # units placed in the undeclared zero border were detected and excluded, with a reason
    assert excluded["n"].sum() > 0 and excluded["reason"].notna().all()
    assert analysed["n"].iloc[0] + excluded["n"].sum() == 300
    assert records[0]["n"] == analysed["n"].iloc[0]
