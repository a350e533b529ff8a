"""`torch.ops.unsloth.lora_linear` on CUDA (forward and backward): host functions over the Triton
kernels of kernels/lora/lora_gemm.py and kernels/lora/lowrank_thin.py, or cuBLAS where it was faster
(the file name predates the cuBLAS side; unsloth_compile/ops.py imports it by that name).

Same semantics as `lora_linear_forward` / `lora_linear_backward` in kernels/reference.py; the
host functions below keep their signatures. Shapes: x (M, K) after flattening, W (N, K)
(or (K, N) when `weight_transposed`), A (r, K), B (N, r), s = scale (* scale_tensor).

    forward   H  = X_l A^T                      (M, r)  thin GEMM (kernels/lora/lowrank_thin.py or cuBLAS)
              Y  = X W^T + s H B^T (+b +s b_B)  one Triton GEMM: K-loop over X, W, then an
                   (+ residual after the cast)  r-loop over H, B into the same accumulator;
                                                or cuBLAS: Y = s H B^T, then Y += X W^T (beta=1)
    backward  G  = dY B,  dB = s dY^T H         thin: one pass over dY for both (r <= 64), or two
              dX = dY W + s G A                 the same GEMM kernel (N-loop, r-loop) or cuBLAS
              dA = s G^T X_l                    thin
    with dropout (lora_x given): dX = dY W (cuBLAS), d_lora_x = s G A (thin).

Each "or" is decided per problem by timing both once (kernels/timed_choice.py, logged) or
forced by a knob (kernels/knobs.py):
Triton's main product runs level with cuBLAS or behind it depending on the shape (persistent
or warp-specialised alike), so which wins depends on the shape (docs/bench/design-choices.md#bf16-lora-gemm).

The thin GEMMs read their operands in the activation dtype (fp32 adapters are rounded to
bf16/fp16, as the tensor cores need) and accumulate in fp32; gradients of fp32 adapters are
returned in fp32. Nothing ever computes a gradient for W.

On CPU tensors the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before
Triton is imported) with one fixed small configuration, always the Triton side of each
choice; that is how the tests run them without a GPU. On CUDA the GEMM is autotuned per
(M bucket, N, K, r bucket, layout) and later calls launch the compiled kernel directly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from triton import next_power_of_2

from .. import knobs, precision
from ..launch_args import row_contiguous
from .lora_gemm import knob_key as gemm_knob_key, launch_lora_gemm
from .lowrank_thin import PAIR_MAX_RANK, rows_thin_pair, rows_times_thin, thin_t_times_rows
from .supported_inputs import lora_inputs_supported
from ..precision import HALF as _HALF
from ..reference import effective_scale as _effective_scale, rows as _rows
from ..timed_choice import CHOICES, fastest, rows_bucket


# --------------------------------------------------------------------------------------------
# The same product through cuBLAS, and the per-problem choice between the two
# --------------------------------------------------------------------------------------------

def _cublas_lora_gemm(a: Tensor, b: Tensor, u: Tensor, v: Tensor, out: Tensor, scale: float,
                      scale_tensor: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """out = cast(a @ b + s u @ v (+ bias)) with two cuBLAS calls and no (M, N) temporary.

    The thin-K product s U V (+ bias) is written into `out` first, then the base GEMM
    accumulates onto it (beta = 1: cuBLAS reads `out` in its epilogue, a read hidden behind
    a compute-bound GEMM). Why it exists: at some shapes Triton's main product falls further
    behind cuBLAS than the extra write of `out` costs (docs/bench/design-choices.md#bf16-lora-gemm). The low-rank
    term is rounded to out's
    dtype once before the sum.
    """
    if scale_tensor is None:  # cuBLAS scales the fp32 product by alpha: one call, no s U copy
        if bias is None:
            torch.addmm(out, u, v, beta=0, alpha=scale, out=out)  # beta=0: out's contents unread
        else:
            torch.addmm(bias, u, v, alpha=scale, out=out)
    else:  # a tensor scale cannot be alpha without a host sync
        u_scaled = u * _effective_scale(scale, scale_tensor)
        if bias is None:
            torch.mm(u_scaled, v, out=out)
        else:
            torch.addmm(bias, u_scaled, v, out=out)
    return out.addmm_(a, b)


def _lora_gemm_triton_or_cublas(a: Tensor, b: Tensor, u: Tensor, v: Tensor, out: Tensor, scale: float,
                                scale_tensor: Optional[Tensor], bias: Optional[Tensor] = None,
                                v_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
    """out (M, N) = cast(a @ b + s u @ v + bias + s v_bias) (+ residual): the Triton kernel, or
    the cuBLAS composition where it was measured faster for this problem. The composition is
    a candidate only without lora_B bias and residual (which the Triton epilogue fuses) and
    with every operand in the activation dtype (cuBLAS mixes no dtypes)."""
    triton_args = (a, b, u, v, out, scale, scale_tensor, bias, v_bias, residual)
    main_gemm = knobs.current().main_gemm
    if (a.device.type != "cuda" or main_gemm == "triton" or v_bias is not None
            or residual is not None or a.dtype not in _HALF
            or not (out.dtype == b.dtype == u.dtype == v.dtype == a.dtype)
            or (bias is not None and bias.dtype != a.dtype)):
        return launch_lora_gemm(*triton_args)
    if main_gemm == "cublas":
        return _cublas_lora_gemm(a, b, u, v, out, scale, scale_tensor, bias)
    key = (a.device, a.dtype, rows_bucket(a.shape[0]), b.shape[1], a.shape[1],
           next_power_of_2(u.shape[1]), a.stride(), b.stride(), bias is not None, scale_tensor is not None,
           gemm_knob_key())
    candidates = {  # the Triton side autotunes within its first timed call
        "triton": lambda: launch_lora_gemm(*triton_args),
        "cublas": lambda: _cublas_lora_gemm(a, b, u, v, out, scale, scale_tensor, bias),
    }
    return candidates[fastest("main GEMM", key, candidates)]()


# --------------------------------------------------------------------------------------------
# Thin GEMMs (one side of size r, memory-bound) and plain ones: cuBLAS through torch
# --------------------------------------------------------------------------------------------

_mm_out_dtype_works: Optional[bool] = None


def _mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """a @ b with both operands rounded to compute_dtype, fp32 accumulation, out_dtype result."""
    global _mm_out_dtype_works
    a = a.to(compute_dtype)
    b = b.to(compute_dtype)
    if a.device.type != "cuda":
        return (a.float() @ b.float()).to(out_dtype)
    if out_dtype == compute_dtype:
        return torch.mm(a, b)
    if compute_dtype in _HALF and out_dtype == torch.float32 and _mm_out_dtype_works is not False:
        # aten::mm.dtype (cuBLAS with an fp32 C): no rounding of the result to bf16.
        try:
            result = torch.mm(a, b, out_dtype=torch.float32)
            _mm_out_dtype_works = True
            return result
        except (RuntimeError, TypeError):
            _mm_out_dtype_works = False
    return torch.mm(a, b).to(out_dtype)


def _thin_gemm_triton_or_cublas(key: tuple, triton_fn, cublas_fn, triton_ok: bool = True) -> Tensor:
    """The result of whichever of two equivalent thin-GEMM calls is faster for this problem,
    key = (which product, device, dtypes, M bucket, wide size, r). cuBLAS alone when the
    Triton kernel does not apply (triton_ok False: the operand is not in the compute dtype).
    Under the interpreter (CPU) always the Triton kernel: that is what the CPU tests check."""
    if not triton_ok:
        return cublas_fn()
    if key[1].type == "cpu":
        return triton_fn()
    candidates = {"triton": triton_fn, "cublas": cublas_fn}
    thin = knobs.current().thin
    return candidates[thin if thin != "auto" else fastest("thin GEMM", key, candidates)]()


def _g_and_db(key: tuple, one_pass, apart, pair_ok: bool) -> tuple[Tensor, Tensor]:
    """Backward's G = dY B and dB = s dY^T H: from one pass over dY (rows_thin_pair) or from
    two thin GEMMs (`apart`, each itself Triton or cuBLAS), whichever is faster for this
    problem; the one pass saves a read of dY (M x N) for fp32 partials of 1/8 of its size at
    r = 16. Under the interpreter (CPU) always the one pass, as the CPU tests check it."""
    current = knobs.current()
    if not pair_ok or current.thin == "cublas" or not current.thin_pair:
        return apart()
    if key[1].type == "cpu" or current.thin == "triton":
        return one_pass()
    if key not in CHOICES["thin GEMM"]:
        apart()  # settle apart's own choices first, so that their timing is not timed here
    candidates = {"one pass": one_pass, "apart": apart}
    return candidates[fastest("thin GEMM", key, candidates)]()


# --------------------------------------------------------------------------------------------
# Host functions: the contract of unsloth_compile/ops.py
# --------------------------------------------------------------------------------------------


def supports(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             lora_x: Optional[Tensor]) -> tuple[bool, str]:
    """(True, "") when these kernels handle the inputs, else (False, the reason)."""
    def weight_refusal() -> str:
        if weight.dtype != x.dtype or weight.dim() != 2:
            return (f"base weight must be 2-D and of the activation dtype {x.dtype}, "
                    f"got {weight.dtype} {tuple(weight.shape)}")
        return ""

    return lora_inputs_supported(x, lora_A, lora_B, lora_x, weight_numel=weight.numel(),
                                 weight_refusal=weight_refusal, kernels="Triton kernels")


def lora_linear_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor], residual: Optional[Tensor],
    scale: float, scale_tensor: Optional[Tensor], weight_transposed: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(out, lora_hidden) as reference.lora_linear_forward, with one fused GEMM for out."""
    lead = x.shape[:-1]
    x2d = _rows(x)
    M = x2d.shape[0]
    w_t = weight if weight_transposed else weight.t()  # (K, N) view either way
    N = w_t.shape[1]
    adapter_in = x2d if lora_x is None else _rows(lora_x)
    compute = precision.compute_dtype(adapter_in.dtype, lora_A.dtype)
    if M == 0:  # an empty batch: nothing to launch, nor to time (see adapter_grads)
        hidden = torch.empty((0, lora_A.shape[0]), device=x.device, dtype=lora_A.dtype)
    else:
        hidden = _thin_gemm_triton_or_cublas(  # (M, r)
            ("H", x.device, compute, lora_A.dtype, rows_bucket(M), adapter_in.shape[1], lora_A.shape[0]),
            lambda: rows_times_thin(adapter_in, lora_A.t(), lora_A.dtype),
            lambda: _mm(adapter_in, lora_A.t(), compute, lora_A.dtype),
            triton_ok=compute == adapter_in.dtype)

    res2d = None
    late_residual = None
    if residual is not None:
        if torch.promote_types(out_dtype, residual.dtype) == out_dtype:
            res2d = _rows(residual)
        else:  # the add promotes: leave it to torch, exactly as the reference does
            late_residual = residual
    out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    if M > 0:
        # The epilogue reads U, V already in the compute dtype and row-contiguous: fp32 tiles
        # converted in the kernel cost registers and made fp32 adapters at large ranks much
        # slower than bf16 (docs/bench/design-choices.md#bf16-lora-gemm), for two copies of M*r and r*N elements.
        u, v = row_contiguous(hidden, x.dtype), row_contiguous(lora_B.t(), x.dtype)
        _lora_gemm_triton_or_cublas(x2d, w_t, u, v, out, scale, scale_tensor,
                                    bias=bias, v_bias=lora_B_bias, residual=res2d)
    out = out.reshape(*lead, N)
    if late_residual is not None:
        out = out + late_residual
    return out, hidden


def adapter_grads(grad2d: Tensor, adapter_in: Tensor, lora_A: Tensor, lora_B: Tensor,
                  lora_hidden: Tensor, scale: float, scale_tensor: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(G, dA, dB): G = dY B (M, r) unscaled in dY's dtype, dA = s G^T X_l (r, K) and
    dB = s dY^T H (N, r) in the adapter dtype, each from its thin kernel or cuBLAS."""
    (M, N), K, R = grad2d.shape, adapter_in.shape[1], lora_A.shape[0]
    device, compute, adapter_dtype = grad2d.device, grad2d.dtype, lora_A.dtype
    if M == 0:
        # An empty batch: zero dA, dB without a launch, and no timing of an empty problem
        # (its M bucket, 1, is the single-row problems' whose choices it would settle).
        return (grad2d.new_empty((0, R)), torch.zeros((R, K), device=device, dtype=adapter_dtype),
                torch.zeros((N, R), device=device, dtype=adapter_dtype))
    s = _effective_scale(scale, scale_tensor)
    m_bucket = rows_bucket(M)

    def g_and_db_apart() -> tuple[Tensor, Tensor]:
        # (M, r) = dY B, unscaled, in the compute dtype; (N, r) = s dY^T H
        g = _thin_gemm_triton_or_cublas(
            ("G", device, compute, lora_B.dtype, m_bucket, N, R),
            lambda: rows_times_thin(grad2d, lora_B, compute),
            lambda: _mm(grad2d, lora_B, compute, compute))
        db = _thin_gemm_triton_or_cublas(
            ("dB", device, compute, lora_hidden.dtype, m_bucket, N, R),
            lambda: thin_t_times_rows(lora_hidden, grad2d, scale, scale_tensor, adapter_dtype, rank_first=False),
            lambda: _mm(grad2d.t(), lora_hidden, compute, adapter_dtype) * s)
        return g, db

    g, db = _g_and_db(("G+dB", device, compute, lora_B.dtype, lora_hidden.dtype, m_bucket, N, R),
                      lambda: rows_thin_pair(grad2d, lora_B, lora_hidden, scale, scale_tensor, compute,
                                             adapter_dtype),
                      g_and_db_apart, pair_ok=R <= PAIR_MAX_RANK)
    in_compute = precision.compute_dtype(adapter_in.dtype, adapter_dtype)
    da = _thin_gemm_triton_or_cublas(
        ("dA", device, in_compute, g.dtype, m_bucket, K, R),
        lambda: thin_t_times_rows(g, adapter_in, scale, scale_tensor, adapter_dtype, rank_first=True),
        lambda: _mm(g.t(), adapter_in, in_compute, adapter_dtype) * s,
        triton_ok=in_compute == adapter_in.dtype)
    return g, da, db


def lora_linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
    lora_x: Optional[Tensor], lora_hidden: Tensor, scale: float, scale_tensor: Optional[Tensor],
    weight_transposed: bool, base_dtype: torch.dtype,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB) as reference.lora_linear_backward (no bias gradients), every
    result contiguous; with no rows, zero dA, dB and nothing launched."""
    lead = x.shape[:-1]
    K = x.shape[-1]
    grad2d = _rows(grad_out)
    if grad2d.dtype != base_dtype:
        grad2d = grad2d.to(base_dtype)
    M = grad2d.shape[0]
    w_nk = weight.t() if weight_transposed else weight  # (N, K) view either way
    adapter_dtype = lora_A.dtype
    s = _effective_scale(scale, scale_tensor)
    compute = grad2d.dtype
    g, da, db = adapter_grads(grad2d, _rows(x if lora_x is None else lora_x), lora_A, lora_B,
                              lora_hidden, scale, scale_tensor)

    if lora_x is None:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        if M > 0:
            _lora_gemm_triton_or_cublas(grad2d, w_nk, g, row_contiguous(lora_A, compute), dx, scale, scale_tensor)
        d_lora_x = None
    else:
        dx = _mm(grad2d, w_nk, compute, x.dtype) if M > 0 else x.new_empty((0, K))
        lx_compute = precision.compute_dtype(lora_x.dtype, adapter_dtype)
        d_lora_x = _mm(g * s, lora_A, lx_compute, lora_x.dtype).reshape(*lead, K)
    return dx.reshape(*lead, K), d_lora_x, da, db
