"""Optional parts: a study that needs one that is not installed says how to install it."""

from __future__ import annotations

import sys

import pytest

from eocausal.imagery.earthengine import EarthEngineApi, EarthEngineError, load_credentials


@pytest.mark.parametrize("missing", ["ee", "google.auth"])
def test_earthengine_without_its_extra_names_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(EarthEngineError, match=r"pip install 'eocausal\[earthengine\]'"):
        load_credentials()
    with pytest.raises(EarthEngineError, match=r"eocausal\[earthengine\]"):
        EarthEngineApi().initialize(project="p", high_volume=False, timeout_s=1.0)
