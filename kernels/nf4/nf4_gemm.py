"""The Triton GEMMs of the NF4 LoRA linear: W decoded from its 4-bit codes in the main loop (no
dense copy of W in memory), the LoRA term in the shared low-rank epilogue
(kernels/lora/lora_epilogue.py).

    forward   out = cast(X W^T + s H B^T + bias + s b_B) (+ residual)    X (M, K), W (N, K)
    backward  dX  = cast(dY W + s G A)                                   dY (M, N), G = dY B

A byte of the codes holds two neighbours along K (element 2i in its high nibble). Rather than
interleave the nibbles in registers, both kernels split K into its even and odd halves:
    forward   X W^T = X[:, even] W[:, even]^T + X[:, odd] W[:, odd]^T: two dots per K step, the
              high nibbles against X's even columns, the low ones against its odd columns;
    backward  dX[:, even] = dY W[:, even], dX[:, odd] = dY W[:, odd]: two accumulators, each
              stored (with its epilogue) through a stride of two columns.
A K step covers whole 64-element NF4 blocks (KSTEP 64 or 128), so each row of W needs one or
two absmax values per step, decoded from the two levels in the loop.

FLOPs 2 M N (K + R) as the dense GEMM; bytes 2 (M K + M N) + N K (1/2 + 1/64) for W instead of
2 N K, plus the W decode: per tile of W one table look-up, one product and one rounding per
weight, repeated for every row tile of X (M / BLOCK_M times). At large M the decode competes
with the tensor cores; the host times this kernel against dequantise + cuBLAS per problem.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl
import triton.testing

from .. import knobs
from ..launch_args import scale_operand
from ..lora.lora_epilogue import TL_DTYPES, lowrank_epilogue, tile_coords
from ..precision import dot_precision
from ..timed_choice import rows_bucket
from .nf4_tiles import block_absmax, nf4_pair

_NO_SPECIALIZE = ["R", "M_BUCKET", "stride_um", "stride_vn"]


@triton.jit
def _step_absmax(block, n_ok, absmax_codes_ptr, absmax_scale_ptr, absmax_code_ptr, offset,
                 HALF: tl.constexpr, ALONG_ROWS: tl.constexpr):
    """The absmax of each weight of a half-tile (HALF bytes of each W row): HALF = 32 bytes is
    one NF4 block per row, 64 bytes two. `block` is the first block index of each row. Shape
    (HALF, rows) when the rows of W lie along the tile's columns (forward), else (rows, HALF)."""
    first = block_absmax(block, absmax_codes_ptr, absmax_scale_ptr, absmax_code_ptr, offset, n_ok)
    if ALONG_ROWS:
        result = tl.broadcast_to(first[None, :], (HALF, first.shape[0]))
    else:
        result = tl.broadcast_to(first[:, None], (first.shape[0], HALF))
    if HALF == 64:
        second = block_absmax(block + 1, absmax_codes_ptr, absmax_scale_ptr, absmax_code_ptr, offset, n_ok)
        j = tl.arange(0, HALF)
        if ALONG_ROWS:
            result = tl.where(j[:, None] < 32, result, second[None, :])
        else:
            result = tl.where(j[None, :] < 32, result, second[:, None])
    return result


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _nf4_forward_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_codes_ptr, absmax_scale_ptr, offset_ptr, nf4_code_ptr, absmax_code_ptr,
    u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    M_BUCKET,  # autotuning key only
    # strides
    stride_xm, stride_xk, stride_um, stride_ur, stride_vr, stride_vn,
    stride_rm, stride_rn, stride_om, stride_on,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = cast(X W^T + s U V + bias + s v_bias) (+ residual), W from its NF4 codes.

    X (M, K) activations; W (N, K) as packed codes (N K / 2 bytes, row-major), its absmax codes
    (N K / 64), second-level scales and offset; U (M, R) = H, V (R, N) = B_lora^T. Each K step
    reads KSTEP / 2 bytes of each of BLOCK_N rows of W and KSTEP columns of X (even and odd
    apart). Rows and columns past the edge wrap around (loads unmasked, stores masked); K is a
    multiple of KSTEP."""
    HALF: tl.constexpr = KSTEP // 2
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_j = tl.arange(0, HALF)
    x_even = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xk
    bytes_ptrs = packed_ptr + offs_n[None, :] * (K // 2) + offs_j[:, None]  # (HALF, BLOCK_N)
    first_block = offs_n * (K // 64)
    n_ok = offs_n < N
    offset = tl.load(offset_ptr)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for step in range(0, K // KSTEP):
        absmax = _step_absmax(first_block + step * (KSTEP // 64), n_ok, absmax_codes_ptr, absmax_scale_ptr,
                              absmax_code_ptr, offset, HALF, True)
        w_even, w_odd = nf4_pair(tl.load(bytes_ptrs), nf4_code_ptr, absmax, absmax, COMPUTE_DTYPE)
        acc = tl.dot(tl.load(x_even), w_even, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(tl.load(x_even + stride_xk), w_odd, acc, input_precision=DOT_PRECISION)
        x_even += KSTEP * stride_xk
        bytes_ptrs += HALF
    lowrank_epilogue(
        acc, pid_m, pid_n,
        u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=bias_ptr, v_bias_ptr=v_bias_ptr, res_ptr=res_ptr, out_ptr=out_ptr,
        scale_ptr=scale_ptr, M=M, N=N, R=R,
        stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=stride_vn,
        stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on, scale=scale,
        HAS_BIAS=HAS_BIAS, HAS_V_BIAS=HAS_V_BIAS, HAS_RESIDUAL=HAS_RESIDUAL, HAS_SCALE_TENSOR=HAS_SCALE_TENSOR,
        COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _nf4_backward_kernel(
    # pointers
    dy_ptr, packed_ptr, absmax_codes_ptr, absmax_scale_ptr, offset_ptr, nf4_code_ptr, absmax_code_ptr,
    u_ptr, v_ptr, out_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    M_BUCKET,  # autotuning key only
    # strides
    stride_dm, stride_dn, stride_um, stride_ur, stride_vr, stride_vk, stride_om, stride_ok,
    # scalars
    scale,
    # meta-parameters
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KSTEP: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX = cast(dY W + s U V), W from its NF4 codes: dY (M, N), U (M, R) = G, V (R, K) = A.

    Each program owns BLOCK_M rows and KSTEP columns of dX, i.e. KSTEP / 2 bytes of every row of
    W, and reduces over N in steps of BLOCK_N (masked at the end: N is any size). The even and
    odd columns accumulate apart and are stored, each with its share of the epilogue, as two
    (M, K / 2) matrices with a column stride of two."""
    HALF: tl.constexpr = KSTEP // 2
    pid_m, pid_k = tile_coords(tl.program_id(0), M, K // 2, BLOCK_M, HALF, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = pid_k * HALF + tl.arange(0, HALF)  # byte column of each W row
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    bytes_ptrs = packed_ptr + offs_n[:, None] * (K // 2) + offs_j[None, :]  # (BLOCK_N, HALF)
    offset = tl.load(offset_ptr)
    acc_even = tl.full((BLOCK_M, HALF), 0.0, dtype=tl.float32)
    acc_odd = tl.full((BLOCK_M, HALF), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        absmax = _step_absmax((n0 + offs_n) * (K // 64) + pid_k * (KSTEP // 64), n_ok, absmax_codes_ptr,
                              absmax_scale_ptr, absmax_code_ptr, offset, HALF, False)
        packed = tl.load(bytes_ptrs, mask=n_ok[:, None], other=0)
        w_even, w_odd = nf4_pair(packed, nf4_code_ptr, absmax, absmax, COMPUTE_DTYPE)
        dy = tl.load(dy_ptrs, mask=n_ok[None, :], other=0.0)
        acc_even = tl.dot(dy, w_even, acc_even, input_precision=DOT_PRECISION)
        acc_odd = tl.dot(dy, w_odd, acc_odd, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_N * stride_dn
        bytes_ptrs += BLOCK_N * (K // 2)
    _store_half(acc_even, pid_m, pid_k, u_ptr, v_ptr, out_ptr, scale_ptr, M, K, R, stride_um, stride_ur, stride_vr,
                stride_vk, stride_om, stride_ok, scale, HAS_SCALE_TENSOR, COMPUTE_DTYPE, DOT_PRECISION, BLOCK_R,
                BLOCK_M, HALF)
    _store_half(acc_odd, pid_m, pid_k, u_ptr, v_ptr + stride_vk, out_ptr + stride_ok, scale_ptr, M, K, R, stride_um,
                stride_ur, stride_vr, stride_vk, stride_om, stride_ok, scale, HAS_SCALE_TENSOR, COMPUTE_DTYPE,
                DOT_PRECISION, BLOCK_R, BLOCK_M, HALF)


@triton.jit
def _store_half(acc, pid_m, pid_k, u_ptr, v_ptr, out_ptr, scale_ptr, M, K, R, stride_um, stride_ur, stride_vr,
                stride_vk, stride_om, stride_ok, scale, HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """One parity of the backward's dX tile through the low-rank epilogue: the (M, K / 2) matrix
    of every other column of dX and of V, starting at v_ptr and out_ptr."""
    lowrank_epilogue(
        acc, pid_m, pid_k,
        u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=out_ptr, v_bias_ptr=out_ptr, res_ptr=out_ptr, out_ptr=out_ptr,
        scale_ptr=scale_ptr, M=M, N=K // 2, R=R,
        stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=2 * stride_vk,
        stride_rm=0, stride_rn=0, stride_om=stride_om, stride_on=2 * stride_ok, scale=scale,
        HAS_BIAS=False, HAS_V_BIAS=False, HAS_RESIDUAL=False, HAS_SCALE_TENSOR=HAS_SCALE_TENSOR,
        COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_N=HALF)


# (BLOCK_M, BLOCK_N, KSTEP, num_stages, num_warps). Forward: the usual Hopper bf16 tiles with
# whole NF4 blocks per K step. Backward: BLOCK_N is the reduction step over N, KSTEP the width
# of the dX tile (two halves of KSTEP / 2 columns). Tall tiles spread the decode of a W tile
# over more rows of X.
_FORWARD_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (64, 128, 64, 4, 4),
]
_BACKWARD_TILES = [
    (128, 64, 128, 3, 8),
    (256, 64, 128, 3, 8),
    (128, 64, 256, 3, 8),
    (128, 128, 128, 3, 8),
    (128, 64, 64, 4, 4),
    (64, 64, 128, 4, 4),
]
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "KSTEP": 64, "GROUP_M": 2}
_AUTOTUNE_BENCH = functools.partial(triton.testing.do_bench, warmup=5, rep=25)
_KEY = ["M_BUCKET", "N", "K", "BLOCK_R"]


def _prune(configs, named_args, **kwargs):
    """Tiles whose K step divides K, and no taller than the rows (M bucket) need."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs
            if args["K"] % c.kwargs["KSTEP"] == 0 and c.kwargs["BLOCK_M"] <= max(64, args["M_BUCKET"])]
    return kept or [c for c in configs if c.kwargs["KSTEP"] == 64][:1]


def _configs(tiles, autotune: bool):
    chosen = tiles if autotune else [t for t in tiles if t[2] == 64][:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "KSTEP": ks, "GROUP_M": 8}, num_stages=stages,
                          num_warps=warps)
            for bm, bn, ks, stages, warps in chosen]


@functools.cache
def _tuned(kernel_name: str, autotune: bool):
    kernel, tiles, flags = {
        "forward": (_nf4_forward_kernel, _FORWARD_TILES, ["HAS_BIAS", "HAS_V_BIAS", "HAS_RESIDUAL"]),
        "backward": (_nf4_backward_kernel, _BACKWARD_TILES, []),
    }[kernel_name]
    return triton.autotune(configs=_configs(tiles, autotune), key=_KEY + flags + ["COMPUTE_DTYPE"],
                           prune_configs_by={"early_config_prune": _prune}, do_bench=_AUTOTUNE_BENCH)(kernel)


def _launch(kernel_name: str, named: dict, rows: int, cols_of, device: torch.device,
            config: Optional[dict]) -> None:
    """One launch: a fixed configuration on CPU (the interpreter) or when given, else autotuned
    per problem. cols_of(cfg): the tile columns of the grid for a configuration."""
    if device.type == "cpu" or config is not None:
        cfg = dict(config or _INTERPRETER_CONFIG)
        launch = {name: cfg.pop(name) for name in ("num_warps", "num_stages") if name in cfg}
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * cols_of(cfg),)
        kernel = _nf4_forward_kernel if kernel_name == "forward" else _nf4_backward_kernel
        kernel[grid](**named, **cfg, **launch, enable_fp_fusion=False)
        return
    tuned = _tuned(kernel_name, knobs.current().autotune)
    with torch.cuda.device(device):
        tuned[lambda cfg: (triton.cdiv(rows, cfg["BLOCK_M"]) * cols_of(cfg),)](**named, enable_fp_fusion=False)


def _format_args(packed, absmax_codes, absmax_scale, absmax_offset, nf4_code, absmax_code) -> dict:
    return dict(packed_ptr=packed, absmax_codes_ptr=absmax_codes, absmax_scale_ptr=absmax_scale,
                offset_ptr=absmax_offset, nf4_code_ptr=nf4_code, absmax_code_ptr=absmax_code)


def _block_r(R: int) -> int:
    return max(16, min(64, triton.next_power_of_2(R)))  # 16 also for R = 0


def nf4_gemm_forward(x: Tensor, packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor,
                     nf4_code: Tensor, absmax_code: Tensor, N: int, u: Tensor, v: Tensor, out: Tensor, scale: float,
                     scale_tensor: Optional[Tensor], bias: Optional[Tensor] = None, v_bias: Optional[Tensor] = None,
                     residual: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """out (M, N) = cast(x W^T + s u v + bias + s v_bias) (+ residual), W (N, K) from its codes;
    x (M, K), u (M, R), v (R, N), residual (M, N): 2-D views. config: one fixed tile
    (BLOCK_M, BLOCK_N, KSTEP, GROUP_M, num_warps, num_stages) instead of autotuning."""
    M, K = x.shape
    if M == 0 or N == 0:
        return out
    dummy = out  # never read: the matching HAS_* flag is False
    scale_tensor = scale_operand(scale_tensor, x.device)
    res_strides = residual.stride() if residual is not None else (0, 0)
    named = dict(
        x_ptr=x, **_format_args(packed, absmax_codes, absmax_scale, absmax_offset, nf4_code, absmax_code),
        u_ptr=u, v_ptr=v, bias_ptr=bias.contiguous() if bias is not None else dummy,
        v_bias_ptr=v_bias.contiguous() if v_bias is not None else dummy,
        res_ptr=residual if residual is not None else dummy, out_ptr=out,
        scale_ptr=scale_tensor if scale_tensor is not None else dummy,
        M=M, N=N, K=K, R=u.shape[1], M_BUCKET=rows_bucket(M),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_vr=v.stride(0), stride_vn=v.stride(1), stride_rm=res_strides[0], stride_rn=res_strides[1],
        stride_om=out.stride(0), stride_on=out.stride(1), scale=float(scale),
        HAS_BIAS=bias is not None, HAS_V_BIAS=v_bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_SCALE_TENSOR=scale_tensor is not None, COMPUTE_DTYPE=TL_DTYPES[x.dtype],
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=_block_r(u.shape[1]))
    _launch("forward", named, M, lambda cfg: triton.cdiv(N, cfg["BLOCK_N"]), x.device, config)
    return out


def nf4_gemm_backward(dy: Tensor, packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor,
                      nf4_code: Tensor, absmax_code: Tensor, K: int, u: Tensor, v: Tensor, out: Tensor, scale: float,
                      scale_tensor: Optional[Tensor], config: Optional[dict] = None) -> Tensor:
    """out (M, K) = cast(dy W + s u v), W (N, K) from its codes; dy (M, N), u (M, R), v (R, K).
    config: one fixed tile (BLOCK_M, BLOCK_N, KSTEP, GROUP_M, num_warps, num_stages)."""
    M, N = dy.shape
    if M == 0 or K == 0:
        return out
    scale_tensor = scale_operand(scale_tensor, dy.device)
    named = dict(
        dy_ptr=dy, **_format_args(packed, absmax_codes, absmax_scale, absmax_offset, nf4_code, absmax_code),
        u_ptr=u, v_ptr=v, out_ptr=out, scale_ptr=scale_tensor if scale_tensor is not None else out,
        M=M, N=N, K=K, R=u.shape[1], M_BUCKET=rows_bucket(M),
        stride_dm=dy.stride(0), stride_dn=dy.stride(1), stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_vr=v.stride(0), stride_vk=v.stride(1), stride_om=out.stride(0), stride_ok=out.stride(1),
        scale=float(scale), HAS_SCALE_TENSOR=scale_tensor is not None, COMPUTE_DTYPE=TL_DTYPES[dy.dtype],
        DOT_PRECISION=dot_precision(dy.dtype), BLOCK_R=_block_r(u.shape[1]))
    _launch("backward", named, M, lambda cfg: K // cfg["KSTEP"], dy.device, config)
    return out
