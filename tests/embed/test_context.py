"""The chip-scale check's context components: the sample it reads at scale, and its NaN rows."""

import numpy as np
import pandas as pd

from eocausal.embed.context import context_components, context_sample
from eocausal.imagery.sources import open_source
from eocausal.simulate import write_demo_study, write_procedural_scene
from eocausal.study import load_study


def test_the_sample_is_capped_seeded_and_independent_of_the_units_order():
    ids = [f"u{i}" for i in range(1000)]
    assert context_sample(ids, None, 0).tolist() == list(range(1000))
    assert context_sample(ids, 1000, 0).tolist() == list(range(1000))
    picked = context_sample(ids, 100, 0)
    assert len(picked) == 100 and np.all(np.diff(picked) > 0)
    shuffled = list(np.random.default_rng(1).permutation(ids))
    again = context_sample(shuffled, 100, 0)
    assert {shuffled[i] for i in again} == {ids[i] for i in picked}
    assert {ids[i] for i in context_sample(ids, 100, 1)} != {ids[i] for i in picked}


def _small_study(tmp_path, n_units: int, seed: int, px: int = 600, **analysis):
    """(study with a small embedding, its units as lat/lon): a demo-process study on a procedural scene."""
    scene = write_procedural_scene(tmp_path / "scene.tif", px, px, seed=seed, n_bands=3)
    study_path = write_demo_study(tmp_path / "study", n_units=n_units, seed=seed, scene=scene, chip_size_px=16)
    study = load_study(study_path)
    study = study.model_copy(update={
        "embedding": study.embedding.model_copy(update={"n_features": 64, "pca_components": 8}),
        "analysis": study.analysis.model_copy(update=analysis),
    })
    units = pd.read_csv(study_path.parent / "villages.csv").rename(
        columns={"village_code": "unit_id", "latitude": "lat", "longitude": "lon"})
    return study, units


def test_units_outside_the_sample_get_nan_rows_and_the_sampled_ones_components(tmp_path):
    study, units = _small_study(tmp_path, 120, seed=2)
    source = open_source(study, study.imagery.analysis_period_name())
    out = context_components(units, source, study, tmp_path / "chips", n_components=4, max_units=60)
    sampled = context_sample(units["unit_id"].astype(str).tolist(), 60, study.analysis.seed)
    finite = np.isfinite(out.components).all(axis=1)
    assert out.components.shape == (120, 4)
    assert not finite[np.setdiff1d(np.arange(120), sampled)].any()
    assert finite[sampled].sum() == out.n_usable >= 50


def test_local_windows_are_read_not_stored_and_give_the_stored_paths_components(tmp_path):
    study, units = _small_study(tmp_path, 120, seed=3)
    source = open_source(study, study.imagery.analysis_period_name())
    local = context_components(units, source, study, tmp_path / "local", n_components=4)
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").rglob("*.parquet"))
    stored = context_components(units, source, study, tmp_path / "stored", n_components=4, store=True)
    assert any((tmp_path / "stored").rglob("*"))
    assert local.n_usable == stored.n_usable >= 100
    np.testing.assert_allclose(local.components, stored.components, atol=1e-4)


def test_stored_context_is_read_back_only_for_its_version_and_units(tmp_path):
    from eocausal.lake import read_context, write_context

    path = tmp_path / "image_context" / "period=geotiff.parquet"
    components = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]])
    write_context(path, ["a", "b", "c"], components, "v1")
    np.testing.assert_array_equal(read_context(path, "v1", ["c", "a", "b"]), components[[2, 0, 1]])
    assert read_context(path, "v2", ["a"]) is None  # another version
    assert read_context(path, "v1", ["a", "d"]) is None  # a unit it does not hold
    assert read_context(tmp_path / "none.parquet", "v1", ["a"]) is None


def test_study_context_computes_once_and_is_reused_for_the_same_version(tmp_path):
    from eocausal.embed.context import study_context

    study, units = _small_study(tmp_path, 80, seed=4, px=500, context_components=4)
    first, reused = study_context(units, study, tmp_path / "lake", tmp_path / "chips", "s1", "e1")
    assert not reused and first.shape == (80, 4) and np.isfinite(first).all(axis=1).sum() >= 60
    again, reused = study_context(units.iloc[::-1], study, tmp_path / "lake", tmp_path / "chips", "s1", "e1")
    assert reused
    np.testing.assert_array_equal(again, first[::-1])
    _, reused = study_context(units, study, tmp_path / "lake", tmp_path / "chips", "s1", "e2")  # new embeddings
    assert not reused
    off = study.model_copy(update={"analysis": study.analysis.model_copy(
        update={"context_components": 0, "chip_scale_check": False})})
    assert study_context(units, off, tmp_path / "lake", tmp_path / "chips", "s1", "e1") == (None, False)
