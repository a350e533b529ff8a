"""The Triton GEMM with a low-rank epilogue, the main product of `unsloth::lora_linear`.

    out = cast(A @ B + s U @ V + bias + s v_bias) (+ residual, then cast again)
      forward : A = X,  B = W^T, U = H = X_l A_lora^T, V = B_lora^T
      backward: A = dY, B = W,   U = G = dY B_lora,    V = A_lora

FLOPs 2 M N (K + R); bytes 2 (M K + K N + M N) + (M R + R N) size(U, V) + M N size(res):
the low-rank part adds R/K of the FLOPs (0.4% at r=16, K=4096) and under 1% of the bytes.

Two main loops (pointer loads for any strides and the interpreter; TMA descriptors on
Hopper when strides are 16-byte aligned), autotuned per problem and chosen between by timing
(kernels/timed_choice.py). The first call of a problem builds a launch plan
(kernels/launch_plan.py); later calls launch the compiled kernel directly.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext as _nullcontext
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl
import triton.testing

from .. import knobs
from ..launch_args import capability, processors, scale_operand
from ..launch_plan import Plan, specialization
from .lora_epilogue import TL_DTYPES, lowrank_epilogue, prune_configs, tile_coords
from ..precision import dot_precision
from ..timed_choice import fastest, rows_bucket

# --------------------------------------------------------------------------------------------
# Kernels: one GEMM with a low-rank epilogue, in two flavours of main loop (pointer loads for
# any strides and the interpreter; TMA descriptors on Hopper when strides are 16-byte aligned)
# --------------------------------------------------------------------------------------------


_NO_SPECIALIZE = ["R", "M_BUCKET", "stride_um", "stride_vn"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _lora_gemm_kernel(
    # pointers
    a_ptr, b_ptr, u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    M_BUCKET,  # next power of two of M: an autotuning key only
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_rm, stride_rn, stride_om, stride_on,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = cast(A @ B + s * (U @ V) + bias + s * v_bias) (+ residual, then cast again).

    A (M, K) activations, B (K, N) frozen weight (any strides), U (M, R) the low-rank left
    factor (fp32 or half; scaled by s and rounded to A's dtype on load), V (R, N) the right
    factor (rounded to A's dtype). Both products accumulate into one fp32 tile, so the
    adapter costs no extra pass over the (M, N) output.
      forward : A = X,  B = W^T, U = H = X_l A_lora^T, V = B_lora^T
      backward: A = dY, B = W,   U = G = dY B_lora,    V = A_lora
    FLOPs 2 M N (K + R); bytes (compulsory) 2 (M K + K N + M N) + (M R + R N) * size(U, V)
    + M N * size(res): the low-rank part adds R/K of the FLOPs (0.4% at r=16, K=4096) and
    under 1% of the bytes.
    """
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Rows/columns past the edge wrap around instead of being masked (see the epilogue).
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    # tl.full, not tl.zeros: the standard-library @jit helpers break in the interpreter when
    # triton.language was imported before TRITON_INTERPRET was set (as under pytest).
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    lowrank_epilogue(
        acc, pid_m, pid_n,
        u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=bias_ptr, v_bias_ptr=v_bias_ptr, res_ptr=res_ptr, out_ptr=out_ptr,
        scale_ptr=scale_ptr, M=M, N=N, R=R,
        stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=stride_vn,
        stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on, scale=scale,
        HAS_BIAS=HAS_BIAS, HAS_V_BIAS=HAS_V_BIAS, HAS_RESIDUAL=HAS_RESIDUAL, HAS_SCALE_TENSOR=HAS_SCALE_TENSOR,
        COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N)


@triton.jit
def _tma_tile(
    tile_id, a_desc, b_desc, u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    M, N, K, R,
    stride_um, stride_ur, stride_vr, stride_vn, stride_rm, stride_rn, stride_om, stride_on,
    scale,
    B_K_CONTIGUOUS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile of _lora_gemm_tma_kernel: the TMA main loop, then the epilogue."""
    pid_m, pid_n = tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k])
        if B_K_CONTIGUOUS:
            b = b_desc.load([off_n, k]).T
        else:
            b = b_desc.load([k, off_n])
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
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
def _lora_gemm_tma_kernel(
    # tensor descriptors and pointers
    a_desc, b_desc, u_ptr, v_ptr, bias_ptr, v_bias_ptr, res_ptr, out_ptr, scale_ptr,
    # sizes
    M, N, K, R,
    M_BUCKET,  # autotuning key only
    # strides
    stride_um, stride_ur, stride_vr, stride_vn,
    stride_rm, stride_rn, stride_om, stride_on,
    # scalars
    scale,
    # meta-parameters
    B_K_CONTIGUOUS: tl.constexpr,  # b_desc is over (N, K) (load, then .T), else over (K, N)
    HAS_BIAS: tl.constexpr, HAS_V_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE_TENSOR: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,  # one program per SM looping over tiles, else one per tile
):
    """_lora_gemm_kernel with the main loop's tiles fetched by the TMA engine (Hopper).

    Same math, FLOPs and bytes. The copy engine zero-fills out-of-range rows and the K tail,
    so the loop has no masks and no address arithmetic; descriptors need 16-byte aligned
    row strides (K, N multiples of 8 in bf16), else the host picks the pointer kernel.
    PERSISTENT: the grid is one program per SM (`_programs`), each taking every
    num_programs-th tile; a plain GEMM written this way ran close to cuBLAS at the Llama MLP
    shapes (docs/bench/design-choices.md#bf16-lora-gemm), and the autotuner keeps it where it is the fastest
    configuration.
    """
    # Two calls of _tma_tile, not one inside a loop of one trip for the non-persistent flavour:
    # Triton keeps that loop (sm_90 TTGIR), which changes the compiled kernel.
    if PERSISTENT:
        # not tl.cdiv: the standard-library @jit helpers break in the interpreter (see tl.full)
        tiles = ((M + BLOCK_M - 1) // BLOCK_M) * ((N + BLOCK_N - 1) // BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
            _tma_tile(
                tile_id, a_desc, b_desc,
                u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=bias_ptr, v_bias_ptr=v_bias_ptr, res_ptr=res_ptr,
                out_ptr=out_ptr, scale_ptr=scale_ptr, M=M, N=N, K=K, R=R,
                stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=stride_vn,
                stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on, scale=scale,
                B_K_CONTIGUOUS=B_K_CONTIGUOUS, HAS_BIAS=HAS_BIAS, HAS_V_BIAS=HAS_V_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
                HAS_SCALE_TENSOR=HAS_SCALE_TENSOR, COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION=DOT_PRECISION,
                BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M)
    else:
        _tma_tile(
            tl.program_id(0), a_desc, b_desc,
            u_ptr=u_ptr, v_ptr=v_ptr, bias_ptr=bias_ptr, v_bias_ptr=v_bias_ptr, res_ptr=res_ptr,
            out_ptr=out_ptr, scale_ptr=scale_ptr, M=M, N=N, K=K, R=R,
            stride_um=stride_um, stride_ur=stride_ur, stride_vr=stride_vr, stride_vn=stride_vn,
            stride_rm=stride_rm, stride_rn=stride_rn, stride_om=stride_om, stride_on=stride_on, scale=scale,
            B_K_CONTIGUOUS=B_K_CONTIGUOUS, HAS_BIAS=HAS_BIAS, HAS_V_BIAS=HAS_V_BIAS, HAS_RESIDUAL=HAS_RESIDUAL,
            HAS_SCALE_TENSOR=HAS_SCALE_TENSOR, COMPUTE_DTYPE=COMPUTE_DTYPE, DOT_PRECISION=DOT_PRECISION,
            BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the usual Hopper bf16 tiles; 128x256x64
# and 256x128x64 with 3-4 stages fit in a Hopper SM's shared memory (228 KB) with room for the
# r-loop's U/V tiles.
_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 64, 4, 8),
    (256, 128, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4),
]


def _set_tma_blocks(nargs):
    """Autotuner pre-hook: the descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_K_CONTIGUOUS"] else [bk, bn]


# The TMA kernel's persistent flavour (one program per SM) with the two tiles that ran
# closest to cuBLAS that way (scripts/probe_ws_gemm.py; docs/bench/design-choices.md#bf16-lora-gemm).
_PERSISTENT_TILES = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8)]


def _configs(autotune: bool, pre_hook=None, persistent_tiles=None):
    """Autotuning configurations (knobs: autotune False keeps the first tile only, and no
    persistent one); persistent_tiles None: a kernel without the PERSISTENT parameter (the
    pointer one), else every tile once per flavour."""
    tiles = _TILES if autotune else _TILES[:1]
    flavours = [(tile, {}) for tile in tiles]
    if persistent_tiles is not None:
        flavours = [(tile, {"PERSISTENT": False}) for tile in tiles]
        flavours += [(tile, {"PERSISTENT": True}) for tile in (persistent_tiles if autotune else [])]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **flavour},
                      num_stages=stages, num_warps=warps, pre_hook=pre_hook)
        for (bm, bn, bk, stages, warps), flavour in flavours
    ]


_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_V_BIAS", "HAS_RESIDUAL"]
# 5 ms warm-up / 25 ms of repeats per config (default 25/100): the first call of a new shape
# pays ~6 configs x this; medians of a ~0.4 ms GEMM are stable well within it.
_AUTOTUNE_BENCH = functools.partial(triton.testing.do_bench, warmup=5, rep=25)


# One autotuner per configuration list the knobs select (autotune, persistent), built on first
# use: the knobs are read at launch, and each autotuner keeps its own per-problem results.
@functools.cache
def _pointer_tuned(autotune: bool):
    return triton.autotune(
        configs=_configs(autotune), key=_KEY + ["stride_ak", "stride_bk", "stride_bn"],
        prune_configs_by={"early_config_prune": prune_configs}, do_bench=_AUTOTUNE_BENCH,
    )(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_lora_gemm_kernel))


@functools.cache
def _tma_tuned(autotune: bool, persistent: bool):
    return triton.autotune(
        configs=_configs(autotune, _set_tma_blocks, _PERSISTENT_TILES if persistent else []),
        key=_KEY + ["B_K_CONTIGUOUS"],
        prune_configs_by={"early_config_prune": prune_configs}, do_bench=_AUTOTUNE_BENCH,
    )(_lora_gemm_tma_kernel)


def knob_key() -> tuple[str, bool, bool]:
    """What the knobs make of this GEMM now: (main loop, autotune, persistent; no persistent
    configuration untuned). Part of every key under which a decision about it is kept."""
    current = knobs.current()
    return current.main_loop, current.autotune, current.autotune and current.persistent


# The interpreter runs one small configuration (dot needs every dimension >= 16); the TMA
# kernel persistent, so that its programs loop over several tiles there too.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
_INTERPRETER_TMA_CONFIG = {**_INTERPRETER_CONFIG, "PERSISTENT": True}

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

def _tma_ok(t: Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit last stride, 16-byte aligned rest."""
    size = t.element_size()
    return (t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def _use_tma(a: Tensor, b: Tensor) -> tuple[bool, bool]:
    """(use the TMA kernel, b is K-contiguous) for a (M, K) @ b (K, N)."""
    if knobs.current().main_loop != "auto" or TensorDescriptor is None:
        return False, False
    if a.device.type == "cuda" and capability(a.device) < (9, 0):
        return False, False
    b_k_contiguous = b.stride(0) == 1 and b.stride(1) != 1
    b_view = b.t() if b_k_contiguous else b
    return _tma_ok(a) and _tma_ok(b_view), b_k_contiguous


def _programs(M: int, N: int, cfg: dict, device: torch.device) -> int:
    """Grid size: one program per (BLOCK_M, BLOCK_N) tile of the output, or, persistent, one
    per SM at most."""
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    return min(tiles, processors(device)) if cfg.get("PERSISTENT") else tiles


def _pointer_args(a: Tensor, b: Tensor) -> dict:
    """The pointer main loop's operands: a (M, K) and b (K, N) with their strides."""
    return dict(a_ptr=a, b_ptr=b, stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0),
                stride_bn=b.stride(1))


def _descriptors(a: Tensor, b: Tensor, cfg: dict, b_k_contiguous: bool) -> dict:
    """The TMA main loop's operands: descriptors over a and b blocked for the tile cfg."""
    b_view = b.t() if b_k_contiguous else b
    b_block = [cfg["BLOCK_N"], cfg["BLOCK_K"]] if b_k_contiguous else [cfg["BLOCK_K"], cfg["BLOCK_N"]]
    return dict(a_desc=TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                b_desc=TensorDescriptor.from_tensor(b_view, b_block), B_K_CONTIGUOUS=b_k_contiguous)


class _GemmPlan(Plan):
    """A Plan of this GEMM, and which main loop it runs (tma: the TMA kernel, else the pointer one)."""

    __slots__ = ("tma",)

    def __init__(self, kernel, tuned, tma: bool):
        super().__init__(kernel, tuned)
        self.tma = tma


# (device, dtypes, M bucket, N, K, r block, layout, flags, knob_key(), specialisation) -> _GemmPlan
_PLANS: dict = {}


def launch_lora_gemm(a: Tensor, b: Tensor, u: Tensor, v: Tensor, out: Tensor, scale: float,
                     scale_tensor: Optional[Tensor], bias: Optional[Tensor] = None,
                     v_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                     config: Optional[dict] = None) -> Tensor:
    """out (M, N) = cast(a @ b + s u @ v + bias + s v_bias) (+ residual); all 2-D views.
    config: one fixed tile configuration (BLOCK_*, GROUP_M, PERSISTENT, num_warps, num_stages)
    instead of the autotuned plan, for tests of a configuration the autotuner may not pick."""
    M, K = a.shape
    N = b.shape[1]
    R = u.shape[1]
    if M == 0 or N == 0:  # nothing to write: no launch (0 programs; the epilogue wraps rows by `% M`)
        return out
    dummy = out  # never read: the matching HAS_* flag is False
    scale_tensor = scale_operand(scale_tensor, a.device)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if v_bias is not None and v_bias.stride(0) != 1:
        v_bias = v_bias.contiguous()
    res_strides = residual.stride() if residual is not None else (0, 0)
    m_bucket = rows_bucket(M)  # M >= 1 here
    named = {
        "u_ptr": u, "v_ptr": v,
        "bias_ptr": bias if bias is not None else dummy,
        "v_bias_ptr": v_bias if v_bias is not None else dummy,
        "res_ptr": residual if residual is not None else dummy,
        "out_ptr": out,
        "scale_ptr": scale_tensor if scale_tensor is not None else dummy,
        "M": M, "N": N, "K": K, "R": R, "M_BUCKET": m_bucket,
        "stride_um": u.stride(0), "stride_ur": u.stride(1),
        "stride_vr": v.stride(0), "stride_vn": v.stride(1),
        "stride_rm": res_strides[0], "stride_rn": res_strides[1],
        "stride_om": out.stride(0), "stride_on": out.stride(1),
        "scale": float(scale),
        "HAS_BIAS": bias is not None, "HAS_V_BIAS": v_bias is not None,
        "HAS_RESIDUAL": residual is not None, "HAS_SCALE_TENSOR": scale_tensor is not None,
        "COMPUTE_DTYPE": TL_DTYPES[a.dtype],
        "DOT_PRECISION": dot_precision(a.dtype),
        "BLOCK_R": max(16, min(64, triton.next_power_of_2(R))),  # 16 also for R = 0 (power of 2: 0)
    }
    use_tma, b_k_contiguous = _use_tma(a, b)

    if a.device.type == "cpu" or config is not None:  # one fixed configuration, no plan
        if config is None:  # the interpreter
            config = _INTERPRETER_TMA_CONFIG if use_tma else _INTERPRETER_CONFIG
        cfg = {name: value for name, value in config.items() if name not in ("num_warps", "num_stages")}
        launch = {name: config[name] for name in ("num_warps", "num_stages") if name in config}
        if not use_tma:
            cfg.pop("PERSISTENT", None)  # the pointer kernel has one program per tile
        grid = (_programs(M, N, cfg, a.device),)
        if use_tma:
            _lora_gemm_tma_kernel[grid](**_descriptors(a, b, cfg, b_k_contiguous), **named, **cfg, **launch)
        else:
            _lora_gemm_kernel[grid](**_pointer_args(a, b), EVEN_K=K % cfg["BLOCK_K"] == 0, **named, **cfg,
                                    **launch)
        return out

    knob_values = knob_key()
    shape_key = (a.device, a.dtype, u.dtype, v.dtype, out.dtype, m_bucket, N, K, named["BLOCK_R"],
                 a.stride(), b.stride(), use_tma, b_k_contiguous, named["HAS_BIAS"],
                 named["HAS_V_BIAS"], named["HAS_RESIDUAL"], named["HAS_SCALE_TENSOR"], knob_values)
    key = shape_key + specialization(
        (a, b, u, v, out, named["bias_ptr"], named["v_bias_ptr"], named["res_ptr"], named["scale_ptr"],
         M, res_strides[0], res_strides[1]))
    plan = _PLANS.get(key)
    switch_device = a.device.index != torch.cuda.current_device()
    with torch.cuda.device(a.device) if switch_device else _nullcontext():
        if plan is None:
            plan = _PLANS[key] = _make_plan(a, b, named, use_tma, b_k_contiguous, shape_key, knob_values)
        else:
            if plan.tma:
                named.update(_descriptors(a, b, plan.config, b_k_contiguous))
            else:
                named.update(_pointer_args(a, b), EVEN_K=K % plan.config["BLOCK_K"] == 0)
            plan.launch(named, _programs(M, N, plan.config, a.device))
    return out


def _make_plan(a: Tensor, b: Tensor, named: dict, use_tma: bool, b_k_contiguous: bool,
               shape_key: tuple, knob_values: tuple[str, bool, bool]) -> _GemmPlan:
    """First call of a problem: autotune (and, where TMA is possible, time the TMA main loop
    against the pointer one), launch once, and keep the compiled kernel for later calls."""
    M, N = a.shape[0], b.shape[1]
    _, autotune, persistent = knob_values
    pointer_tuned, tma_tuned = _pointer_tuned(autotune), _tma_tuned(autotune, persistent)

    def grid(cfg):
        return (_programs(M, N, cfg, a.device),)

    def run_pointer():
        return _GemmPlan(pointer_tuned[grid](**_pointer_args(a, b), **named), pointer_tuned, tma=False)

    def run_tma():
        # Block shapes here are placeholders: the autotuner's pre-hook re-blocks per config.
        a_desc = TensorDescriptor.from_tensor(a, [64, 64])
        b_desc = TensorDescriptor.from_tensor(b.t() if b_k_contiguous else b, [64, 64])
        kernel = tma_tuned[grid](a_desc=a_desc, b_desc=b_desc, B_K_CONTIGUOUS=b_k_contiguous, **named)
        return _GemmPlan(kernel, tma_tuned, tma=True)

    if not use_tma:
        return run_pointer()
    # Neither main loop wins everywhere (TMA in some forwards, pointer in some backwards:
    # docs/bench/design-choices.md#bf16-lora-gemm): time both, each autotuned, once per shape.
    choice = fastest("main loop", shape_key, {"tma": run_tma, "pointer": run_pointer})
    return run_tma() if choice == "tma" else run_pointer()
