"""The pieces the LoRA GEMM kernels share: the grouped tile order, the low-rank epilogue
(out = cast(acc + s U V + bias + s v_bias) (+ residual)) and the autotuner's pruning of tiles.

Used by the bf16/fp16 GEMM (lora_gemm.py) and the fp8 one (fp8_gemm.py), whose main loops
differ and whose epilogues are the same arithmetic in the same order.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from ..launch_args import load_scale

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `pid` in grouped order: GROUP_M row-blocks
    sweep the columns together, keeping the B tiles they share in L2."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def lowrank_tiles(u_ptrs, v_ptrs, offs_r, r_left, s):
    """One BLOCK_R block of the low-rank term's operands: s U[rows, block] in fp32 and
    V[block, cols] as stored, ranks past r_left masked to zero."""
    u = tl.load(u_ptrs, mask=offs_r[None, :] < r_left, other=0.0).to(tl.float32) * s
    v = tl.load(v_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
    return u, v


@triton.jit
def lowrank_epilogue(
    acc, pid_m, pid_n,
    # pointers
    u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    # sizes
    M, N, R,
    # strides
    stride_um, stride_ur, stride_vr, stride_vn, stride_rm, stride_rn, stride_om, stride_on,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc += s U[rows] @ V[:, cols] (+ bias + s v_bias); store cast(acc) (+ residual).

    The scale goes on the (BLOCK_M, r) U tile rather than on a second (BLOCK_M, BLOCK_N)
    accumulator; r is padded to BLOCK_R (a power of two >= 16, the smallest tensor-core K)
    by masking. Rows/columns past the edge wrap around (loads stay unpredicated) and are
    dropped by the masked store.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    s = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
    offs_r = tl.arange(0, BLOCK_R)
    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur
    v_ptrs = v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn
    for r0 in range(0, R, BLOCK_R):
        u, v = lowrank_tiles(u_ptrs, v_ptrs, offs_r, R - r0, s)
        acc = tl.dot(u.to(COMPUTE_DTYPE), v.to(COMPUTE_DTYPE), acc, input_precision=DOT_PRECISION)
        u_ptrs += BLOCK_R * stride_ur
        v_ptrs += BLOCK_R * stride_vr
    store_tile(acc, offs_m, offs_n, s, bias_ptr, v_bias_ptr, res_ptr, out_ptr, M, N,
               stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, HAS_V_BIAS, HAS_RESIDUAL)


@triton.jit
def tile_value(
    acc, offs_m, offs_n, s,
    # pointers
    bias_ptr, v_bias_ptr, res_ptr,
    # sizes
    M, N,
    # strides
    stride_rm, stride_rn,
    # meta-parameters
    OUT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """The epilogue's end before the store: acc (+ bias + s v_bias) cast to OUT_DTYPE (+ residual)."""
    rows = offs_m % M
    cols = offs_n % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if HAS_V_BIAS:
        acc += s * tl.load(v_bias_ptr + cols).to(tl.float32)[None, :]
    y = acc.to(OUT_DTYPE)
    if HAS_RESIDUAL:
        # PyTorch's `out.to(dtype) + residual`: round, add in fp32, round again.
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(OUT_DTYPE)
    return y


@triton.jit
def store_tile(
    acc, offs_m, offs_n, s,
    # pointers
    bias_ptr, v_bias_ptr, res_ptr, out_ptr,
    # sizes
    M, N,
    # strides
    stride_rm, stride_rn, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """The epilogue's end: acc (+ bias + s v_bias) cast to out's dtype (+ residual), stored
    where the tile lies inside (M, N)."""
    y = tile_value(acc, offs_m, offs_n, s, bias_ptr, v_bias_ptr, res_ptr, M, N, stride_rm, stride_rn,
                   out_ptr.dtype.element_ty, HAS_BIAS, HAS_V_BIAS, HAS_RESIDUAL)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, y, mask=mask)


# Arguments that vary with the rank or M alone: specialising on them (==1, %16) would compile
# a copy of the kernel per rank (r=8 vs r=16) for no gain; the U/V tiles are a few KB.


def prune_configs(configs, named_args, **kwargs):
    # Small problems: tiles much taller than M only waste work. (M_BUCKET arrives among the
    # positional named_args or, when the launch passes keywords, among kwargs.)
    m_bucket = named_args["M_BUCKET"] if "M_BUCKET" in named_args else kwargs["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m_bucket)]
    return kept or configs[:1]
