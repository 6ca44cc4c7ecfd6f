"""A fused CUDA kernel for the RCF fast path (Triton): im2col + bf16 matrix multiply + ReLU +
masked pooling in one pass, so the activations never leave the chip.

Why: with C*k*k = 54 multiply-adds per activation, the unfused path writes and re-reads 2 bytes of
activation per 108 FLOPs, about 4x below the ridge point of an H100/H200 (~200 FLOP/byte): it is
memory-bound. Here each program owns one (chip, grid cell) and a block of filters, keeps its filter
block in registers, walks the cell's output positions in tiles, gathers each tile's k x k x C
patches straight from the NHWC chip (no im2col in memory), multiplies on the tensor cores with
float32 accumulation, applies shift + ReLU + the valid-window mask, and sums over the tile. Only
the [chips, cells, filters] sums are written. Programs for the same chip are adjacent in the grid
(filter block fastest), so the chip is read from HBM about once and then from L2.

Only bf16 runs here (fp32 ``tl.dot`` would silently use TF32); float32 on CUDA uses cuBLAS with
TF32 off. The kernel is checked against the torch path on first use on each device, and any
compile error or mismatch falls back to the torch path with a warning, so a Triton or driver
problem costs speed, never correctness. ``TRITON_INTERPRET=1`` runs it on CPU for tests.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

AVAILABLE = triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if AVAILABLE:

    @triton.jit
    def _rcf_pool_kernel(
        x_ptr, field_ptr, w_ptr, shift_ptr, cells_ptr, out_ptr,
        H, W, C, OUT_H, OUT_W, D, F, N_CELLS, N_FBLOCKS,
        K: tl.constexpr, HAS_SHIFT: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        # A 1-D grid (CUDA's y and z grid sizes stop at 65,535): filter block fastest, so the
        # programs of one chip run together and share its pixels through L2.
        pid = tl.program_id(0)
        pid_f = pid % N_FBLOCKS
        pid_bc = pid // N_FBLOCKS  # chip x cell
        b = pid_bc // N_CELLS
        cell = pid_bc % N_CELLS
        r0 = tl.load(cells_ptr + cell * 4 + 0)
        r1 = tl.load(cells_ptr + cell * 4 + 1)
        c0 = tl.load(cells_ptr + cell * 4 + 2)
        c1 = tl.load(cells_ptr + cell * 4 + 3)
        cell_w = c1 - c0
        n_pos = (r1 - r0) * cell_w

        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        # Patch element d = (row offset, col offset, band), as the NHWC im2col rows on CPU.
        ki = offs_d // (K * C)
        kj = (offs_d // C) % K
        band = offs_d % C
        d_offset = ki * (W * C) + kj * C + band

        w = tl.load(w_ptr + offs_d[:, None] * F + offs_f[None, :],
                    mask=d_ok[:, None] & f_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_F]
        if UPCAST:  # Triton's CPU interpreter has no bf16 matmul: the same values in float32
            w = w.to(tl.float32)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        # Summed elementwise over tiles, reduced across positions once at the end.
        acc = tl.zeros([BLOCK_P, BLOCK_F], dtype=tl.float32)
        x_chip = x_ptr + b.to(tl.int64) * H * W * C
        field_chip = field_ptr + b.to(tl.int64) * OUT_H * OUT_W
        for p0 in range(0, n_pos, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < n_pos
            i = r0 + offs_p // cell_w
            j = c0 + offs_p % cell_w
            window_ok = tl.load(field_chip + i * OUT_W + j, mask=p_ok, other=0) != 0
            patch = tl.load(x_chip + (i * (W * C) + j * C)[:, None] + d_offset[None, :],
                            mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_P, BLOCK_D]
            if UPCAST:
                patch = patch.to(tl.float32)
            z = tl.dot(patch, w)  # bf16 x bf16 -> float32 on the tensor cores
            if HAS_SHIFT:
                z = z + shift[None, :]
            z = tl.maximum(z, 0.0)
            acc += tl.where(window_ok[:, None], z, 0.0)
        total = tl.sum(acc, axis=0)
        tl.store(out_ptr + pid_bc.to(tl.int64) * F + offs_f, total, mask=f_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def rcf_pool_sums(
    xh: torch.Tensor,
    field_ok: torch.Tensor,
    weights: torch.Tensor,
    shift: torch.Tensor | None,
    cells: list[tuple[int, int, int, int]],
    patch_size: int,
) -> torch.Tensor:
    """Sums over each cell's valid windows of relu(patch . w + shift): float32 [B, cells, F].

    ``xh``: bf16 [B, H, W, C] contiguous (normalised chips, channels last); ``field_ok``: bool
    [B, H-k+1, W-k+1]; ``weights``: bf16 [F, k*k*C] (rows ordered (row offset, col offset, band)).
    """
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed")
    n_chips, height, width, n_bands = xh.shape
    n_filters, depth = weights.shape
    out_h, out_w = field_ok.shape[1:]
    w_t = weights.t().contiguous()  # [D, F]
    field = field_ok.to(torch.uint8).contiguous()
    cell_bounds = torch.tensor([list(c) for c in cells], dtype=torch.int32, device=xh.device)
    out = torch.empty(n_chips, len(cells), n_filters, dtype=torch.float32, device=xh.device)
    block_f = 128 if n_filters >= 128 else _next_pow2(n_filters)
    block_d = _next_pow2(depth)
    # Registers: a [BLOCK_P, BLOCK_D] patch tile and [BLOCK_P, BLOCK_F] float32 activations.
    block_p = 64 if block_d <= 128 else 32
    n_fblocks = triton.cdiv(n_filters, block_f)
    grid = (n_fblocks * n_chips * len(cells),)
    _rcf_pool_kernel[grid](
        xh, field, w_t, shift if shift is not None else w_t, cell_bounds, out,
        height, width, n_bands, out_h, out_w, depth, n_filters, len(cells), n_fblocks,
        K=patch_size, HAS_SHIFT=shift is not None, UPCAST=interpreting(),
        BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_F=block_f,
    )
    return out
