"""Imagery tests never reach Earth Engine: the real entry points fail loudly if anything calls them.

A test marked ``ee_http`` runs earthengine-api's real request path against a fake HTTP transport
(nothing leaves the process): the entry points stay real for it, and ``ee``'s state is reset after.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_earth_engine(monkeypatch, request):
    """ee.Initialize and ee.data.computePixels raise; the environment names no client or credentials."""
    import ee

    for name in ("EOCAUSAL_EE_CLIENT", "EOCAUSAL_EE_SERVICE_ACCOUNT_KEY", "EOCAUSAL_EE_PROJECT",
                 "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    if request.node.get_closest_marker("ee_http"):
        yield
        ee.Reset()
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a test reached the real Earth Engine API")

    monkeypatch.setattr(ee, "Initialize", refuse)
    monkeypatch.setattr(ee.data, "computePixels", refuse)
    yield
