"""Which imagery source a study uses: one factory for the chip stage, and what sources share.

A chip source has ``fingerprint()`` (a content hash of the imagery and how it is read) and
``read_chips(points, size_px)``; a source that fetches over the network also has
``iter_chips(points, size_px)``, yielding results as they arrive so that each is cached at once.
A unit a source cannot image for a reason other than coverage comes back as a
:class:`ChipFailure`; it is recorded, not cached, so a re-run tries it again.

The Earth Engine client is chosen at this boundary: by default the real one
(:class:`eocausal.imagery.earthengine.EarthEngineApi`, credentials from the environment); the
environment variable ``EOCAUSAL_EE_CLIENT=package.module:factory`` names a zero-argument factory
to use instead (tests inject a fake client this way, through the whole Dagster graph).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from eocausal.imagery.earthengine import EarthEngineClient
    from eocausal.imagery.geotiff import Chip
    from eocausal.study import Study

EE_CLIENT_ENV = "EOCAUSAL_EE_CLIENT"


@dataclass(frozen=True)
class ChipFailure:
    """A unit that could not be imaged this time (e.g. a request rejected by the server)."""

    reason: str  # a short machine-readable reason, e.g. "fetch_failed"
    detail: str  # what went wrong, in words (never credentials)


@runtime_checkable
class ChipSource(Protocol):
    def fingerprint(self) -> str: ...

    def read_chips(self, points: Iterable[tuple[float, float]], size_px: int) -> list["Chip | ChipFailure | None"]: ...


@runtime_checkable
class StreamingChipSource(ChipSource, Protocol):
    def iter_chips(
        self, points: list[tuple[float, float]], size_px: int
    ) -> Iterator[tuple[int, "Chip | ChipFailure | None"]]: ...


def earthengine_client_from_env() -> "EarthEngineClient":
    """The Earth Engine client named by ``EOCAUSAL_EE_CLIENT``, else the real API client."""
    target = os.environ.get(EE_CLIENT_ENV, "").strip()
    if not target:
        from eocausal.imagery.earthengine import EarthEngineApi

        return EarthEngineApi()
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{EE_CLIENT_ENV}={target!r}: expected 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory()


def open_source(study: "Study", period: str | None = None, ee_client: "EarthEngineClient | None" = None) -> ChipSource:
    """The chip source a study names (``imagery.source``); for Earth Engine and STAC, one period's composite.

    ``period`` is a period name (None = the analysis period); a GeoTIFF study has the one period
    ``geotiff`` (its files as they are). An unknown name is a StudyError naming the study's
    periods. ``ee_client`` overrides the client chosen by :func:`earthengine_client_from_env`.
    """
    spec = study.imagery
    if period is not None:
        spec.check_period_name(period)
    if spec.source == "geotiff":
        from eocausal.imagery.geotiff import GeoTiffSource

        return GeoTiffSource(study.imagery_location, nodata=spec.nodata, bands=spec.bands,
                             band_names=spec.band_names)
    if spec.source == "stac":
        from eocausal.imagery.stac import StacSource

        return StacSource.from_spec(spec, spec.period(period), study.stac_catalog)
    if spec.source == "earthengine":
        from eocausal.imagery.earthengine import EarthEngineSource

        client = ee_client if ee_client is not None else earthengine_client_from_env()
        if spec.export is not None:  # batch export per block (eocausal.imagery.ee_export)
            from eocausal.imagery.ee_export import EarthEngineExportSource

            return EarthEngineExportSource.from_spec(spec, spec.period(period), client)
        return EarthEngineSource.from_spec(spec, spec.period(period), client)
    raise ValueError(f"unknown imagery.source {spec.source!r}")
