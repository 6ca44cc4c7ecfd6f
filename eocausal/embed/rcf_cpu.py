"""The fused RCF kernel for CPUs with AVX2 and FMA (float32): build, load, check and call.

``rcf_cpu.cpp`` (beside this file) is compiled from source with the system C++ compiler (``CXX``,
else ``g++``/``c++``) into a shared library under the user's cache
(``$EOCAUSAL_CACHE_DIR`` or ``$XDG_CACHE_HOME/eocausal`` or ``~/.cache/eocausal``, in
``rcf_cpu/<hash of source, compiler and flags>/``), once: ``make install`` builds it
(``python -m eocausal.embed.rcf_cpu``); otherwise the first transform that can use it does (a few
seconds, once per source, compiler and flag set). It is loaded with ctypes, which releases the GIL during the call.

For each chip it computes, for every valid output position, the dot products of the position's
normalised patch with every filter, adds the shift (-bias), applies the ReLU and adds the result
to the sums of the position's pooling rectangle, without an im2col matrix or an activation map
in memory (see the .cpp). The features equal the torch path's within float32 rounding.

Where anything is missing (no compiler, a failed build, a CPU without AVX2/FMA, a non-x86 machine)
``kernel()`` returns None, logs why at INFO, and RCF uses its torch path. A mismatch with a float64
computation on a small check case (at load) disables it with a warning. ``EOCAUSAL_RCF_CPU_KERNEL=0`` turns it
off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rcf_cpu.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
ABI_VERSION = 2
FILTER_BLOCK = 16  # filters per block in the packed layout (rcf_cpu.cpp: FB)
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # "kernel": the loaded _Kernel or None, once decided


def enabled() -> bool:
    return os.environ.get("EOCAUSAL_RCF_CPU_KERNEL", "auto") != "0"


def cache_dir() -> Path:
    base = os.environ.get("EOCAUSAL_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "eocausal"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def library_path(cxx: str) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_id(cxx).encode(), " ".join(FLAGS).encode(),
                 platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "rcf_cpu" / digest.hexdigest()[:16] / "librcf_cpu.so"


def build() -> Path:
    """Compile the library (unless this source, compiler and flags already have one) and return
    its path. Raises RuntimeError with the reason when it cannot."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the AVX2 kernel is for x86-64, this machine is {platform.machine()}")
    if not SOURCE.is_file():
        raise RuntimeError(f"kernel source {SOURCE} is missing")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (CXX, g++ or c++) on PATH")
    target = library_path(cxx)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=_BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"building the kernel failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _Kernel:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.rcf_cpu_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.rcf_cpu_abi_version()}, expected {ABI_VERSION}")
        if not lib.rcf_cpu_supported():
            raise RuntimeError("this CPU lacks AVX2 or FMA")
        fn = lib.rcf_cpu_pool_sums
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [p, i64, i64, i64, i64, i32, p, p, i32, p, p, p, i32, p, p, i32]
        fn.restype = ctypes.c_int
        self._fn = fn
        norm = lib.rcf_cpu_normalise_nhwc
        norm.argtypes = [p, i64, i64, i64, i64, p, p, p]
        norm.restype = None
        self._normalise = norm
        self._lib = lib
        self.path = path

    def normalise_nhwc(self, x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """float32 [N, H, W, C] = (x - center) / scale per band, for float32 x [N, C, H, W]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        center = np.ascontiguousarray(center, dtype=np.float32)
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        n, c, h, w = x.shape
        if center.shape != (c,) or scale.shape != (c,):
            raise ValueError("center and scale must have one value per band")
        out = np.empty((n, h, w, c), dtype=np.float32)
        self._normalise(x.ctypes.data, n, c, h, w, center.ctypes.data, scale.ctypes.data, out.ctypes.data)
        return out

    def pool_sums(
        self,
        xh: torch.Tensor,
        packed: torch.Tensor,
        shift: torch.Tensor,
        offset: np.ndarray,
        cell: np.ndarray,
        start: np.ndarray,
        n_cells: int,
        k: int,
        want_patch_sums: bool,
        threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled ReLU sums float32 [N, n_cells, n_blocks * 16] and, if asked, the float64 sums
        of the valid patches [N, n_cells, k * k * C]. ``xh``: contiguous float32 [N, H, W, C];
        ``packed``/``shift`` from ``pack``; positions: ``offset`` (int32, (i * W + j) * C),
        ``cell`` (int32), chip b's at ``start[b]:start[b + 1]`` (int64)."""
        n, h, w, c = xh.shape
        if xh.dtype != torch.float32 or not xh.is_contiguous():
            raise ValueError("xh must be a contiguous float32 tensor")
        n_blocks = packed.shape[0]
        sums = torch.empty((n, n_cells, n_blocks * FILTER_BLOCK), dtype=torch.float32)
        patch_sums = torch.empty((n, n_cells, k * k * c), dtype=torch.float64) if want_patch_sums else None
        offset = np.ascontiguousarray(offset, dtype=np.int32)
        cell = np.ascontiguousarray(cell, dtype=np.int32)
        start = np.ascontiguousarray(start, dtype=np.int64)
        if len(start) != n + 1 or int(start[-1]) != len(offset) or len(cell) != len(offset):
            raise ValueError("position lists do not match the chips")
        if len(offset) and (int(cell.min()) < 0 or int(cell.max()) >= n_cells):
            raise ValueError("a position's cell is out of range")
        rc = self._fn(
            xh.data_ptr(), n, h, w, c, k, packed.data_ptr(), shift.data_ptr(), n_blocks,
            offset.ctypes.data, cell.ctypes.data, start.ctypes.data, n_cells,
            sums.data_ptr(), patch_sums.data_ptr() if patch_sums is not None else None, max(1, int(threads)),
        )
        if rc != 0:
            raise RuntimeError(f"rcf_cpu_pool_sums failed ({rc})")
        return sums, patch_sums


def pack(matrix: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Filters [F, D] (float32) -> ([blocks, D, 16] contiguous, shift [blocks * 16]); the padding
    filters are zero with zero shift (their sums are 0 and are dropped)."""
    n_filters, depth = matrix.shape
    blocks = -(-n_filters // FILTER_BLOCK)
    padded = torch.zeros((blocks * FILTER_BLOCK, depth), dtype=torch.float32)
    padded[:n_filters] = matrix.detach().to("cpu", torch.float32)
    packed = padded.view(blocks, FILTER_BLOCK, depth).transpose(1, 2).contiguous()
    full_shift = torch.zeros(blocks * FILTER_BLOCK, dtype=torch.float32)
    if shift is not None:
        full_shift[:n_filters] = shift.detach().to("cpu", torch.float32)
    return packed, full_shift


def _self_check(kern: _Kernel) -> bool:
    """A small case with nodata, two bands, a 3 x 3 patch, 37 filters (a partial block) and three
    rectangles, against a float64 computation."""
    gen = torch.Generator().manual_seed(0)
    n, h, w, c, k, f = 3, 11, 13, 2, 3, 37
    xh = torch.randn(n, h, w, c, generator=gen)
    matrix = torch.randn(f, k * k * c, generator=gen)
    shift = torch.linspace(-0.5, 0.5, f)
    ok = torch.rand(n, h - k + 1, w - k + 1, generator=gen) > 0.25
    cellmap = np.zeros((h - k + 1, w - k + 1), dtype=np.int32)
    cellmap[:, 4:] = 1
    cellmap[3:6, 4:8] = 2
    packed, full_shift = pack(matrix, shift)
    okn = ok.numpy().reshape(n, -1)
    flat = np.flatnonzero(okn)
    q = flat % okn.shape[1]
    i, j = np.divmod(q, w - k + 1)
    offset = (i * w + j) * c
    start = np.concatenate([[0], np.cumsum(okn.sum(1))])
    sums, psums = kern.pool_sums(xh, packed, full_shift, offset, cellmap.reshape(-1)[q], start, 3, k, True, 2)
    s = xh.double().stride()
    windows = xh.double().as_strided((n, h - k + 1, w - k + 1, k, k, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    patches = windows.reshape(n, h - k + 1, w - k + 1, -1) * ok.unsqueeze(-1)
    z = torch.relu(patches @ matrix.double().T + shift.double()) * ok.unsqueeze(-1)
    cm = torch.from_numpy(cellmap).long()
    want = torch.stack([z[:, cm == r].sum(1) for r in range(3)], 1)
    want_p = torch.stack([patches[:, cm == r].sum(1) for r in range(3)], 1)
    got = sums[:, :, :f].double()
    scale = want.abs().max()
    return bool((got - want).abs().max() <= 1e-5 * scale) and bool(
        (psums - want_p).abs().max() <= 1e-9 * want_p.abs().max())


def kernel() -> _Kernel | None:
    """The loaded, checked kernel, or None (the reason logged at INFO once per process)."""
    if not enabled():
        return None
    with _lock:
        if "kernel" not in _state:
            kern = None
            try:
                kern = _Kernel(build())
                if not _self_check(kern):
                    warnings.warn("the fused RCF CPU kernel disagrees with a float64 check: using the torch path",
                                  RuntimeWarning, stacklevel=3)
                    kern = None
                else:
                    log.info("RCF: fused CPU kernel (AVX2/FMA) loaded from %s", kern.path)
            except Exception as exc:  # no compiler, failed build, no AVX2, load errors
                log.info("RCF: fused CPU kernel not available (%s: %s); using the torch path",
                         type(exc).__name__, exc)
                kern = None
            _state["kernel"] = kern
        return _state["kernel"]  # type: ignore[return-value]


def main() -> int:
    """``python -m eocausal.embed.rcf_cpu``: build (``make install``); never fails the caller."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not enabled():
        print("rcf_cpu: turned off (EOCAUSAL_RCF_CPU_KERNEL=0)")
        return 0
    kern = kernel()
    print(f"rcf_cpu: {'built and checked: ' + str(kern.path) if kern else 'not available, RCF uses its torch path'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
