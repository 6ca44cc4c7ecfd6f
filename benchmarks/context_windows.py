"""The context windows' cost: read, averaged and embedded a batch at a time (what a local GeoTIFF
gets) against the same windows stored in the chip store and read back (what a remote source gets,
and what every source got until session 15). Same study, machine and embedder, one run.

    .venv/bin/python benchmarks/context_windows.py                 # 10,000 units, 4000 px 6-band scene
    .venv/bin/python benchmarks/context_windows.py --units 2000 --scene-px 2000

Builds the scale benchmark's study (``benchmarks/scale.py``: the demo process on a procedural
scene, 64 px chips), then times ``eocausal.embed.context.context_components`` (every unit, the
default 32 components) twice on the GeoTIFF source: as a local source gets it, and with
``store=True``, as a remote source gets it (its windows extracted to an empty chip store at twice
the chip's side, then read back). Prints the
seconds of each, their ratio, the store's bytes, the largest difference between the two paths'
components (zero up to ``FIT_CHIPS`` units: the same windows and embedder; above, the embedders are
fitted on different samples) and the share of one's variance in the other's linear span.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from scale import build_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--scene-px", type=int, default=4000)
    parser.add_argument("--components", type=int, default=32)
    args = parser.parse_args()

    from eocausal.embed.context import context_components
    from eocausal.imagery.sources import open_source
    from eocausal.study import load_study
    from eocausal.survey import load_study_survey

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = load_study(build_study(root, args.units, args.scene_px, 6, 0))
        units, _ = load_study_survey(study)
        source = open_source(study)
        # One-time costs (imports, the embedding kernel's compilation) before either path is timed.
        context_components(units.iloc[:200], source, study, root / "warm", args.components)
        timings, results = {}, {}
        for name, store in (("read, not stored", False), ("stored, read back", True)):
            cache = root / name.replace(",", "").replace(" ", "_")
            shutil.rmtree(cache, ignore_errors=True)
            started = time.perf_counter()
            results[name] = context_components(units, source, study, cache, args.components, store=store)
            timings[name] = time.perf_counter() - started
            stored = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
            print(f"{name}: {timings[name]:.1f} s, {results[name].n_usable:,} usable windows, "
                  f"chip store {stored / 1e6:,.0f} MB", flush=True)
        local, remote = results["read, not stored"].components, results["stored, read back"].components
        both = np.isfinite(local).all(axis=1) & np.isfinite(remote).all(axis=1)
        # Above FIT_CHIPS units the two draw their embedder's fit sample from different sets (every
        # unit; the usable ones), so the components differ; what should not is the span they cover.
        a, b = local[both] - local[both].mean(0), remote[both] - remote[both].mean(0)
        resid = a - b @ np.linalg.lstsq(b, a, rcond=None)[0]
        ratio = timings["stored, read back"] / timings["read, not stored"]
        print(f"{args.units:,} units: stored / read = {ratio:.2f}; "
              f"largest |difference| of the components {np.abs(local[both] - remote[both]).max():.2e}; "
              f"share of the read path's component variance in the stored path's span "
              f"{1 - (resid ** 2).sum() / (a ** 2).sum():.3f}")


if __name__ == "__main__":
    main()
