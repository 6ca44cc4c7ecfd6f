"""Imagery tests never reach Earth Engine: the real entry points fail loudly if anything calls them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_earth_engine(monkeypatch):
    """ee.Initialize and ee.data.computePixels raise; the environment names no client or credentials."""
    import ee

    def refuse(*args, **kwargs):
        raise AssertionError("a test reached the real Earth Engine API")

    monkeypatch.setattr(ee, "Initialize", refuse)
    monkeypatch.setattr(ee.data, "computePixels", refuse)
    for name in ("EOCAUSAL_EE_CLIENT", "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", "EOCAUSAL_EE_PROJECT",
                 "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
