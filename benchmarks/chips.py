"""Chip extraction throughput: local GeoTIFF reads, and Earth Engine fetches against the fake client.

    .venv/bin/python benchmarks/chips.py local                       # 64 px chips from tiled GeoTIFFs
    .venv/bin/python benchmarks/chips.py local --units 20000 --scene-px 8192
    .venv/bin/python benchmarks/chips.py earthengine --latency 0.5 --rate-429 0.3

``local`` times :meth:`GeoTiffSource.read_chips` (reading only, one call for all points),
:func:`extract_chips` into an empty cache (cold: reading, compacting and storing every chip as
Parquet parts of the chip store), :func:`extract_chips` again (warm: verdicts from the store, no
imagery read) and :func:`load_chips` (the stored chips as float32 arrays) for random unit locations on
(a) the shipped Landsat-8 crop (256 px tiles, DEFLATE) and (b) a generated procedural scene
(256 px tiles, DEFLATE) of ``--scene-px`` square.

``earthengine`` times :class:`EarthEngineSource` against the fake client (tests/imagery), which
answers each ``computePixels`` after ``--latency`` seconds, with ``--rate-429`` of the calls
refused as rate-limited. The fake's own pixel rendering is done before timing, so the figure is
the fetch pipeline's (concurrency, retries with backoff, decoding, storing) against that latency.
The ceiling is ``concurrency / (latency * expected attempts)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eocausal.imagery import chipstore  # noqa: E402
from eocausal.imagery.chips import extract_chips, load_chips  # noqa: E402
from eocausal.imagery.geotiff import GeoTiffSource  # noqa: E402

DEMO_CROP = REPO / "eocausal" / "data" / "demo" / "landsat8_itaipu_crop.tif"


def random_units(scene: Path, n: int, size_px: int, seed: int = 0) -> pd.DataFrame:
    with rasterio.open(scene) as ds:
        t, crs, width, height = ds.transform, ds.crs, ds.width, ds.height
    rng = np.random.default_rng(seed)
    cols = rng.uniform(size_px / 2, width - size_px / 2, n)
    rows = rng.uniform(size_px / 2, height - size_px / 2, n)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(t.c + cols * t.a, t.f + rows * t.e)
    return pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "lat": lat, "lon": lon})


def time_local(scene: Path, n_units: int, size_px: int, repeat: int) -> None:
    source = GeoTiffSource(scene)
    units = random_units(scene, n_units, size_px)
    points = list(zip(units["lon"], units["lat"]))
    with rasterio.open(scene) as ds:
        shape = f"{ds.width}x{ds.height} px, {ds.count} bands {ds.dtypes[0]}, tiles {ds.block_shapes[0]}, {ds.compression}"
    coverage = n_units * size_px**2 / (rasterio.open(scene).width * rasterio.open(scene).height)
    print(f"\n{scene.name}: {shape}; {n_units} units, {size_px} px chips (chip area / scene area = {coverage:.2f})")
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        chips = source.read_chips(points, size_px)
        best = max(best, n_units / (time.perf_counter() - t0))
    assert sum(c is not None for c in chips) == n_units
    print(f"  read_chips            {best:8.0f} chips/s  (best of {repeat})")
    best = {"cold": 0.0, "warm": 0.0, "load": 0.0}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            result = extract_chips(units, source, size_px, Path(cache), 0.2)
            best["cold"] = max(best["cold"], n_units / (time.perf_counter() - t0))
            assert result.n_extracted == n_units
            n_parts = len(chipstore.part_paths(Path(cache)))
            stored_mb = sum(p.stat().st_size for p in chipstore.part_paths(Path(cache))) / 1e6
            t0 = time.perf_counter()
            again = extract_chips(units, source, size_px, Path(cache), 0.2)
            best["warm"] = max(best["warm"], n_units / (time.perf_counter() - t0))
            assert again.n_cached == n_units and again.n_extracted == 0
            t0 = time.perf_counter()
            data, _ = load_chips(again.index, Path(cache))
            best["load"] = max(best["load"], len(data) / (time.perf_counter() - t0))
    print(f"  extract_chips cold    {best['cold']:8.0f} chips/s  (best of {repeat}; reading + compacting + storing "
          f"{n_parts} Parquet parts, {stored_mb:.0f} MB)")
    print(f"  extract_chips warm    {best['warm']:8.0f} chips/s  (best of {repeat}; every verdict from the store)")
    print(f"  load_chips            {best['load']:8.0f} chips/s  (best of {repeat}; {len(data)} ok chips as float32)")


def run_local(args) -> None:
    from eocausal.simulate import write_procedural_scene

    print(f"local chip extraction; {os.cpu_count()} CPUs; GDAL_CACHEMAX default")
    time_local(DEMO_CROP, args.units, args.size, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        scene = write_procedural_scene(Path(tmp) / "scene.tif", args.scene_px, args.scene_px, seed=1)
        time_local(scene, args.units, args.size, args.repeat)


def run_earthengine(args) -> None:
    from eocausal.imagery.earthengine import CompositeRecipe, EarthEngineSource, RetryPolicy, chip_grids
    from eocausal.imagery.ee_collections import COLLECTIONS
    from tests.imagery.fake_earthengine import FakeEarthEngine, Faults

    coll = COLLECTIONS["landsat8_9_sr"]
    recipe = CompositeRecipe(coll.name, coll.ee_ids, coll.default_bands, coll.scale, coll.offset, coll.mask,
                             "2020-01-01", "2021-01-01")
    units = random_units(DEMO_CROP, args.units, args.size, seed=2)
    points = list(zip(units["lon"], units["lat"]))

    class PrerenderedFake(FakeEarthEngine):
        """The fake with its answers rendered up front: timing measures our side, not the fake's."""

        def prerender(self, grids):
            self._answers = {self._key(g): FakeEarthEngine.render(self, recipe, g) for g in grids}

        @staticmethod
        def _key(grid):
            t = grid["affineTransform"]
            return grid["crsCode"], t["translateX"], t["translateY"]

        def render(self, recipe_, grid):
            return self._answers[self._key(grid)]

    fake = PrerenderedFake(DEMO_CROP, latency_s=args.latency, faults=Faults(rate_429=args.rate_429), seed=0)
    fake.prerender(chip_grids(points, args.size, 30.0, "utm"))
    retry = RetryPolicy(max_attempts=args.max_attempts, initial_delay_s=args.initial_delay)
    source = EarthEngineSource(recipe, "2020", fake, scale_m=30.0, crs="utm", max_concurrency=args.concurrency,
                               max_requests_per_second=args.max_rps, retry=retry, seed=0)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        result = extract_chips(units, source, args.size, Path(cache), 1.0 - 1e-9)
        seconds = time.perf_counter() - t0
    arrived = int((result.index["reason"] != "fetch_failed").sum())
    expected_attempts = 1.0 / (1.0 - args.rate_429)
    ceiling = min(args.concurrency / (args.latency * expected_attempts), args.max_rps / expected_attempts)
    print(f"earthengine fetch vs fake client: {args.units} units, {args.size} px, latency {args.latency}s, "
          f"{args.rate_429:.0%} 429s, concurrency {args.concurrency}, <= {args.max_rps} req/s, "
          f"backoff from {args.initial_delay}s")
    print(f"  {arrived}/{args.units} chips arrived in {seconds:.1f}s: {args.units / seconds:.1f} chips/s "
          f"(ceiling without backoff {ceiling:.1f} chips/s); requests {fake.calls}, "
          f"retries {source.stats.retries}, max in flight {fake.max_in_flight}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    local = sub.add_parser("local")
    local.add_argument("--units", type=int, default=10_000)
    local.add_argument("--size", type=int, default=64)
    local.add_argument("--scene-px", type=int, default=4096)
    local.add_argument("--repeat", type=int, default=3)
    ee = sub.add_parser("earthengine")
    ee.add_argument("--units", type=int, default=1000)
    ee.add_argument("--size", type=int, default=64)
    ee.add_argument("--latency", type=float, default=0.5)
    ee.add_argument("--rate-429", type=float, default=0.3)
    ee.add_argument("--concurrency", type=int, default=32)
    ee.add_argument("--max-rps", type=float, default=50.0)
    ee.add_argument("--max-attempts", type=int, default=10)
    ee.add_argument("--initial-delay", type=float, default=0.5)
    args = parser.parse_args()
    run_local(args) if args.what == "local" else run_earthengine(args)


if __name__ == "__main__":
    main()
