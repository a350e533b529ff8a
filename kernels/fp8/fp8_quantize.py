"""Rowwise float8 (e4m3) quantisation in one Triton kernel: kernels/fp8/fp8.py's `quantize_rowwise`
(and its weight-scale fold for backward's dY) without fp32 temporaries.

    t        = x[r, :] * col_scale        (col_scale optional: backward folds w_s into dY)
    scale[r] = largest power of two <= 448 / max(amax(|t|), 1e-12)
    codes    = e4m3(clamp(t * scale[r], -448, 448))      dequant[r] = 1 / scale[r]

A row of up to MAX_ONE_TILE columns (every Llama width, 14336 included) is loaded once and
kept in registers: amax (and whether a NaN is in it), then the codes from the same values;
narrow rows go several to a program (`one_tile_config`; faster than torch's own bf16 -> e4m3
cast: docs/bench/design-choices.md#fp8-quantisation-and-transpose). A longer row, one
per program, takes two passes over tiles of MAX_BLOCK_C: amax first, then the codes (the row
read again, from L2 if it is still there). Bytes per element: 2 read (bf16), 1
written, against about 21 for the torch spelling (an fp32 product written and read back, an
in-place clamp, a cast; twice that for dY, whose fold made one more fp32 copy). FLOPs: a handful
per element; it is memory-bound. Why one pass: at dY's width 14336 a two-pass kernel (tiles of
4096) took well above the time of its bytes
(docs/bench/design-choices.md#fp8-quantisation-and-transpose).

Bitwise the same as the torch reference in kernels/fp8/fp8.py (the emulation, the CPU path):
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

from ..launch_plan import launch

# In the kernel as literals: 448 (e4m3's largest finite value), 1e-12 (the amax floor) and
# 0x7F800000 (a float32's exponent bits: 2^floor(log2(v)) for a normal v), as kernels/fp8/fp8.py.
MAX_ONE_TILE = 16384  # the longest row held in registers whole (32 fp32 per thread at 16 warps)
MAX_BLOCK_C = 4096  # columns per tile of a longer row, read twice


@triton.jit
def _row_tile(x_row, col_scale_ptr, cols, ok, stride_xc, HAS_COL_SCALE: tl.constexpr):
    """One tile of a row in fp32, times its column scales when given: what both passes read."""
    t = tl.load(x_row + cols * stride_xc, mask=ok, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        t = t * tl.load(col_scale_ptr + cols, mask=ok, other=1.0).to(tl.float32)
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
    R, C,
    # strides
    stride_xr, stride_xc, stride_cr,
    # meta-parameters
    HAS_COL_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """codes and dequant of ROWS rows of x (times col_scale, when given). ONE_TILE: the rows
    are one (ROWS, BLOCK_C) tile (C <= BLOCK_C), read once; else ROWS is 1 and the row is read
    twice in tiles."""
    offs = tl.arange(0, BLOCK_C)
    if ONE_TILE:
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rows_ok = rows < R
        ok = rows_ok[:, None] & (offs < C)[None, :]
        t = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + offs[None, :] * stride_xc, mask=ok,
                    other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            t = t * tl.load(col_scale_ptr + offs, mask=offs < C, other=1.0).to(tl.float32)[None, :]
        scale = _row_scale(tl.max(tl.abs(t), axis=1), tl.max((t != t).to(tl.int32), axis=1))
        tl.store(dequant_ptr + rows, tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), scale), mask=rows_ok)
        q = tl.clamp(t * scale[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * stride_cr + offs[None, :], q.to(tl.float8e4nv), mask=ok)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xr
        codes_row = codes_ptr + row * stride_cr
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


def one_tile_config(block_c: int, fold: bool) -> tuple[int, int]:
    """(rows per program, warps) of rows held whole, BLOCK_C = C rounded up to a power of two:
    the fastest of scripts/sweep_fp8_quantize.py at M = 8192
    (docs/bench/design-choices.md#fp8-quantisation-and-transpose). Narrow rows go several to a
    program (2048 elements, 4096 with the fold, whose fp32 scales then serve several rows) so
    that each has enough loads in flight; 8 warps from 8192 up (fewer or more were slower
    there). The fold was measured with fp32 scales up to 8192
    columns and bf16 past that (kernels/fp8/fp8.py's fold_scales)."""
    if block_c >= 8192:
        return 1, 8
    if fold:  # at least 2 rows: the column scales read once serve both (faster at 4096)
        return min(8, max(2, 4096 // block_c)), 4
    return min(8, max(1, 2048 // block_c)), 4


def quantize_rows(t: Tensor, col_scale: Optional[Tensor] = None,
                  config: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """(codes (R, C) e4m3 contiguous, dequant (R, 1) fp32) of a 2-D CUDA tensor of any float
    dtype and strides, rows scaled by col_scale (C,) first when given (fp32, or bf16: powers of
    two are exact in both, and bf16 halves what each row reads of it). config: (rows per
    program, warps) of a row held whole instead of one_tile_config's (sweeps)."""
    R, C = t.shape
    codes = torch.empty((R, C), dtype=torch.float8_e4m3fn, device=t.device)
    dequant = torch.empty((R, 1), dtype=torch.float32, device=t.device)
    if R == 0:
        return codes, dequant
    if C == 0:  # no values: unit scales, as the reference
        return codes, dequant.fill_(1.0)
    if col_scale is not None:
        col_scale = col_scale.reshape(-1)
        if col_scale.dtype not in (torch.float32, torch.bfloat16):
            col_scale = col_scale.float()
        col_scale = col_scale.contiguous()
    one_tile = C <= MAX_ONE_TILE
    if one_tile:
        block_c = triton.next_power_of_2(C)
        rows, warps = config or one_tile_config(block_c, col_scale is not None)
    else:
        block_c, rows, warps = MAX_BLOCK_C, 1, 16
    launch(_quantize_rows_kernel, (triton.cdiv(R, rows),),
        x_ptr=t, col_scale_ptr=col_scale if col_scale is not None else dequant, codes_ptr=codes,
        dequant_ptr=dequant, R=R, C=C, stride_xr=t.stride(0), stride_xc=t.stride(1), stride_cr=codes.stride(0),
        HAS_COL_SCALE=col_scale is not None, ROWS=rows, BLOCK_C=block_c, ONE_TILE=one_tile,
        num_warps=warps, num_stages=3)  # Triton's CUDA default, as measured
    return codes, dequant
