"""Devices and number formats for the embedders (torch; no Dagster).

``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto``, ``float32`` or ``bfloat16``. ``auto`` is bfloat16 where the hardware multiplies
it natively, float32 elsewhere:

- CUDA: compute capability 8.0 or newer (A100, H100/H200, RTX 30xx+): bf16 tensor cores.
- CPU: AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX (Intel Sapphire Rapids+). Without them
  oneDNN emulates bf16 and it is slower than float32, so float32 it is.

bf16 here means bf16 *inputs* to the matrix units with float32 accumulation: features agree with
float32 ones to a relative error of about 1e-3 (bf16 has an 8-bit mantissa), which is far below the
sampling noise of anything estimated from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from eocausal.embed import EmbeddingError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Share of free device memory one CUDA batch may take (inputs, patches, activations): the rest is
# left to the CUDA caching allocator's fragmentation and to whatever else runs on the device.
CUDA_MEMORY_SHARE = 0.25
# A ceiling on chips per CUDA batch: past a few thousand the device is saturated anyway, and the
# host-side batch (pinned, in float32) stays within a few hundred MB.
CUDA_MAX_BATCH = 4096


def resolve_device(device: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device available here (clear error if not)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EmbeddingError(
            f"device {device!r} is not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise EmbeddingError(f"device {device!r}: only 'cpu' and 'cuda' devices are supported")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EmbeddingError(f"device {device!r} was requested but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise EmbeddingError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return resolved


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware (tensor cores, AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise EmbeddingError(f"dtype {dtype!r} is not supported; use 'auto', 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Full float32 matmuls and convolutions on CUDA (cuBLAS/cuDNN may use TF32 otherwise), so that
    a float32 run means float32 on every device and CPU and GPU agree. Uses torch's
    ``fp32_precision`` settings where they exist (mixing them with the legacy ``allow_tf32`` flags
    is an error in recent torch), the legacy flags otherwise."""
    if device.type != "cuda":
        yield
        return
    backends = [getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.cudnn, "conv", None)]
    if all(b is not None and hasattr(b, "fp32_precision") for b in backends):
        saved = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
        return
    saved_matmul = torch.backends.cuda.matmul.allow_tf32
    saved_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_matmul
        torch.backends.cudnn.allow_tf32 = saved_cudnn


def cpu_cache_bytes() -> int:
    """Per-core L2 cache size (bytes) as torch reports it; 1 MiB when unknown."""
    try:
        size = int(torch._C._cpu._get_cpu_capability().get("l2_cache_size", 0))
    except (AttributeError, RuntimeError, TypeError, ValueError):
        size = 0
    return size if size >= (128 << 10) else (1 << 20)


def cuda_batch_chips(device: torch.device, bytes_per_chip: int, floor: int) -> int:
    """Chips per CUDA batch: what fits in CUDA_MEMORY_SHARE of the free memory, at least ``floor``."""
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * CUDA_MEMORY_SHARE) // max(1, bytes_per_chip)
    return max(floor, min(fits, CUDA_MAX_BATCH))


class HostStaging:
    """Moves numpy batches to the device: through one reused pinned buffer on CUDA, so the copy is
    a DMA that does not wait on pageable memory; plain ``from_numpy`` (no copy) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._copied = None  # CUDA event: the last host->device copy out of the buffer finished

    def __call__(self, array) -> torch.Tensor:
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host
        if self._copied is not None:
            self._copied.synchronize()  # never overwrite the buffer while a copy still reads it
        key = (host.dtype, tuple(host.shape))
        buffer = self._pinned.get(key)
        if buffer is None:
            self._pinned.clear()  # one shape at a time (the last batch may be shorter)
            buffer = self._pinned[key] = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        buffer.copy_(host)
        on_device = buffer.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self.device))
        return on_device


@contextlib.contextmanager
def torch_cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: leave torch's setting), restoring the setting after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
