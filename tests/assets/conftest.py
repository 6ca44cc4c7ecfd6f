"""Fixtures for the Dagster layer: small studies built fast, and one full run of the real graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eocausal.simulate import write_demo_study, write_procedural_scene


def small_study(root: Path, n_units: int = 240, seed: int = 3, **overrides) -> Path:
    """A demo-process study on a small procedural scene, with settings sized for tests."""
    scene = write_procedural_scene(root / "scene_src" / "scene.tif", width=640, height=560, seed=seed)
    study_path = write_demo_study(root / "study", n_units=n_units, seed=seed, scene=scene, chip_size_px=32)
    doc = yaml.safe_load(study_path.read_text())
    doc["embedding"].update({"n_features": 132, "batch_size": 128})  # 44 filters x 3 pooling scales
    doc["analysis"].update({"folds": 3, "image_components": 16})
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    study_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return study_path


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """The whole graph materialised once on a small study (the end-to-end fixture)."""
    from assets.runner import run_study

    root = tmp_path_factory.mktemp("e2e")
    study_path = small_study(root)
    outcome = run_study(study_path)
    return study_path, outcome
