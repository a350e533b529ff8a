"""Rowwise float8 (e4m3) quantisation in one Triton kernel: kernels/fp8.py's `quantize_rowwise`
(and its weight-scale fold for backward's dY) without fp32 temporaries.

    t        = x[r, :] * col_scale        (col_scale optional: backward folds w_s into dY)
    scale[r] = largest power of two <= 448 / max(amax(|t|), 1e-12)
    codes    = e4m3(clamp(t * scale[r], -448, 448))      dequant[r] = 1 / scale[r]

One program per row. A row of up to MAX_ONE_TILE columns (every Llama width, 14336 included)
is loaded once and kept in registers: amax (and whether a NaN is in it), then the codes from the
same values. A longer row takes two passes over tiles of MAX_BLOCK_C: amax first, then the
codes (the row read again, from L2 if it is still there). Bytes per element: 2 read (bf16), 1
written, against about 21 for the torch spelling (an fp32 product written and read back, an
in-place clamp, a cast; twice that for dY, whose fold made one more fp32 copy). FLOPs: a handful
per element; it is memory-bound. Why one pass: at dY's width 14336 the two-pass kernel (tiles of
4096) took 253 us per Llama-8B MLP step for X and dY together on the H200
(scripts/profile_fp8_op.py), about 1.7x the time of its bytes at 3 TB/s.

Bitwise the same as the torch reference in kernels/fp8.py (the emulation, the CPU path):
- the ratio 448 / amax is an IEEE round-to-nearest division in both (div_rn here);
- the power of two is taken from the ratio's exponent bits in both (no log2, whose rounding
  could pick the power above the ratio);
- t * scale is exact (a power of two), the clamp keeps NaN (propagate_nan), and the cast rounds
  to nearest-even in both;
- a NaN anywhere in the row makes the scale NaN (so every code and dequant of the row), an inf
  makes it 0 (amax inf) exactly as the reference's formulas do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .launch_plan import launch

# In the kernel as literals: 448 (e4m3's largest finite value), 1e-12 (the amax floor) and
# 0x7F800000 (a float32's exponent bits: 2^floor(log2(v)) for a normal v), as kernels/fp8.py.
MAX_ONE_TILE = 16384  # the longest row held in registers whole (32 fp32 per thread at 16 warps)
MAX_BLOCK_C = 4096  # columns per tile of a longer row, read twice


@triton.jit
def _row_tile(x_row, col_scale_ptr, cols, ok, stride_xc, HAS_COL_SCALE: tl.constexpr):
    """One tile of a row in fp32, times its column scales when given: what both passes read."""
    t = tl.load(x_row + cols * stride_xc, mask=ok, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        t = t * tl.load(col_scale_ptr + cols, mask=ok, other=1.0)
    return t


@triton.jit
def _row_scale(row_amax, has_nan):
    """The row's multiplier: the largest power of two <= 448 / max(amax, 1e-12), NaN if the
    row holds a NaN (an inf gives amax inf, so 0, as the reference's formulas)."""
    ratio = tl.math.div_rn(tl.full((), 448.0, tl.float32), tl.maximum(row_amax, 1e-12))
    scale = (ratio.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(has_nan > 0, float("nan"), scale)


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr, col_scale_ptr, codes_ptr, dequant_ptr,
    # sizes
    C,
    # strides
    stride_xr, stride_xc, stride_cr,
    # meta-parameters
    HAS_COL_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """codes[r, :] and dequant[r] of one row r of x (times col_scale, when given). ONE_TILE:
    the row is one tile (C <= BLOCK_C), read once."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    x_row = x_ptr + row * stride_xr
    codes_row = codes_ptr + row * stride_cr
    if ONE_TILE:
        ok = offs < C
        t = _row_tile(x_row, col_scale_ptr, offs, ok, stride_xc, HAS_COL_SCALE)
        scale = _row_scale(tl.max(tl.abs(t), axis=0), tl.max((t != t).to(tl.int32), axis=0))
        tl.store(dequant_ptr + row, tl.math.div_rn(tl.full((), 1.0, tl.float32), scale))
        q = tl.clamp(t * scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(codes_row + offs, q.to(tl.float8e4nv), mask=ok)
    else:
        amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
        nan = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            ok = cols < C
            t = _row_tile(x_row, col_scale_ptr, cols, ok, stride_xc, HAS_COL_SCALE)
            nan = nan | (t != t).to(tl.int32)
            amax = tl.maximum(amax, tl.abs(t))
        scale = _row_scale(tl.max(amax, axis=0), tl.max(nan, axis=0))
        tl.store(dequant_ptr + row, tl.math.div_rn(tl.full((), 1.0, tl.float32), scale))
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            ok = cols < C
            t = _row_tile(x_row, col_scale_ptr, cols, ok, stride_xc, HAS_COL_SCALE)
            q = tl.clamp(t * scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
            tl.store(codes_row + cols, q.to(tl.float8e4nv), mask=ok)


def quantize_rows(t: Tensor, col_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(codes (R, C) e4m3 contiguous, dequant (R, 1) fp32) of a 2-D CUDA tensor of any float
    dtype and strides, rows scaled by col_scale (C,) fp32 first when given."""
    R, C = t.shape
    codes = torch.empty((R, C), dtype=torch.float8_e4m3fn, device=t.device)
    dequant = torch.empty((R, 1), dtype=torch.float32, device=t.device)
    if R == 0:
        return codes, dequant
    if C == 0:  # no values: unit scales, as the reference
        return codes, dequant.fill_(1.0)
    if col_scale is not None:
        col_scale = col_scale.reshape(-1).to(torch.float32).contiguous()
    one_tile = C <= MAX_ONE_TILE
    block_c = triton.next_power_of_2(C) if one_tile else MAX_BLOCK_C
    launch(_quantize_rows_kernel, (R,),
        x_ptr=t, col_scale_ptr=col_scale if col_scale is not None else dequant, codes_ptr=codes,
        dequant_ptr=dequant, C=C, stride_xr=t.stride(0), stride_xc=t.stride(1), stride_cr=codes.stride(0),
        HAS_COL_SCALE=col_scale is not None, BLOCK_C=block_c, ONE_TILE=one_tile,
        num_warps=16 if block_c >= 8192 else 8 if block_c >= 2048 else 4,
        num_stages=3)  # Triton's CUDA default, as measured
    return codes, dequant
