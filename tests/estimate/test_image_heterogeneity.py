"""Heterogeneity seen through images, with the library end to end (chips -> RCF embedding -> DR
pseudo-outcomes -> ...): the simulator's clustered-effect process and the effect-cluster model
recovering its clusters (adjusted Rand index), and on the demo study the DR-learner's RATE and PEHE.

The fast tests use a procedural scene; the slow ones the shipped Landsat-8 demo scene (the
figures quoted for the demo; print them with `pytest -m slow -s`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from eocausal.embed.embeddings import compute_embeddings
from eocausal.estimate.cate import estimate_cate
from eocausal.estimate.clusters import fit_effect_clusters, noise_variance
from eocausal.imagery.chips import extract_chips
from eocausal.imagery.sources import open_source
from eocausal.simulate import DEMO_CHIP_SIZE_PX, ClusteredEffect, write_demo_study, write_procedural_scene
from eocausal.study import load_study
from eocausal.survey import covariate_column, load_survey


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_procedural_scene(tmp_path_factory.mktemp("cluster_scene") / "scene.tif", 900, 800, seed=21)


def test_clustered_process_changes_only_the_effect(scene, tmp_path):
    linear = write_demo_study(tmp_path / "linear", n_units=300, seed=4, scene=scene, chip_size_px=32)
    clustered = write_demo_study(tmp_path / "clustered", n_units=300, seed=4, scene=scene, chip_size_px=32,
                                 effect_clusters=3)
    lin_truth = pd.read_csv(linear.parent / "truth_units.csv")
    clu_truth = pd.read_csv(clustered.parent / "truth_units.csv")
    assert "effect_cluster" not in lin_truth.columns
    classes = clu_truth["effect_cluster"].to_numpy()
    # quantile classes: equal sizes up to ties at a cut
    assert np.abs(np.bincount(classes) - 100).max() <= 3
    np.testing.assert_allclose(clu_truth["tau"], np.array([-2.0, 1.0, 4.0])[classes])
    # classes are ordered by the built-up share: class means increase
    means = clu_truth.groupby("effect_cluster")["confounder"].mean().to_numpy()
    assert np.all(np.diff(means) > 0)
    # everything but the effect (and so the outcome) is drawn as in the linear-effect demo
    lin_survey = pd.read_csv(linear.parent / "villages.csv")
    clu_survey = pd.read_csv(clustered.parent / "villages.csv")
    for col in ("village_code", "latitude", "longitude", "aid_received", "market_access", "household_size"):
        pd.testing.assert_series_equal(lin_survey[col], clu_survey[col])
    np.testing.assert_allclose(lin_truth["y0"], clu_truth["y0"])
    import json

    truth = json.loads((clustered.parent / "truth.json").read_text())
    assert truth["effect_clusters"]["k"] == 3
    assert truth["effect_clusters"]["class_counts"] == np.bincount(classes).tolist()
    assert truth["ate"] == pytest.approx(clu_truth["tau"].mean(), abs=1e-6)
    assert "effect_clusters" not in json.loads((linear.parent / "truth.json").read_text())


def test_clustered_effect_helpers():
    c = ClusteredEffect.with_k(2)
    assert c.effects == (-0.5, 2.5) and c.k == 2
    assert ClusteredEffect.with_k(4).effects == (-3.5, -0.5, 2.5, 5.5)
    np.testing.assert_array_equal(c.classes(np.array([0.1, 0.9, 0.2, 0.8])), [0, 1, 0, 1])
    with pytest.raises(ValueError):
        ClusteredEffect.with_k(1)


def _image_study(root: Path, k: int | None, scene: Path | None, n_units: int, chip_size_px: int, n_features: int,
                 cache: Path, feature_sets=("image",), image_components: int = 32):
    """Chips, embeddings and the CATE stage of a clustered study, with the library (no Dagster).
    Studies of the same scene, seed and size share units, so ``cache`` serves their chips and
    embeddings to each other (only the outcomes differ with K)."""
    import yaml

    seed = 5 if k else 0  # the linear-effect study is the demo itself (seed 0)
    study_path = write_demo_study(root / f"study_k{k}", n_units=n_units, seed=seed, scene=scene,
                                  chip_size_px=chip_size_px, effect_clusters=k)
    doc = yaml.safe_load(study_path.read_text())
    doc["embedding"].update({"n_features": n_features})
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    study = load_study(study_path)
    survey, _ = load_survey(study.survey_path, study.survey)
    index = extract_chips(survey[["unit_id", "lat", "lon"]], open_source(study), chip_size_px, cache / "chips",
                          study.imagery.max_nodata_share).index
    emb = compute_embeddings(index, cache / "chips", cache / "embeddings", study.embedding)
    units = survey.set_index("unit_id").loc[emb.unit_ids].reset_index()
    units["embedding"] = list(emb.features)
    covariates = [covariate_column(c) for c in study.survey.covariates]
    truth = pd.read_csv(study_path.parent / "truth_units.csv", dtype={"unit_id": str}).set_index("unit_id")
    truth = truth.loc[units["unit_id"]]
    res = estimate_cate(units, covariates, feature_sets=feature_sets, folds=5, image_components=image_components,
                        n_bootstrap=200 if k is None else 20, truth_tau=truth["tau"].to_numpy())
    return units, res, truth["effect_cluster"].to_numpy() if k else None


def _fit_and_score(units, res, true_classes, k):
    po = res.pseudo
    nu = noise_variance(units["outcome"], units["treatment"], po.mu0, po.mu1, po.propensity)
    fit = fit_effect_clusters(res.features.image, po.score, nu, k, init_effect=res.fits["image"].tau_oof,
                              penalty=0.1)
    membership = fit.membership(res.features.image).argmax(axis=1)
    posterior = fit.posterior(res.features.image, po.score, nu).argmax(axis=1)
    return fit, adjusted_rand_score(true_classes, membership), adjusted_rand_score(true_classes, posterior)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster_cache")


@pytest.mark.parametrize("k, floor", [(2, 0.6), (3, 0.6)])
def test_effect_clusters_are_recovered_from_images(scene, shared_cache, tmp_path, k, floor):
    units, res, true_classes = _image_study(tmp_path, k, scene, n_units=800, chip_size_px=32, n_features=132,
                                            cache=shared_cache)
    fit, ari_membership, ari_posterior = _fit_and_score(units, res, true_classes, k)
    print(f"procedural scene K={k}: ARI membership {ari_membership:.3f}, posterior {ari_posterior:.3f}, mu {fit.mu}")
    assert ari_membership > floor
    assert ari_posterior > floor - 0.1
    effects = np.asarray(ClusteredEffect.with_k(k).effects)
    assert np.all(np.abs(fit.mu - effects) < 1.0)  # misassigned units pull the cluster effects together


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])
def test_effect_clusters_on_the_landsat_demo_scene(tmp_path_factory, k):
    """The demo's real scene, its 1500 units and chips (the figures quoted in the report)."""
    cache = Path(tmp_path_factory.getbasetemp()) / "landsat_cluster_cache"
    units, res, true_classes = _image_study(tmp_path_factory.mktemp(f"landsat_k{k}"), k, None, n_units=1500,
                                            chip_size_px=DEMO_CHIP_SIZE_PX, n_features=1536, cache=cache,
                                            image_components=64)
    fit, ari_membership, ari_posterior = _fit_and_score(units, res, true_classes, k)
    print(f"Landsat demo scene K={k}: ARI membership {ari_membership:.3f}, posterior {ari_posterior:.3f}, mu {fit.mu}")
    assert ari_membership > {2: 0.55, 3: 0.45}[k]
    assert ari_posterior > {2: 0.5, 3: 0.45}[k]


@pytest.mark.slow
def test_demo_study_rate_and_pehe(tmp_path_factory):
    """The demo study (linear effect in the built-up share): ranking units by their held-out
    image CATE finds larger effects (RATE/AUTOC CI above 0), and image+tabular features estimate
    the CATE better than tabular ones (PEHE)."""
    cache = Path(tmp_path_factory.getbasetemp()) / "landsat_demo_cache"
    _, res, _ = _image_study(tmp_path_factory.mktemp("demo"), None, None, n_units=1500,
                             chip_size_px=DEMO_CHIP_SIZE_PX,
                             n_features=1024, cache=cache, feature_sets=("tabular", "image", "tabular+image"),
                             image_components=64)
    ev = res.evaluation.set_index(["feature_set", "metric"])
    print(res.evaluation[["feature_set", "metric", "estimate", "ci_low", "ci_high"]].to_string())
    autoc = ev.loc[("tabular+image", "rate_autoc")]
    assert autoc["ci_low"] > 0
    assert ev.loc[("tabular+image", "pehe"), "estimate"] < ev.loc[("tabular", "pehe"), "estimate"]
