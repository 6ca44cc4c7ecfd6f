"""The study contract's `heterogeneity` section: defaults, the on/off shorthand, validation."""

from __future__ import annotations

import pytest
import yaml

from eocausal.study import StudyError, load_study

BASE = {
    "name": "s",
    "survey": {"path": "v.csv", "unit_id": "id", "lat": "lat", "lon": "lon", "treatment": "d", "outcome": "y"},
    "imagery": {"source": "geotiff", "path": "img/"},
    "analysis": {"feature_sets": ["none", "image"]},
}


def _load(tmp_path, **extra):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**BASE, **extra}))
    return load_study(tmp_path / "study.yaml")


def test_defaults(tmp_path):
    het = _load(tmp_path).heterogeneity
    assert het.enabled and het.feature_sets == ["tabular", "image", "tabular+image"]
    assert het.clusters == 2 and het.learner == "linear" and het.rate_bootstrap == 200
    assert het.transport.bbox is None and het.transport.cells == 250


def test_on_off_shorthand_and_options(tmp_path):
    assert _load(tmp_path, heterogeneity=False).heterogeneity.enabled is False
    assert _load(tmp_path, heterogeneity=True).heterogeneity.enabled is True
    het = _load(tmp_path, heterogeneity={"clusters": "auto", "transport": {"bbox": [10, 45, 10.5, 45.3], "cells": 50}})
    assert het.heterogeneity.clusters == "auto"
    assert het.heterogeneity.transport.bbox == [10, 45, 10.5, 45.3]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"clusters": 0}, "clusters"),
        ({"clusters": "many"}, "clusters"),
        ({"feature_sets": []}, "feature_sets"),
        ({"feature_sets": ["none"]}, "feature_sets"),
        ({"transport": {"bbox": [10, 45, 9, 46]}}, "bbox"),
        ({"transport": {"bbox": [10, 45]}}, "bbox"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_sections_are_rejected(tmp_path, section, message):
    with pytest.raises(StudyError, match=message):
        _load(tmp_path, heterogeneity=section)


def test_the_cate_version_follows_the_nuisance_options_and_keeps_the_defaults(tmp_path):
    # The CATE's pseudo-outcomes take the ATE stage's nuisance options, so each one set moves its
    # version; a study that leaves them at their defaults keeps the version it had before they existed.
    from eocausal.heterogeneity import Truth, _analysis_part, cate_version

    default = _load(tmp_path)
    # context_components: the CATE's nuisances adjust for the context window as the headline does (cate-3).
    assert set(_analysis_part(default)) == {"folds", "seed", "propensity_clip", "image_components", "spatial_block_km",
                                            "context_components"}
    versions = {cate_version(default, {}, Truth())}
    for option in ({"outcome_arms": "separate"}, {"propensity_fit": "calibrated"},
                   {"learners": {"outcome": {"name": "boosting"}}}, {"context_components": 0}):
        versions.add(cate_version(_load(tmp_path, analysis={**BASE["analysis"], **option}), {}, Truth()))
    assert len(versions) == 5
