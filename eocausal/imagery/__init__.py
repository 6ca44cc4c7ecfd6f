"""Imagery sources and per-unit chips (DESIGN §4: image_chips)."""

from eocausal.imagery.chips import ChipExtraction, chip_key, extract_chips, load_chips, stored_chip_keys
from eocausal.imagery.geotiff import Chip, GeoTiffSource, ImageryError, valid_mask

__all__ = [
    "Chip",
    "ChipExtraction",
    "GeoTiffSource",
    "ImageryError",
    "chip_key",
    "extract_chips",
    "load_chips",
    "stored_chip_keys",
    "valid_mask",
]
