"""The Triton FP8 GEMM with the LoRA term in its epilogue: the fp8 LoRA op's main product on
Hopper (kernels/fp8/fp8.py takes it wherever it runs, else torch._scaled_mm; `_fp8_gemm` says why).

    out = cast(diag(a_s) A_q B_q^T diag(b_s) + s U V + bias + s v_bias) (+ residual)
      forward : A_q = X_q (M, K) by rows,  B_q = W_q (N, K) as stored, b_s = w_s,  U = H, V = B^T
      backward: A_q = G_q (M, N), G = dY diag(w_s) by rows,  B_q = W_q^T (K, N), no b_s,  U = G, V = A

Why: torch._scaled_mm takes no (M, N) addend, so beside it the LoRA term costs one more pass
over the output (its read and write, a sizeable part of the fp8 GEMM). This kernel adds the term
to the fp32 tile before the single store; with the LoRA term it runs faster than _scaled_mm
alone at the Llama-8B shapes (docs/bench/design-choices.md#fp8-gemms).

Both operands are loaded by TMA descriptors K-contiguous (Hopper's fp8 tensor cores take only
K-major operands), so the backward reads W_q transposed: the caller's transient (K, N) copy,
as torch._scaled_mm needs too. The dequantisation scales multiply the fp32 accumulator
(exact: they are powers of two); the epilogue is the bf16 kernel's (kernels/lora/lora_gemm.py).
Runs on CUDA with capability >= 9.0 (TMA) and in the Triton interpreter (the CPU tests).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .. import knobs
from ..launch_args import capability, interpreting, load_scale, processors, scale_operand
# the bf16 kernel's tile order, epilogue, small-problem pruning and descriptor import, shared
from ..lora.lora_epilogue import (TL_DTYPES, lowrank_epilogue, lowrank_tiles, prune_configs, store_tile, tile_coords,
                            tile_value)
from ..lora.lora_gemm import TensorDescriptor
from ...errors import UnslothCompileError

E4M3 = torch.float8_e4m3fn


@triton.jit
def _fp8_tile(
    tile_id, a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr,
    scale_ptr,
    M, N, K, R,
    stride_um, stride_ur, stride_vr, stride_vn, stride_rm, stride_rn, stride_om, stride_on,
    scale,
    HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    PREFETCH: tl.constexpr, TMA_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile: the fp8 main loop (TMA zero-fills rows past M and the K tail), the
    rows' and columns' dequantisation scales, then the low-rank term and the store.

    The dequantisation scales are loaded before the main loop, and with PREFETCH (R <= BLOCK_R)
    so are the (BLOCK_M, r) and (r, BLOCK_N) low-rank tiles (`lowrank_tiles`, as the epilogue
    loads them), so that their latency hides behind the loop instead of following it on every
    tile; the same arithmetic as `lowrank_epilogue`, in its order."""
    pid_m, pid_n = tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows/columns past the edge wrap around (as in the epilogue): their loads stay in bounds
    rows = offs_m % M
    cols = offs_n % N
    a_scale = tl.load(a_scale_ptr + rows)
    if HAS_B_SCALE:
        b_scale = tl.load(b_scale_ptr + cols)
    if PREFETCH:
        s = load_scale(scale, scale_ptr, HAS_SCALE_TENSOR)
        offs_r = tl.arange(0, BLOCK_R)
        u, v = lowrank_tiles(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
                             v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn, offs_r, R, s)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    acc = acc * a_scale[:, None]
    if HAS_B_SCALE:
        acc = acc * b_scale[None, :]
    if PREFETCH:
        acc = tl.dot(u.to(COMPUTE_DTYPE), v.to(COMPUTE_DTYPE), acc, input_precision="tf32")
        if TMA_STORE:  # through shared memory by one bulk copy (clipped at the edges), which runs on
            # while a persistent program's next tile loads; a program that exits after the store
            # waits for it (one tile per program: slower with it, docs/bench/design-choices.md#fp8-gemms)
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N],
                           tile_value(acc, offs_m, offs_n, s, bias_ptr, v_bias_ptr, res_ptr, M, N, stride_rm,
                                      stride_rn, COMPUTE_DTYPE, HAS_BIAS, HAS_V_BIAS, HAS_RESIDUAL))
        else:
            store_tile(acc, offs_m, offs_n, s, bias_ptr, v_bias_ptr, res_ptr, out_ptr, M, N,
                       stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, HAS_V_BIAS, HAS_RESIDUAL)
    else:
        lowrank_epilogue(
            acc, pid_m, pid_n,
            u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=bias_ptr, v_bias_ptr=v_bias_ptr, res_ptr=res_ptr, out_ptr=out_ptr,
            scale_ptr=scale_ptr, M=M, N=N, R=R,
            stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=stride_vn,
            stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on, scale=scale,
            HAS_BIAS=HAS_BIAS, HAS_V_BIAS=HAS_V_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
            HAS_SCALE_TENSOR=HAS_SCALE_TENSOR, COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION="tf32", BLOCK_R=BLOCK_R,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


@triton.jit(do_not_specialize=["R", "M_BUCKET", "stride_um", "stride_vn"])
def _fp8_lora_gemm_kernel(
    a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    M, N, K, R,
    M_BUCKET,  # next power of two of M: an autotuning key only
    stride_um, stride_ur, stride_vr, stride_vn, stride_rm, stride_rn, stride_om, stride_on,
    scale,
    HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    PREFETCH: tl.constexpr,  # the low-rank term in one BLOCK_R block: its tiles loaded up front
    TMA_STORE: tl.constexpr,  # persistent programs (with PREFETCH) store their tiles through out_desc
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,  # one program per SM looping over tiles, else one per tile
):
    """out (M, N) = cast(diag(a_s) A_q B_q^T diag(b_s) + s U V + bias + s v_bias) (+ residual);
    A_q (M, K) and B_q (N, K) e4m3 behind K-contiguous descriptors, a_s (M,) and b_s (N,) fp32."""
    if PERSISTENT:
        tiles = ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
            _fp8_tile(tile_id, a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, bias_ptr, v_bias_ptr,
                      res_ptr, out_ptr, scale_ptr, M, N, K, R, stride_um, stride_ur, stride_vr, stride_vn,
                      stride_rm, stride_rn, stride_om, stride_on, scale, HAS_B_SCALE, HAS_BIAS, HAS_V_BIAS,
                      HAS_RESIDUAL, HAS_SCALE_TENSOR, COMPUTE_DTYPE,
                      BLOCK_R, PREFETCH, TMA_STORE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _fp8_tile(tl.program_id(0), a_desc, b_desc, out_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, bias_ptr,
                  v_bias_ptr, res_ptr, out_ptr, scale_ptr, M, N, K, R, stride_um, stride_ur, stride_vr, stride_vn,
                  stride_rm, stride_rn, stride_om, stride_on, scale, HAS_B_SCALE, HAS_BIAS, HAS_V_BIAS, HAS_RESIDUAL,
                  HAS_SCALE_TENSOR, COMPUTE_DTYPE,
                  BLOCK_R, PREFETCH, False, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, persistent): the probe's fastest tiles at
# the Llama-8B shapes (128 x 256 x 128 one program per tile at most, persistent at 4096 x 4096;
# 256 x 128 x 128 close behind at the down projection). Other tiles (a four-stage 128 x 256, a
# 128 x 128 for the small sites) gave mixed results in the kernel table, and the autotuner times
# each tile alone, back to back, which is not how a step runs them. Persistent with the tile and
# K loops flattened into one pipelined loop (tl.range(flatten=True)) and K blocks of 256 were
# slower: not offered. The persistent tile stores through a TMA descriptor (where
# `fp8_lora_gemm` can), the fastest configuration at most of the GEMMs; one program per tile
# with a TMA store is slower (each program waits for its store before it exits).
# Figures: docs/bench/design-choices.md#fp8-gemms.
_TILES = [(128, 256, 128, 3, 8, False), (128, 256, 128, 3, 8, True), (256, 128, 128, 3, 8, False)]


# The largest rank block of the epilogue (BLOCK_R), so the largest rank whose low-rank tiles
# are prefetched before the main loop.
PREFETCH_MAX_RANK = 64


def _set_blocks(nargs):
    """Autotuner pre-hook: the descriptors' block shapes follow the configuration tried."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    if nargs["out_desc"] is not None:
        nargs["out_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


@functools.cache
def _tuned(autotune: bool):
    tiles = _TILES if autotune else _TILES[:1]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": persistent},
                             num_stages=stages, num_warps=warps, pre_hook=_set_blocks)
               for bm, bn, bk, stages, warps, persistent in tiles]
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_B_SCALE", "HAS_BIAS", "HAS_V_BIAS", "HAS_RESIDUAL", "PREFETCH",
             "TMA_STORE"],
        prune_configs_by={"early_config_prune": prune_configs},
        do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=25),
    )(_fp8_lora_gemm_kernel)


# The interpreter runs one small configuration (tl.dot needs every dimension >= 16; fp8 K
# blocks of 32 bytes), persistent, so that its programs loop over several tiles.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "PERSISTENT": True}


def unsupported(a_codes: Tensor, b_codes: Tensor) -> Optional[str]:
    """Why this kernel cannot run a_codes (M, K) x b_codes (N, K)^T, or None."""
    if TensorDescriptor is None:
        return "this Triton has no host-side TMA descriptors (Triton >= 3.4 needed)"
    device = a_codes.device
    if device.type == "cuda":
        if capability(device) < (9, 0):
            return f"TMA needs compute capability 9.0, {device} has {capability(device)}"
    elif not (device.type == "cpu" and interpreting()):
        return f"no Triton kernel for {device.type} tensors"
    for name, t in (("A", a_codes), ("B", b_codes)):
        if t.dtype != E4M3 or t.dim() != 2 or t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            return f"{name} must be 2-D {E4M3}, K-contiguous with 16-byte aligned rows"
    if a_codes.shape[1] != b_codes.shape[1]:
        return f"K differs: A {tuple(a_codes.shape)}, B {tuple(b_codes.shape)}"
    return None


def fp8_lora_gemm(a_codes: Tensor, a_dequant: Tensor, b_codes: Tensor, b_dequant: Optional[Tensor], u: Tensor,
                  v: Tensor, out: Tensor, scale: float, scale_tensor: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, v_bias: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None, prefetch: Optional[bool] = None,
                  tma_store: Optional[bool] = None) -> Tensor:
    """out (M, N) = cast(diag(a_dequant) A_q B_q^T diag(b_dequant) + s u @ v + bias + s v_bias)
    (+ residual, after the cast, as torch's `out.to(dtype) + residual`).

    a_codes (M, K), b_codes (N, K) e4m3, K-contiguous; a_dequant (M,) / b_dequant (N,) fp32
    (b_dequant None: ones); u (M, R), v (R, N) of any float dtype and strides: the epilogue
    multiplies u's tile by s in fp32 and rounds both to out's half dtype for the tensor cores
    (so an fp32 adapter needs no cast copy beforehand); bias, v_bias (N,); residual (M, N) of
    any strides, not aliasing out. prefetch: load the low-rank tiles before the main loop
    (default: when r fits one block of BLOCK_R, i.e. r <= 64; False for probes). tma_store: the
    persistent configurations store their output tiles through a TMA descriptor (default: where
    it can, i.e. on the prefetch path with out's rows contiguous and 16-byte aligned; True: raise
    where it cannot; False: never; one program per tile always stores by tl.store).
    `unsupported` must have said None."""
    M, K = a_codes.shape
    N = b_codes.shape[0]
    R = u.shape[1]
    if M == 0 or N == 0:
        return out
    block_r = max(16, min(PREFETCH_MAX_RANK, triton.next_power_of_2(R)))
    if prefetch and R > block_r:
        raise UnslothCompileError("unsloth_compile.kernels.fp8.fp8_gemm: prefetch=True takes the low-rank term in one "
                                  f"block of {block_r}, but r = {R}; pass prefetch=None (chosen by rank) or False")
    dummy = out  # never read: the matching HAS_* flag is False
    scale_tensor = scale_operand(scale_tensor, a_codes.device)
    named = dict(
        a_scale_ptr=a_dequant.reshape(-1).contiguous(),
        b_scale_ptr=dummy if b_dequant is None else b_dequant.reshape(-1).contiguous(),
        u_ptr=u, v_ptr=v,
        bias_ptr=dummy if bias is None else bias.contiguous(),
        v_bias_ptr=dummy if v_bias is None else v_bias.contiguous(),
        res_ptr=dummy if residual is None else residual,
        out_ptr=out, scale_ptr=dummy if scale_tensor is None else scale_tensor,
        M=M, N=N, K=K, R=R, M_BUCKET=triton.next_power_of_2(M),
        stride_um=u.stride(0), stride_ur=u.stride(1), stride_vr=v.stride(0), stride_vn=v.stride(1),
        stride_rm=residual.stride(0) if residual is not None else 0,
        stride_rn=residual.stride(1) if residual is not None else 0,
        stride_om=out.stride(0), stride_on=out.stride(1), scale=float(scale),
        HAS_B_SCALE=b_dequant is not None, HAS_BIAS=bias is not None, HAS_V_BIAS=v_bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_SCALE_TENSOR=scale_tensor is not None, COMPUTE_DTYPE=TL_DTYPES[out.dtype],
        BLOCK_R=block_r,
        PREFETCH=R <= block_r if prefetch is None else prefetch,
    )
    store_ok = (named["PREFETCH"] and out.stride(1) == 1 and (out.stride(0) * out.element_size()) % 16 == 0
                and out.data_ptr() % 16 == 0)
    if tma_store and not store_ok:
        raise UnslothCompileError("unsloth_compile.kernels.fp8.fp8_gemm: tma_store=True needs the prefetch path and "
                                  "out's rows contiguous and 16-byte aligned; pass tma_store=None (chosen when "
                                  "possible) or False")
    named["TMA_STORE"] = store_ok and tma_store is not False

    def programs(cfg) -> int:
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        return min(tiles, processors(a_codes.device)) if cfg["PERSISTENT"] else tiles

    if a_codes.device.type == "cpu":  # the interpreter: one fixed configuration
        cfg = _INTERPRETER_CONFIG
        _fp8_lora_gemm_kernel[(programs(cfg),)](
            a_desc=TensorDescriptor.from_tensor(a_codes, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
            b_desc=TensorDescriptor.from_tensor(b_codes, [cfg["BLOCK_N"], cfg["BLOCK_K"]]),
            out_desc=(TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
                      if named["TMA_STORE"] else None), **named, **cfg)
        return out
    # block shapes here are placeholders: the autotuner's pre-hook re-blocks per configuration
    a_desc = TensorDescriptor.from_tensor(a_codes, [64, 64])
    b_desc = TensorDescriptor.from_tensor(b_codes, [64, 64])
    out_desc = TensorDescriptor.from_tensor(out, [64, 64]) if named["TMA_STORE"] else None
    with torch.cuda.device(a_codes.device):
        _tuned(knobs.current().autotune)[lambda meta: (programs(meta),)](a_desc=a_desc, b_desc=b_desc,
                                                                         out_desc=out_desc, **named)
    return out
