"""Embed many chips as a stream and report time and peak memory.

    python benchmarks/embeddings_stream.py --chips 100000          # 6-band 64 px, 1,024 features

Chips are made batch by batch (a pool of synthetic Landsat-like chips, each batch shifted and
rescaled so no two batches are equal) and go through ``RCFEmbedder.transform_stream``; features are
appended to a ``.npy`` file, so the process holds one batch of chips, one compute step and the
embedder, however many chips there are. Peak RSS is the process's high-water mark
(``ru_maxrss``), printed with the RSS after fitting so the growth during streaming is visible.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embeddings import synthetic_chips  # noqa: E402

from eocausal.embed.rcf import RCFEmbedder  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def chip_stream(n: int, batch: int, pool: np.ndarray, valid_pool: np.ndarray):
    for start in range(0, n, batch):
        count = min(batch, n - start)
        i = start // batch
        picks = (np.arange(count) + i * 7) % len(pool)
        chips = np.roll(pool[picks], shift=(i % 13, (i * 5) % 11), axis=(2, 3)) * (1 + 0.01 * (i % 17))
        yield chips.astype(np.float32), valid_pool[picks]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chips", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bands", type=int, default=6)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512, help="chips handed in per stream item")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, help="features .npy (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pool = synthetic_chips(1024, args.bands, args.size, seed=1)
    valid_pool = np.ones((len(pool), args.size, args.size), dtype=bool)
    valid_pool[::10, :8, :8] = False  # some nodata, so the masked path is exercised
    emb = RCFEmbedder(n_features=args.features, dtype=args.dtype, device=args.device).fit(pool[:512], valid_pool[:512])
    print(f"device {emb.device_}, dtype {emb.dtype_}, threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"after fit: RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        out_path = args.out or Path(tmp) / "features.npy"
        # Appended to a .npy file with plain writes (a memory map would count its dirty pages in
        # the RSS, hiding whether the embedding itself streams).
        out = open(out_path, "wb")
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (args.chips, args.features)})
        start_time = time.perf_counter()
        done = 0
        report_every = max(args.chips // 10, args.batch)
        next_report = report_every
        for block in emb.transform_stream(chip_stream(args.chips, args.batch, pool, valid_pool)):
            out.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
            done += len(block)
            if done >= next_report or done == args.chips:
                elapsed = time.perf_counter() - start_time
                print(f"{done:>8} chips  {elapsed:8.1f} s  {done / elapsed:7.1f} chips/s  "
                      f"RSS {rss_mb():6.0f} MB  peak {peak_rss_mb():6.0f} MB", flush=True)
                next_report += report_every
        out.close()
        elapsed = time.perf_counter() - start_time
        features = np.load(out_path, mmap_mode="r")
        assert features.shape == (args.chips, args.features)
        finite = bool(np.isfinite(features[:: max(1, args.chips // 1000)]).all())
        del features
    print(f"embedded {args.chips} chips ({args.bands} x {args.size} px -> {args.features} features) in "
          f"{elapsed:.1f} s ({args.chips / elapsed:.1f} chips/s); peak RSS {peak_rss_mb():.0f} MB; "
          f"features finite: {finite}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
