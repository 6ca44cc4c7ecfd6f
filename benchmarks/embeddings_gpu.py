"""The embedding benchmark on a CUDA GPU, in one short command (a few minutes at most):

    python benchmarks/embeddings_gpu.py            # add --quick for a 1-round smoke run

1. Checks first (they print PASS/FAIL and never stop the timing): the fused Triton kernel's
   self-check; fast bf16 on CUDA against the conv2d reference on CPU (bf16 tolerance); fast
   float32 on CUDA against fast float32 on CPU; a ResNet-18 on CUDA against CPU.
2. The same table as ``benchmarks/embeddings.py`` for CUDA: the conv2d reference (cuDNN, float32
   without TF32), the fast path in float32 and in bf16 (fused kernel, and the unfused torch ops for
   comparison), ResNet-18 forwards, and this GPU's float32 and bf16 GEMM rates.
3. A streamed run of 50,000 chips (6 bands, 64 px, 1,024 features) with time and peak GPU memory.

Everything is also written to ``embeddings_gpu.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import embeddings as bench  # noqa: E402

from eocausal.embed import rcf_triton  # noqa: E402
from eocausal.embed.rcf import RCFEmbedder, _check_fused_kernel  # noqa: E402


def _copy_fitted(source: RCFEmbedder, **changes) -> RCFEmbedder:
    emb = RCFEmbedder(**{**source.config(), **changes})
    for attr in ("n_bands_", "band_center_", "band_scale_", "filters_"):
        setattr(emb, attr, getattr(source, attr))
    return emb


def checks(device: torch.device) -> dict:
    results = {}
    results["triton available"] = rcf_triton.AVAILABLE
    results["fused kernel self-check"] = bool(rcf_triton.AVAILABLE and _check_fused_kernel(device))
    chips = bench.synthetic_chips(16, 6, 64, seed=3)
    valid = np.ones((16, 64, 64), dtype=bool)
    valid[0, :10, :20] = False
    base = RCFEmbedder(n_features=256, device="cpu", dtype="float32").fit(chips, valid)
    reference = _copy_fitted(base, impl="reference").transform(chips, valid)
    cpu_fast32 = base.transform(chips, valid)
    cuda_fast32 = _copy_fitted(base, device=str(device)).transform(chips, valid)
    cuda_fast16 = _copy_fitted(base, device=str(device), dtype="bfloat16").transform(chips, valid)
    both = _copy_fitted(base, device=str(device), dtype="bfloat16", branches="both", n_features=512, bias=0.1)
    both_ref = _copy_fitted(base, branches="both", n_features=512, bias=0.1, impl="reference")

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    results["fast fp32 cuda vs cpu (rel)"] = rel(cuda_fast32, cpu_fast32)
    results["fast bf16 cuda vs conv2d reference (rel)"] = rel(cuda_fast16, reference)
    results["fast bf16 both+bias cuda vs reference (rel)"] = rel(both.transform(chips, valid), both_ref.transform(chips, valid))
    passed = (results["fast fp32 cuda vs cpu (rel)"] < 1e-5
              and results["fast bf16 cuda vs conv2d reference (rel)"] < 1e-2
              and results["fast bf16 both+bias cuda vs reference (rel)"] < 1e-2)
    results["PASS"] = passed
    for key, value in results.items():
        print(f"  {key:<48} {value}")
    return results


def stream(device: torch.device, n_chips: int) -> dict:
    pool = bench.synthetic_chips(1024, 6, 64, seed=1)
    valid = np.ones((1024, 64, 64), dtype=bool)
    emb = RCFEmbedder(n_features=1024, device=str(device), dtype="bfloat16").fit(pool[:512], valid[:512])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = ((pool, valid) for _ in range(n_chips // len(pool)))
    start, done = time.perf_counter(), 0
    for block in emb.transform_stream(batches):
        done += len(block)
    elapsed = time.perf_counter() - start
    out = {"chips": done, "seconds": elapsed, "chips_per_s": done / elapsed,
           "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0}
    print(f"  streamed {done} chips in {elapsed:.1f} s ({done / elapsed:.0f} chips/s, host chip making included); "
          f"peak GPU memory {out['peak_gpu_memory_gb']:.2f} GB")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument("--json", type=Path, default=Path("embeddings_gpu.json"))
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script without a GPU")
    parser.add_argument("--stream-chips", type=int, default=0, help="0: 51,200 (10,240 with --quick)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run benchmarks/embeddings.py for the CPU table")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    print(f"{name}, torch {torch.__version__}, "
          f"triton {getattr(rcf_triton.triton, '__version__', 'absent')}")
    print("checks:")
    result = {"checks": checks(device)}
    print("table:")
    rounds = ["--rounds", "1", "--min-seconds", "0.5"] if args.quick else ["--rounds", "3", "--min-seconds", "1.0"]
    chips = ["--chips", "2048", "--reference-chips", "256"] if device.type == "cuda" else ["--chips", "8", "--reference-chips", "2"]
    result["table"] = bench.main(["--device", str(device), *chips, *rounds])
    print("unfused torch ops, for comparison:")
    os.environ["EOCAUSAL_RCF_FUSED"] = "0"
    try:
        unfused = bench.main(["--device", str(device), *chips, "--rounds", "1", "--min-seconds", "0.5"])
    finally:
        os.environ.pop("EOCAUSAL_RCF_FUSED", None)
    result["unfused_bf16_chips_per_s"] = unfused["chips_per_s"]["(c) fast path bf16"]
    print("stream:")
    result["stream"] = stream(device, args.stream_chips or (10_240 if args.quick else 51_200))
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
