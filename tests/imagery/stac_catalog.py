"""Static STAC catalogs for tests, cut from a real scene into COG items (one COG per band asset).

:func:`cut_catalog` splits a scene (the shipped Landsat-8 crop, or the shared scene) into a grid
of tiles and writes, for each tile and each acquisition, one Cloud Optimized GeoTIFF per band
(assets ``blue``, ``green``, ``red``), optionally a ``qa_pixel`` asset, and a self-contained
static catalog (relative hrefs: the same folder works on disk and served over HTTP). Items carry
``eo:cloud_cover`` and, unless told otherwise, the projection extension (``proj:code``,
``proj:transform``, ``proj:shape``) so that a reader needs no header request to place them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pystac
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window

BAND_KEYS = ("blue", "green", "red")
COLLECTION = "landsat-c2-l2-test"
PROJ_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EO_EXT = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"


@dataclass
class Acquisition:
    """One date's items: the scene's values transformed by ``values``; optional QA per tile."""

    when: datetime
    cloud_cover: float = 5.0
    values: Callable[[np.ndarray], np.ndarray] | None = None  # [C,H,W] DNs -> [C,H,W] DNs
    qa: Callable[[tuple[int, int]], np.ndarray] | None = None  # tile shape -> QA_PIXEL uint16
    extra_props: dict = field(default_factory=dict)


def write_cog(path: Path, data: np.ndarray, crs, transform, nodata=None, blocksize: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = data.shape
    profile = dict(driver="COG", width=width, height=height, count=count, dtype=data.dtype.name, crs=crs,
                   transform=transform, compress="deflate", blocksize=blocksize, overviews="NONE")
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def cut_catalog(scene: Path, out: Path, tiles: tuple[int, int] = (2, 2),
                acquisitions: list[Acquisition] | None = None, with_proj: bool = True,
                collection_id: str = COLLECTION) -> Path:
    """Write the catalog under ``out``; returns the path of ``catalog.json``."""
    acquisitions = acquisitions or [Acquisition(datetime(2020, 5, 18, 13, 30, tzinfo=timezone.utc))]
    with rasterio.open(scene) as src:
        data, crs, transform = src.read(), src.crs, src.transform
    _, height, width = data.shape
    rows, cols = tiles
    catalog = pystac.Catalog(id="test-catalog", description="COG items cut from a real Landsat-8 scene")
    coll = pystac.Collection(
        id=collection_id, description="test collection",
        extent=pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                             pystac.TemporalExtent([[acquisitions[0].when, None]])),
    )
    catalog.add_child(coll)
    row_edges = np.linspace(0, height, rows + 1).astype(int)
    col_edges = np.linspace(0, width, cols + 1).astype(int)
    for a, acq in enumerate(acquisitions):
        values = acq.values(data) if acq.values else data
        for r in range(rows):
            for c in range(cols):
                win = Window(col_edges[c], row_edges[r], col_edges[c + 1] - col_edges[c],
                             row_edges[r + 1] - row_edges[r])
                t = rasterio.windows.transform(win, transform)
                block = values[:, row_edges[r]:row_edges[r + 1], col_edges[c]:col_edges[c + 1]]
                item_id = f"T{r}{c}_{acq.when:%Y%m%d}"
                folder = out / collection_id / item_id
                bounds = rasterio.windows.bounds(win, transform)
                west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
                geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                                [west, north], [west, south]]]}
                props = {"eo:cloud_cover": acq.cloud_cover, **acq.extra_props}
                if with_proj:
                    props.update({"proj:code": f"EPSG:{crs.to_epsg()}", "proj:transform": list(t)[:6],
                                  "proj:shape": [block.shape[1], block.shape[2]]})
                item = pystac.Item(item_id, geometry, [west, south, east, north], acq.when, props,
                                   stac_extensions=[EO_EXT] + ([PROJ_EXT] if with_proj else []))
                for b, key in enumerate(BAND_KEYS[: block.shape[0]]):
                    write_cog(folder / f"{key}.tif", block[b:b + 1], crs, t)
                    item.add_asset(key, pystac.Asset(f"./{key}.tif", media_type=pystac.MediaType.COG,
                                                     roles=["data"]))
                if acq.qa is not None:
                    write_cog(folder / "qa_pixel.tif", acq.qa((block.shape[1], block.shape[2]))[None], crs, t)
                    item.add_asset("qa_pixel", pystac.Asset("./qa_pixel.tif", media_type=pystac.MediaType.COG,
                                                            roles=["cloud"]))
                coll.add_item(item)
    catalog.normalize_hrefs(str(out))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def item_dicts(catalog_json: Path, base_url: str, root: Path) -> list[dict]:
    """The catalog's items as API features, asset hrefs made absolute URLs under ``base_url``."""
    cat = pystac.Catalog.from_file(str(catalog_json))
    out = []
    for item in cat.get_items(recursive=True):
        d = item.to_dict(include_self_link=False, transform_hrefs=False)
        item_dir = Path(item.get_self_href()).parent
        for asset in d["assets"].values():
            target = (item_dir / asset["href"]).resolve().relative_to(root.resolve()).as_posix()
            asset["href"] = f"{base_url}/{target}"
        d["links"] = []
        d["collection"] = item.collection_id
        out.append(d)
    return out
