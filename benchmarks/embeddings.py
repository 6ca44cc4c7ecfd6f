"""Embedding throughput on this machine, every figure a ratio within one run.

    python benchmarks/embeddings.py                 # CPU, 6-band 64 px chips, 1,024 filters
    python benchmarks/embeddings.py --device cuda   # the same table on a GPU (see embeddings_gpu.py)

For the same chips it measures chips/s and achieved GFLOP/s of
  (a) the plain conv2d reference (float32),
  (b) the fast path in float32 (through the fused AVX2 CPU kernel, eocausal.embed.rcf_cpu, where it
      loaded; the same embedder with the kernel turned off gives the torch/oneDNN path's row),
  (c) the fast path in bfloat16 (bf16 inputs, float32 accumulation),
  (d) a ResNet-18 forward (torchvision layout; 6-band first layer; float32 and bf16 autocast) at
      its usual 224 px input (chips resized) and at the chips' own 64 px,
  (e) this machine's matrix-multiply rate in float32 and bf16: large square GEMMs (the best of a
      few sizes), and the fast path's own GEMM shape (rows x C*k*k x filters) without ReLU/pooling.

The methods are timed in interleaved rounds (a, b, c, d, e, a, b, ...); each call processes a few
chips (or one GEMM), and a method's rate is its fastest call over all rounds, so load from other
processes, which only ever slows a call down, hits all of them alike (sustained rates, all calls
together, are in the JSON); the load average is printed too.
FLOPs count 2 per multiply-add of the convolution (RCF), of every conv/linear layer (ResNet),
or of the GEMM. The RCF negative branch costs no multiply-adds and is not counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eocausal.embed.backbone import BackboneEmbedder, build_backbone, flops_per_image  # noqa: E402
from eocausal.embed.devices import ieee_float32, native_bf16, resolve_device  # noqa: E402
from eocausal.embed.embeddings import make_embedder  # noqa: E402
from eocausal.study import EmbeddingSpec  # noqa: E402
from eocausal.embed.rcf import RCFEmbedder  # noqa: E402


def synthetic_chips(n: int, bands: int, size: int, seed: int = 0) -> np.ndarray:
    """Landsat-like chips: smooth multi-scale texture, correlated bands, uint16-range values."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, bands, size, size), dtype=np.float32)
    mix = rng.uniform(0.5, 1.5, size=(bands, 3)).astype(np.float32)
    for i in range(n):
        fields = []
        for cell in (4, 16):
            coarse = rng.normal(size=(3, size // cell + 2, size // cell + 2)).astype(np.float32)
            fine = np.kron(coarse, np.ones((cell, cell), dtype=np.float32))[:, :size, :size]
            fields.append(fine)
        base = fields[0] * 0.4 + fields[1] + 0.3 * rng.normal(size=(3, size, size)).astype(np.float32)
        out[i] = 9000 + 1500 * np.einsum("bk,khw->bhw", mix, base)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(run, unit_count: int, min_seconds: float, device: torch.device) -> tuple[float, float]:
    """(best, sustained) units/s of ``run`` (which processes ``unit_count`` units), called
    repeatedly for min_seconds: best = the fastest single call, sustained = all calls together.
    On a shared machine the fastest call is the one least disturbed by other processes, and every
    method is measured the same way, GEMMs included."""
    run()  # warm-up: allocator, oneDNN/cuBLAS kernel selection
    _sync(device)
    fastest, total, calls = float("inf"), 0.0, 0
    while total < min_seconds or calls < 3:
        start = time.perf_counter()
        run()
        _sync(device)
        took = time.perf_counter() - start
        fastest, total, calls = min(fastest, took), total + took, calls + 1
    return unit_count / fastest, unit_count * calls / total


def gemm_task(n: int, m: int, k: int, dtype: torch.dtype, device: torch.device):
    a = torch.randn(n, k, device=device).to(dtype)
    b = torch.randn(k, m, device=device).to(dtype)

    def run():
        with ieee_float32(device):  # "float32" means IEEE float32 (no TF32) on CUDA too
            torch.mm(a, b)

    return run, 2 * n * m * k


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--chips", type=int, default=0,
                        help="chips per timed call (0: 2 on CPU, so a call takes a few ms like the GEMMs; 1024 on CUDA)")
    parser.add_argument("--size", type=int, default=64, help="chip size, px")
    parser.add_argument("--bands", type=int, default=6)
    parser.add_argument("--filters", type=int, default=1024)
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per method per round")
    parser.add_argument("--reference-chips", type=int, default=0, help="chips per reference call (0: auto)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_chips = args.chips or (1024 if device.type == "cuda" else 2)
    chips = synthetic_chips(n_chips, args.bands, args.size)
    valid = np.ones((n_chips, args.size, args.size), dtype=bool)
    # Filters are drawn from more chips than one call embeds (>= 100k candidate patches).
    fit_chips = synthetic_chips(32, args.bands, args.size, seed=1)
    fit_valid = np.ones((32, args.size, args.size), dtype=bool)

    base = RCFEmbedder(n_features=args.filters, patch_size=args.patch_size, device=str(device),
                       dtype="float32", batch_size=n_chips).fit(fit_chips, fit_valid)
    rcf_flops = base.flops_per_chip(args.size, args.size)

    def rcf(impl: str, dtype: str) -> RCFEmbedder:
        emb = copy.copy(base)
        emb.impl, emb.dtype = impl, dtype
        return emb

    reference, fast32, fast16 = rcf("reference", "float32"), rcf("fast", "float32"), rcf("fast", "bfloat16")
    # MOSAIKS' own layout of the same width: half the filters, both branches (the negative one free).
    half = RCFEmbedder(n_features=args.filters, patch_size=args.patch_size, device=str(device),
                       dtype="bfloat16", batch_size=n_chips, branches="both").fit(fit_chips, fit_valid)
    # The study default (EmbeddingSpec(): mixed whitened + level filters, pooled over the whole chip,
    # its centre half and quarter; 512 filters, 1,536 features) in the dtype `auto` picks here.
    default = make_embedder(EmbeddingSpec(device=str(device), batch_size=n_chips)).fit(fit_chips, fit_valid)

    def without_cpu_kernel(emb: RCFEmbedder) -> RCFEmbedder:
        """A copy whose transform state has the fused CPU kernel turned off (the torch path)."""
        emb = copy.copy(emb)
        emb.__dict__.pop("_transform_state", None)
        emb.transform(chips[:1], valid[:1])
        emb._transform_state[1].cpu_kernel = None
        return emb

    # Whether the fused AVX2 kernel runs here (float32 on CPU): then the torch path gets rows too.
    fast32.transform(chips[:1], valid[:1])
    default.transform(chips[:1], valid[:1])
    fused_cpu = fast32._transform_state[1].cpu_kernel is not None
    default_fused = default._transform_state[1].cpu_kernel is not None
    ref_chips = args.reference_chips or (n_chips if device.type == "cuda" else 1)
    tasks: dict[str, tuple] = {
        "(a) conv2d reference fp32": (lambda: reference.transform(chips[:ref_chips], valid[:ref_chips]), ref_chips, rcf_flops, "float32"),
        "(b) fast path fp32" + (" (fused CPU kernel)" if fused_cpu else ""): (
            lambda: fast32.transform(chips, valid), n_chips, rcf_flops, "float32"),
        "(c) fast path bf16": (lambda: fast16.transform(chips, valid), n_chips, rcf_flops, "bfloat16"),
        f"(c) fast bf16, {args.filters // 2} filters x both branches": (
            lambda: half.transform(chips, valid), n_chips, half.flops_per_chip(args.size, args.size), "bfloat16"),
        f"(f) study default ({default.n_filters} filters x 3 scales, {default.dtype_})": (
            lambda: default.transform(chips, valid), n_chips, default.flops_per_chip(args.size, args.size),
            default.dtype_),
    }
    if fused_cpu:
        torch32 = without_cpu_kernel(fast32)
        tasks["(b) fast path fp32, torch/oneDNN (kernel off)"] = (
            lambda: torch32.transform(chips, valid), n_chips, rcf_flops, "float32")
    default_name = f"(f) study default ({default.n_filters} filters x 3 scales, {default.dtype_})"
    if default_fused:
        default_torch = without_cpu_kernel(default)
        default_name = default_name[:-1] + ", fused CPU kernel)"
        tasks[default_name] = tasks.pop(f"(f) study default ({default.n_filters} filters x 3 scales, {default.dtype_})")
        tasks[f"(f) study default ({default.n_filters} filters x 3 scales, {default.dtype_}, torch path)"] = (
            lambda: default_torch.transform(chips, valid), n_chips, default.flops_per_chip(args.size, args.size),
            default.dtype_)

    # ResNet-18 as torchvision runs it, at its 224 px input (chips resized, as input_size_px: 224
    # does), and at the chips' own 64 px for comparison; the first layer adapted to the bands.
    resnet_sizes = (224, args.size)
    resnet_flops = {px: flops_per_image(build_backbone("resnet18", args.bands), args.bands, px) for px in resnet_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnet18.pth"
        torch.save(build_backbone("resnet18", 3).state_dict(), weights)  # random init: speed only
        for px in resnet_sizes:
            for dtype in ("float32", "bfloat16"):
                emb = BackboneEmbedder("resnet18", weights, device=str(device), dtype=dtype, batch_size=n_chips,
                                       input_size_px=px).fit(chips, valid)
                label = "fp32" if dtype == "float32" else "bf16 autocast"
                tasks[f"(d) ResNet-18 forward {px} px {label}"] = (
                    (lambda e=emb: e.transform(chips, valid)), n_chips, resnet_flops[px], dtype)

    depth = args.bands * args.patch_size**2
    rows = 8192
    if device.type == "cpu":
        # The rows of the fast path's own multiplies for these chips (it tiles each chip's
        # positions evenly, or puts whole chips together when a chip is smaller than a multiply).
        fast16.transform(chips[:1], valid[:1])
        state = fast16._transform_state[1]
        per_chip = (args.size - args.patch_size + 1) ** 2
        tiles, rows = state.tiling(per_chip)
        if tiles == 1:
            rows = per_chip * min(n_chips, max(1, state.rows_per_multiply() // per_chip))
    square = [4096, 8192] if device.type == "cuda" else [512, 768, 1024]
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        for n in square:
            run, flops = gemm_task(n, n, n, dtype, device)
            tasks[f"(e) GEMM {name} {n}^3"] = (run, 1, flops, str(dtype).split(".")[1])
        run, flops = gemm_task(rows, args.filters, depth, dtype, device)
        tasks[f"(e) GEMM {name} {rows}x{depth}x{args.filters} (fast-path shape)"] = (run, 1, flops, str(dtype).split(".")[1])

    best: dict[str, float] = {}
    sustained: dict[str, float] = {}
    rounds: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(args.rounds):
        for name, (run, count, _, _) in tasks.items():
            fastest, overall = timed_rate(run, count, args.min_seconds, device)
            rounds[name].append(overall)
            best[name] = max(best.get(name, 0.0), fastest)
            sustained[name] = max(sustained.get(name, 0.0), overall)

    gflops = {name: best[name] * tasks[name][2] / 1e9 for name in tasks}
    peak = {}
    for dtype in ("float32", "bfloat16"):
        square_names = [n for n in tasks if n.startswith("(e)") and tasks[n][3] == dtype and "^3" in n]
        peak[dtype] = max(gflops[n] for n in square_names)
    resnet_best = max(best[n] for n in tasks if n.startswith("(d) ResNet-18 forward 224"))
    resnet_native = max(best[n] for n in tasks if n.startswith(f"(d) ResNet-18 forward {args.size} px"))

    load = os.getloadavg()
    header = (f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}, native bf16 {native_bf16(device)}, "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(header)
    print(f"chips: {n_chips} x {args.bands} bands x {args.size} px; RCF {args.filters} filters "
          f"{args.patch_size}x{args.patch_size} ({rcf_flops / 1e9:.3f} GFLOP/chip); ResNet-18 "
          f"{resnet_flops[224] / 1e9:.3f} GFLOP/chip at 224 px, {resnet_flops[args.size] / 1e9:.3f} at {args.size} px; "
          f"fastest call of {args.rounds} interleaved rounds")
    line = f"{'method':<72} {'chips/s':>10} {'GFLOP/s':>9} {'% GEMM':>8} {'x R18':>7}"
    print(line)
    print("-" * len(line))
    for name in tasks:
        dtype = tasks[name][3]
        is_gemm = name.startswith("(e)")
        chips_s = "" if is_gemm else f"{best[name]:10.1f}"
        of_peak = f"{100 * gflops[name] / peak[dtype]:7.1f}%"
        vs_resnet = "" if is_gemm else f"{best[name] / resnet_best:7.2f}"
        print(f"{name:<72} {chips_s:>10} {gflops[name]:9.1f} {of_peak:>8} {vs_resnet:>7}")
    print("% GEMM: of the same run's best square GEMM in the method's dtype "
          f"(fp32 {peak['float32']:.1f}, bf16 {peak['bfloat16']:.1f} GFLOP/s); "
          "x R18: chips/s over the faster 224 px ResNet-18 row.")
    fast_bf16 = "(c) fast path bf16"
    summary = {
        "fast_bf16_share_of_bf16_gemm": gflops[fast_bf16] / peak["bfloat16"],
        "fast_bf16_over_resnet18_224px": best[fast_bf16] / resnet_best,
        f"fast_bf16_over_resnet18_{args.size}px": best[fast_bf16] / resnet_native,
        "fast_bf16_over_reference": best[fast_bf16] / best["(a) conv2d reference fp32"],
    }
    fast32_name = next(n for n in tasks if n.startswith("(b) fast path fp32"))
    summary["fast_fp32_share_of_fp32_gemm"] = gflops[fast32_name] / peak["float32"]
    summary["fused_cpu_kernel"] = fused_cpu
    summary["study_default_dtype"] = default.dtype_
    summary["study_default_chips_per_s"] = best[default_name]
    summary["study_default_share_of_gemm"] = gflops[default_name] / peak[default.dtype_]
    line = ("the dtype `auto` picks here: {} ({}); study default {:.1f} chips/s = {:.0%} of the {} GEMM rate; "
            "fast fp32 {:.0%} of the fp32 GEMM rate").format(
        default.dtype_, "fused CPU kernel" if default_fused else "torch path", best[default_name],
        summary["study_default_share_of_gemm"], default.dtype_, summary["fast_fp32_share_of_fp32_gemm"])
    if default_fused:
        torch_name = f"(f) study default ({default.n_filters} filters x 3 scales, {default.dtype_}, torch path)"
        summary["study_default_torch_path_share_of_gemm"] = gflops[torch_name] / peak[default.dtype_]
        line += " (torch path: study default {:.0%}, fast fp32 {:.0%})".format(
            summary["study_default_torch_path_share_of_gemm"],
            gflops["(b) fast path fp32, torch/oneDNN (kernel off)"] / peak["float32"])
    print(line)
    print("fast bf16: {:.0%} of the bf16 GEMM rate; {:.1f}x ResNet-18's chips/s at 224 px ({:.2f}x at {} px, "
          "where ResNet-18 does fewer FLOPs per chip than 1,024 RCF filters); {:.1f}x the conv2d reference".format(
              summary["fast_bf16_share_of_bf16_gemm"], summary["fast_bf16_over_resnet18_224px"],
              summary[f"fast_bf16_over_resnet18_{args.size}px"], args.size, summary["fast_bf16_over_reference"]))
    result = {
        "header": header, "device": str(device), "threads": torch.get_num_threads(), "load_average": load,
        "chips": n_chips, "bands": args.bands, "size": args.size, "filters": args.filters,
        "flops_per_chip": {"rcf": rcf_flops, "resnet18": {str(k): v for k, v in resnet_flops.items()}},
        "chips_per_s": {k: v for k, v in best.items() if not k.startswith("(e)")},
        "gflops": gflops, "sustained_units_per_s": sustained, "rounds_sustained": rounds, "summary": summary,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
