"""Thin GEMMs of a LoRA layer: one side of size r (the rank), memory-bound on the wide operand.

    rows_times_thin     C (M, r) = X (M, K) @ W (K, r)        H = X A^T, G = dY B
    thin_t_times_rows   C (K, r) or (r, K) = s T^T X           dA = s G^T X, dB = s dY^T H
                        T (M, r), X (M, K): reduction over the M rows, split across programs
    rows_thin_pair      (X W, s X^T T) in one pass over X       (G, dB) from one read of dY

Bytes: each reads its wide (M, K) operand once, 2 M K bytes in bf16/fp16, plus M r
elements of the thin one; FLOPs 2 M K r, i.e. r FLOPs per byte: far below the tensor cores'
balance point, so the time is the read of X. These kernels stream X in tiles with several
loads in flight; in GPU time they read it about as fast as cuBLAS, below the card's peak
bandwidth (docs/bench/design-choices.md#thin-low-rank-kernels).

Operands are rounded to X's dtype for the tensor cores (fp32 adapters included, as the
reference's cuBLAS calls do) and accumulate in fp32; the result is stored in the requested
dtype. thin_t_times_rows writes one fp32 partial per split of the rows and sums them with
torch (a few MB), which keeps the result deterministic (no atomics). rows_thin_pair writes
fp32 partials of both products (X W per column chunk, X^T T per row group; 4 r / (2 * 256)
= 1/8 of X's bytes at r = 16 for the first) and saves one of the two reads of dY that
backward otherwise makes: at r <= 64 only, where the partials stay small.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..launch_args import load_scale, processors, scale_operand
from ..launch_plan import launch
from ..precision import dot_precision
from ...errors import UnslothCompileError


@triton.jit
def _rows_times_thin_kernel(
    x_ptr, w_ptr, out_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_wk, stride_wr, stride_om, stride_or,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[rows] = X[rows] @ W: one program per BLOCK_M rows, looping over K."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _thin_t_times_rows_kernel(
    t_ptr, x_ptr, part_ptr, scale_ptr,
    M, C, R, rows_per_split,
    stride_tm, stride_tr, stride_xm, stride_xc, stride_ps, stride_pc, stride_pr,
    scale,
    HAS_SCALE_TENSOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, cols, :] = s T[rows of split]^T X[rows of split, cols] (stored through the
    strides, so the caller picks the (C, r) or (r, C) layout)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(t.to(x.dtype)), x, acc, input_precision=DOT_PRECISION)
    acc = acc * load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    part_ptrs = part_ptr + pid_s * stride_ps + offs_r[:, None] * stride_pr + offs_c[None, :] * stride_pc
    tl.store(part_ptrs, acc, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _rows_thin_pair_kernel(
    x_ptr, w_ptr, t_ptr, xw_part_ptr, xt_part_ptr, scale_ptr,
    M, C, R, rows_per_group,
    stride_xm, stride_xc, stride_wc, stride_wr, stride_tm, stride_tr,
    stride_pc, stride_pm, stride_pr, stride_qg, stride_qc, stride_qr,
    scale,
    HAS_SCALE_TENSOR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_C column chunk, row group) of X per program, each tile read once for both
    products: xw_part[chunk, rows] = X[rows, chunk] @ W[chunk] (summed over chunks by the
    host), xt_part[group, chunk] = s X[group rows, chunk]^T @ T[group rows] (summed over
    groups by the host)."""
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R
    w = tl.load(w_ptr + offs_c[:, None] * stride_wc + offs_r[None, :] * stride_wr,
                mask=c_ok[:, None] & r_ok[None, :], other=0.0)
    acc_xt = tl.full((BLOCK_C, BLOCK_R), 0.0, dtype=tl.float32)
    m_begin = pid_g * rows_per_group
    m_end = tl.minimum(m_begin + rows_per_group, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        xw = tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
        tl.store(xw_part_ptr + pid_c * stride_pc + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr,
                 xw, mask=m_ok[:, None] & r_ok[None, :])
        acc_xt = tl.dot(tl.trans(x), t.to(x.dtype), acc_xt, input_precision=DOT_PRECISION)
    s = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    tl.store(xt_part_ptr + pid_g * stride_qg + offs_c[:, None] * stride_qc + offs_r[None, :] * stride_qr,
             acc_xt * s, mask=c_ok[:, None] & r_ok[None, :])


# Memory-bound: modest tiles, several loads in flight; smaller tiles and fewer stages as the
# rank block grows, so that the (fp32) thin tiles fit shared memory (r=256 with the r<=64
# tiles would ask for more than a Hopper SM has) and the accumulator fits registers.
# The interpreter (CPU) runs the smallest legal tiles.
_INTERPRETER_TILE = (16, 16, 4, 1)


def _rows_tile(block_r: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, warps, stages) of rows_times_thin."""
    if block_r <= 32:
        return 64, 128, 4, 4
    if block_r <= 64:
        return 64, 64, 4, 3
    return 64, 32, 8, 2


def _t_rows_tile(block_r: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, warps, stages) of thin_t_times_rows."""
    if block_r <= 64:
        return 64, 128, 4, 3
    return 32, 64, 8, 2


_TARGET_PROGRAMS = 264  # two per SM on a 132-SM Hopper card: enough loads in flight to fill HBM

# rows_thin_pair: the largest rank it takes (its (BLOCK_C, r) fp32 accumulator lives in
# registers, and the X W partials grow with r), its tile and its programs per SM. Chosen from
# `scripts/sweep_thin_tiles.py --pair-only`: faster than the two thin kernels apart from
# C = 4096 up; at C = 2048 apart is faster, which the timed choice sees
# (docs/bench/design-choices.md#thin-low-rank-kernels).
PAIR_MAX_RANK = 64
_PAIR_TILE = (64, 128, 8, 3)  # (BLOCK_M, BLOCK_C, warps, stages)
_PAIR_PROGRAMS_PER_SM = 2


def _row_splits(M: int, block_m: int, programs: int, col_blocks: int) -> int:
    """Splits of the M rows, each summed into its own fp32 partial: enough that col_blocks x
    splits programs keep every SM streaming, but at least 4 row tiles per split (fewer makes
    the partials cost more than they save)."""
    return max(1, min(triton.cdiv(programs, col_blocks), triton.cdiv(M, 4 * block_m)))


def _block_r(r: int) -> int:
    """The rank padded to a power of two, at least 16 (the smallest tensor-core K); 16 for r = 0."""
    return max(16, triton.next_power_of_2(r))


def rows_times_thin(x: Tensor, w: Tensor, out_dtype: torch.dtype,
                    tile: Optional[tuple[int, int, int, int]] = None) -> Tensor:
    """x (M, K) @ w (K, r) -> (M, r) in out_dtype; w of any dtype and strides (rounded to x's).
    tile: (BLOCK_M, BLOCK_K, warps, stages) instead of the default (tile sweeps)."""
    M, K = x.shape
    R = w.shape[1]
    out = torch.empty((M, R), device=x.device, dtype=out_dtype)
    if M == 0:
        return out
    block_r = _block_r(R)
    if tile is None:
        tile = _INTERPRETER_TILE if x.device.type == "cpu" else _rows_tile(block_r)
    bm, bk, warps, stages = tile
    launch(_rows_times_thin_kernel, (triton.cdiv(M, bm),),
        x_ptr=x, w_ptr=w, out_ptr=out, M=M, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wk=w.stride(0), stride_wr=w.stride(1),
        stride_om=out.stride(0), stride_or=out.stride(1),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r,
        num_warps=warps, num_stages=stages)
    return out


def thin_t_times_rows(t: Tensor, x: Tensor, scale: float, scale_tensor: Optional[Tensor],
                      out_dtype: torch.dtype, rank_first: bool,
                      tile: Optional[tuple[int, int, int, int]] = None,
                      target_programs: int = 0) -> Tensor:
    """s t^T x for t (M, r), x (M, C): (r, C) when rank_first (dA), else (C, r) (dB).
    tile: (BLOCK_M, BLOCK_C, warps, stages), target_programs: instead of the defaults (sweeps)."""
    M, C = x.shape
    R = t.shape[1]
    if M == 0:  # a sum over no rows: zeros, without a launch
        return torch.zeros((R, C) if rank_first else (C, R), device=x.device, dtype=out_dtype)
    block_r = _block_r(R)
    if tile is None:
        tile = _INTERPRETER_TILE if x.device.type == "cpu" else _t_rows_tile(block_r)
    bm, bc, warps, stages = tile
    col_blocks = triton.cdiv(C, bc)
    splits = _row_splits(M, bm, target_programs or _TARGET_PROGRAMS, col_blocks)
    rows_per_split = triton.cdiv(M, splits)
    shape = (splits, R, C) if rank_first else (splits, C, R)
    part = torch.empty(shape, device=x.device, dtype=torch.float32)
    stride_pr, stride_pc = (part.stride(1), part.stride(2)) if rank_first else (part.stride(2), part.stride(1))
    scale_tensor = scale_operand(scale_tensor, x.device)
    launch(_thin_t_times_rows_kernel, (col_blocks, splits),
        t_ptr=t, x_ptr=x, part_ptr=part, scale_ptr=scale_tensor if scale_tensor is not None else part,
        M=M, C=C, R=R, rows_per_split=rows_per_split,
        stride_tm=t.stride(0), stride_tr=t.stride(1), stride_xm=x.stride(0), stride_xc=x.stride(1),
        stride_ps=part.stride(0), stride_pc=stride_pc, stride_pr=stride_pr,
        scale=float(scale), HAS_SCALE_TENSOR=scale_tensor is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_C=bc, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    result = part[0] if splits == 1 else part.sum(0)
    return result if out_dtype == torch.float32 else result.to(out_dtype)


def rows_thin_pair(x: Tensor, w: Tensor, t: Tensor, scale: float, scale_tensor: Optional[Tensor],
                   xw_dtype: torch.dtype, xt_dtype: torch.dtype,
                   tile: Optional[tuple[int, int, int, int]] = None, target_programs: int = 0
                   ) -> tuple[Tensor, Tensor]:
    """(x @ w, s x^T t) for x (M, C), w (C, r), t (M, r), r <= PAIR_MAX_RANK, reading x once:
    backward's G = dY B and dB = s dY^T H. Results (M, r) in xw_dtype and (C, r) in xt_dtype.
    tile: (BLOCK_M, BLOCK_C, warps, stages), target_programs: instead of the defaults (sweeps)."""
    M, C = x.shape
    R = w.shape[1]
    if R > PAIR_MAX_RANK:
        raise UnslothCompileError("unsloth_compile.kernels.lora.lowrank_thin: rows_thin_pair takes ranks up to "
                                  f"{PAIR_MAX_RANK}, got r={R}; use rows_times_thin and thin_t_times_rows for larger "
                                  "ranks")
    if M == 0:  # no rows: an empty product and a zero sum, without a launch
        return (torch.empty((0, R), device=x.device, dtype=xw_dtype),
                torch.zeros((C, R), device=x.device, dtype=xt_dtype))
    block_r = _block_r(R)
    if tile is None:
        tile = _INTERPRETER_TILE if x.device.type == "cpu" else _PAIR_TILE
    bm, bc, warps, stages = tile
    chunks = triton.cdiv(C, bc)
    groups = _row_splits(M, bm, target_programs or _PAIR_PROGRAMS_PER_SM * processors(x.device), chunks)
    rows_per_group = triton.cdiv(M, groups)
    xw_part = torch.empty((chunks, M, R), device=x.device, dtype=torch.float32)
    xt_part = torch.empty((groups, C, R), device=x.device, dtype=torch.float32)
    scale_tensor = scale_operand(scale_tensor, x.device)
    launch(_rows_thin_pair_kernel, (chunks, groups),
        x_ptr=x, w_ptr=w, t_ptr=t, xw_part_ptr=xw_part, xt_part_ptr=xt_part,
        scale_ptr=scale_tensor if scale_tensor is not None else xt_part,
        M=M, C=C, R=R, rows_per_group=rows_per_group,
        stride_xm=x.stride(0), stride_xc=x.stride(1), stride_wc=w.stride(0), stride_wr=w.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_pc=xw_part.stride(0), stride_pm=xw_part.stride(1), stride_pr=xw_part.stride(2),
        stride_qg=xt_part.stride(0), stride_qc=xt_part.stride(1), stride_qr=xt_part.stride(2),
        scale=float(scale), HAS_SCALE_TENSOR=scale_tensor is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_C=bc, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    xw = xw_part[0] if chunks == 1 else xw_part.sum(0)
    xt = xt_part[0] if groups == 1 else xt_part.sum(0)
    return xw.to(xw_dtype), xt.to(xt_dtype)
