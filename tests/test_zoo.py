"""The confounder zoo (eocausal.zoo): one small design end to end, at a loose tolerance."""

import numpy as np
import pytest

from eocausal import zoo


@pytest.fixture(scope="module")
def small_design(tmp_path_factory):
    design = zoo.ZooDesign("test_demo_dark_300", "demo", "dark_share", 300, chip_px=32, n_units=400,
                           treated_share=0.4)
    return zoo.prepare(design, tmp_path_factory.mktemp("zoo"))


def test_confounders_are_disk_means_of_the_pixel_layers():
    valid = np.ones((41, 41), dtype=bool)
    layer = np.zeros((41, 41))
    layer[20, 20] = 1.0
    mean = zoo.disk_mean(layer, valid, 3)
    assert mean[20, 20] == pytest.approx(1.0 / zoo._disk(3).sum())
    assert mean[20, 24] == pytest.approx(0.0, abs=1e-9)  # outside the disk


def test_design_knows_whether_its_confounder_fits_the_chip():
    assert zoo.design_by_name("demo_bright_750").within_chip()
    assert not zoo.design_by_name("landsat_bright_3000_beyond").within_chip()
    assert sum(d.within_chip() for d in zoo.ZOO) >= 12 and len({d.scene for d in zoo.ZOO}) == 3


def test_default_representation_carries_the_confounder(small_design):
    assert small_design.r2["default"] > 0.85
    assert set(small_design.components) == set(zoo.REPRESENTATIONS)
    assert small_design.context_components.shape[0] == small_design.z.size


def test_image_adjustment_removes_most_of_the_bias(small_design):
    rows = [r for rep in range(3) for r in zoo.run_replication(small_design, rep)]
    import pandas as pd

    frame = pd.DataFrame(rows)
    err = frame["estimate"] - frame["truth"]
    naive = err[(frame["feature_set"] == "none")].abs().mean()
    adjusted = err[(frame["representation"] == "default") & (frame["feature_set"] == "tabular+image")
                   & (frame["estimator"] == "aipw")].abs().mean()
    headline = frame[(frame["representation"] == "default") & (frame["feature_set"] == "tabular+image")
                     & (frame["estimator"] == "aipw")]
    assert naive > 1.0
    # Loose (three replications of 400 units): most of the naive bias gone, within ~2 SE of the truth.
    assert adjusted < 0.4 * naive
    assert (headline["estimate"] - headline["truth"]).abs().mean() < 2.5 * headline["std_error"].mean()
    assert headline["specification_z"].notna().all() and headline["chip_scale_z"].notna().all()


def test_the_comparisons_keep_their_own_outcome_models_per_arm(small_design):
    # The reference is the per-arm RidgeCV and the previous default fitted each arm alone:
    # the product's borrowing default must not leak into them.
    res, _ = zoo.comparison_fit(small_design, zoo.replication_draw(small_design, 0), "reference", 0)
    assert res["aipw"].diagnostics["outcome_arms"].startswith("separate")



def test_results_merge_design_by_design(small_design, tmp_path):
    import json

    import pandas as pd

    frame = pd.DataFrame(zoo.run_replication(small_design, 0))
    zoo._merge_results(tmp_path, frame.assign(estimate=frame["estimate"] + 1.0), small_design, 1, 5, 1, 1.0, None, None)
    result = zoo._merge_results(tmp_path, frame, small_design, 1, 5, 1, 2.0, None, None)
    replicates = pd.read_csv(tmp_path / "replications.csv")
    # The rerun replaced the design's rows (not appended to them) and rewrote every summary.
    assert len(replicates) == len(frame)
    np.testing.assert_allclose(replicates["estimate"], frame["estimate"], rtol=1e-5)
    assert small_design.design.name in (tmp_path / "zoo.md").read_text() and (tmp_path / "zoo.png").exists()
    entry = json.loads((tmp_path / "settings.json").read_text())["designs"][small_design.design.name]
    assert entry["seconds"] == 2.0 and entry["run_at"]
    assert len(result["summary"]) == len(pd.read_csv(tmp_path / "summary.csv"))
