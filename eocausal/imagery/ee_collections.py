"""The Earth Engine collections a study can name, and how each is masked and scaled.

Pure data (no ``ee`` import), so the study contract can validate names without the client
library being initialised. :mod:`eocausal.imagery.earthengine` turns a :class:`CollectionSpec`
into a per-period composite expression.
"""

from __future__ import annotations

from dataclasses import dataclass

# Cloud/shadow masks: how a pixel of one image is judged "clear" (see earthengine.build_composite).
MASK_LANDSAT_QA_PIXEL = "landsat_qa_pixel"
MASK_S2_SCL = "sentinel2_scl"
MASK_VIIRS_CF_CVG = "viirs_cf_cvg"
# Sentinel-2 judged by Cloud Score+ (imagery.cloud_mask: cloud_score_plus): a pixel is clear when
# the linked image's cs_cdf >= imagery.cloud_score_threshold; "observed" stays SCL != 0.
MASK_S2_CLOUD_SCORE_PLUS = "sentinel2_cloud_score_plus"

# imagery.cloud_mask values: the collection's own mask (SCL for Sentinel-2), or Cloud Score+.
CLOUD_MASK_SCL = "scl"
CLOUD_MASK_CLOUD_SCORE_PLUS = "cloud_score_plus"
# Cloud Score+ for the harmonized Sentinel-2 archive, matched to S2 images by system:index.
CLOUD_SCORE_PLUS_ID = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
CLOUD_SCORE_PLUS_BAND = "cs_cdf"
CLOUD_SCORE_PLUS_DEFAULT_THRESHOLD = 0.60  # Google's recommended clear threshold on cs_cdf

# Landsat Collection 2 QA_PIXEL bits: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow.
LANDSAT_QA_FILL_BIT = 0
LANDSAT_QA_CLOUD_BITS = (1, 2, 3, 4)

# Sentinel-2 scene classification (SCL) classes kept as clear: 2 dark area, 4 vegetation,
# 5 bare soil, 6 water, 7 unclassified, 11 snow/ice. Dropped: 0 no data, 1 saturated or
# defective, 3 cloud shadow, 8/9 cloud medium/high probability, 10 thin cirrus.
S2_SCL_CLEAR_CLASSES = (2, 4, 5, 6, 7, 11)
S2_SCL_NO_DATA_CLASS = 0


@dataclass(frozen=True)
class CollectionSpec:
    name: str  # the study's name for it (imagery.collection)
    ee_ids: tuple[str, ...]  # Earth Engine ImageCollection ids, merged
    bands: tuple[str, ...]  # measurement bands a study may select
    default_bands: tuple[str, ...]
    scale: float  # physical value = stored value * scale + offset
    offset: float
    native_scale_m: float  # default imagery.scale_m
    mask: str
    description: str


_LANDSAT_SR_BANDS = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
# Landsat C2 L2 surface reflectance: reflectance = DN * 0.0000275 - 0.2 (USGS product guide).
_LANDSAT_SR = dict(
    bands=_LANDSAT_SR_BANDS,
    default_bands=("SR_B2", "SR_B3", "SR_B4"),  # blue, green, red: the demo crop's order
    scale=0.0000275,
    offset=-0.2,
    native_scale_m=30.0,
    mask=MASK_LANDSAT_QA_PIXEL,
)

COLLECTIONS: dict[str, CollectionSpec] = {
    spec.name: spec
    for spec in (
        CollectionSpec(
            name="landsat8_sr",
            ee_ids=("LANDSAT/LC08/C02/T1_L2",),
            description="Landsat 8 Collection 2 Tier 1 Level 2 surface reflectance",
            **_LANDSAT_SR,
        ),
        CollectionSpec(
            name="landsat9_sr",
            ee_ids=("LANDSAT/LC09/C02/T1_L2",),
            description="Landsat 9 Collection 2 Tier 1 Level 2 surface reflectance",
            **_LANDSAT_SR,
        ),
        CollectionSpec(
            name="landsat8_9_sr",
            ee_ids=("LANDSAT/LC08/C02/T1_L2", "LANDSAT/LC09/C02/T1_L2"),
            description="Landsat 8 and 9 Collection 2 Level 2 surface reflectance, merged",
            **_LANDSAT_SR,
        ),
        CollectionSpec(
            name="sentinel2_sr",
            ee_ids=("COPERNICUS/S2_SR_HARMONIZED",),
            bands=("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
            default_bands=("B2", "B3", "B4"),
            # Harmonized: the 2022 processing-baseline offset is already removed.
            scale=0.0001,
            offset=0.0,
            native_scale_m=10.0,
            mask=MASK_S2_SCL,
            description="Sentinel-2 MSI Level-2A surface reflectance (harmonized)",
        ),
        CollectionSpec(
            name="viirs_monthly",
            ee_ids=("NOAA/VIIRS/DNB/MONTHLY_V1/VCMSLCFG",),
            bands=("avg_rad",),
            default_bands=("avg_rad",),
            scale=1.0,
            offset=0.0,
            native_scale_m=463.83,
            mask=MASK_VIIRS_CF_CVG,
            description="VIIRS Day/Night Band monthly composites (stray-light corrected), nW/cm2/sr",
        ),
    )
}


def collection(name: str) -> CollectionSpec:
    try:
        return COLLECTIONS[name]
    except KeyError:
        raise ValueError(f"unknown Earth Engine collection {name!r}; known: {sorted(COLLECTIONS)}") from None
