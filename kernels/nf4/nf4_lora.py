"""The NF4 LoRA linear on CUDA (forward and backward): host functions over the GEMMs that decode
W in their main loop (kernels/nf4/nf4_gemm.py), or over a dense copy of W (one pass,
kernels/nf4/nf4_dequantize.py) handed to the dense LoRA op's host functions
(kernels/lora/lora_linear_triton.py: cuBLAS or Triton, as that op chooses) where that was faster.

Same semantics as the dense op with W = dequantize_nf4(W_nf4) in the activation dtype. Shapes:
x (M, K) (any leading dimensions are flattened), W (N, K) as its NF4 tensors, A (r, K),
B (N, r), s = scale (* scale_tensor).

    forward   H  = X_l A^T                        thin GEMM (lowrank_thin or cuBLAS)
              Y  = X W^T + s H B^T (+b +s b_B)    fused: one GEMM, W decoded per K step
                   (+ residual after the cast)
    backward  G, dA, dB as the dense op           (lora_linear_triton.adapter_grads)
              dX = dY W + s G A                   fused: one GEMM, W decoded per N step
    with dropout (lora_x given): dX = dY W (the same GEMM, rank 0), d_lora_x = s G A.

Each call chooses per problem, timed once (kernels/timed_choice.py, kind "main GEMM", keys
starting "nf4 forward" / "nf4 backward") between "fused" and "dequantize" (W to a buffer, then
the dense op); the knob main_gemm forces one ("triton": fused, "cublas": dequantize). On CPU
tensors (the Triton interpreter) the fused kernels run unless main_gemm is "cublas".
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from triton import next_power_of_2

from .. import knobs, precision
from ..launch_args import row_contiguous
from ..lora.lora_gemm import knob_key
from ..lora.lora_linear_triton import adapter_grads, lora_linear_backward, lora_linear_forward
from ..lora.lowrank_thin import rows_times_thin
from ..lora.supported_inputs import lora_inputs_supported
from ..precision import HALF
from ..reference import effective_scale, rows
from ..timed_choice import CHOICES, fastest, rows_bucket
from .nf4_dequantize import dequantize_nf4_triton
from .nf4_gemm import nf4_gemm_backward, nf4_gemm_forward


def supports(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_x: Optional[Tensor], N: int, K: int) -> tuple[bool, str]:
    """(True, "") when these kernels handle the inputs, else (False, the reason)."""
    def weight_refusal() -> str:
        if N < 1 or K < 64 or K % 64 or x.shape[-1] != K:
            return f"weight ({N}, {K}) and input features {x.shape[-1]}: K must be a positive multiple of 64"
        return ""

    return lora_inputs_supported(x, lora_A, lora_B, lora_x, weight_numel=N * K, weight_refusal=weight_refusal,
                                 kernels="NF4 kernels")


# --------------------------------------------------------------------------------------------
# Which side runs
# --------------------------------------------------------------------------------------------

def _run_chosen(key: tuple, fused, dequantize):
    """The result of `fused` or `dequantize` (zero-argument callables computing the same thing):
    forced by the main_gemm knob, always fused under the interpreter, else the faster for this
    problem, timed once after a first call of each has settled their own choices and tuning."""
    main_gemm = knobs.current().main_gemm
    if main_gemm == "cublas":
        return dequantize()
    if main_gemm == "triton" or key[1].type == "cpu":
        return fused()
    candidates = {"fused": fused, "dequantize": dequantize}
    if key not in CHOICES["main GEMM"]:
        for candidate in candidates.values():
            try:
                candidate()
            except Exception:  # noqa: BLE001  fastest() times it again, logs the error and leaves it out
                pass
    return candidates[fastest("main GEMM", key, candidates)]()


def _mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> Tensor:
    """a @ b with both operands rounded to compute_dtype, fp32 accumulation, out_dtype result."""
    a, b = a.to(compute_dtype), b.to(compute_dtype)
    if a.device.type != "cuda":
        return (a.float() @ b.float()).to(out_dtype)
    if out_dtype == torch.float32 and compute_dtype in HALF:
        try:  # aten::mm.dtype: cuBLAS with an fp32 C, the product never rounded to half
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a, b).to(out_dtype)


def _lora_hidden(adapter_in: Tensor, lora_A: Tensor) -> Tensor:
    """H = X_l A^T (M, r) in the adapter dtype: the thin Triton kernel or cuBLAS, as the dense op."""
    compute = precision.compute_dtype(adapter_in.dtype, lora_A.dtype)
    M = adapter_in.shape[0]
    if M == 0:
        return adapter_in.new_empty((0, lora_A.shape[0]), dtype=lora_A.dtype)
    triton_fn = lambda: rows_times_thin(adapter_in, lora_A.t(), lora_A.dtype)  # noqa: E731
    cublas_fn = lambda: _mm(adapter_in, lora_A.t(), compute, lora_A.dtype)  # noqa: E731
    if compute != adapter_in.dtype:
        return cublas_fn()
    if adapter_in.device.type == "cpu":
        return triton_fn()
    thin = knobs.current().thin
    key = ("H", adapter_in.device, compute, lora_A.dtype, rows_bucket(M), adapter_in.shape[1], lora_A.shape[0])
    candidates = {"triton": triton_fn, "cublas": cublas_fn}
    return candidates[thin if thin != "auto" else fastest("thin GEMM", key, candidates)]()


# --------------------------------------------------------------------------------------------
# Host functions: the contract of the NF4 frozen-base strategy
# --------------------------------------------------------------------------------------------

def nf4_lora_forward(x2d: Tensor, packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor,
                     nf4_code: Tensor, absmax_code: Tensor, N: int, K: int, bias: Optional[Tensor], lora_A: Tensor,
                     lora_B: Tensor, lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor],
                     residual: Optional[Tensor], scale: float, scale_tensor: Optional[Tensor],
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(out, lora_hidden): out = cast(x W^T + b + s (x_l A^T) B^T + s b_B, out_dtype) (+ residual),
    lora_hidden = x_l A^T (rows, r) in the adapter dtype; x_l = lora_x, or x without it."""
    fmt = (packed, absmax_codes, absmax_scale, absmax_offset, nf4_code, absmax_code)
    lead = x2d.shape[:-1]
    x = rows(x2d)

    def fused() -> tuple[Tensor, Tensor]:
        hidden = _lora_hidden(x if lora_x is None else rows(lora_x), lora_A)
        res2d, late_residual = None, None
        if residual is not None:
            if torch.promote_types(out_dtype, residual.dtype) == out_dtype:
                res2d = rows(residual)
            else:  # the add promotes: leave it to torch, as the reference does
                late_residual = residual
        out = torch.empty((x.shape[0], N), device=x.device, dtype=out_dtype)
        u, v = row_contiguous(hidden, x.dtype), row_contiguous(lora_B.t(), x.dtype)
        nf4_gemm_forward(x, *fmt, N, u, v, out, scale, scale_tensor, bias=bias, v_bias=lora_B_bias, residual=res2d)
        out = out.reshape(*lead, N)
        return (out if late_residual is None else out + late_residual), hidden

    def dequantize() -> tuple[Tensor, Tensor]:
        weight = dequantize_nf4_triton(*fmt, N, K, x.dtype)
        return lora_linear_forward(x2d, weight, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                                   scale_tensor, False, out_dtype)

    key = ("nf4 forward", x.device, x.dtype, lora_A.dtype, None if lora_x is None else lora_x.dtype,
           out_dtype, rows_bucket(x.shape[0]), N, K, next_power_of_2(lora_A.shape[0]), bias is not None,
           lora_B_bias is not None, residual is not None, scale_tensor is not None, knob_key())
    if x.shape[0] == 0:
        return fused()
    return _run_chosen(key, fused, dequantize)


def nf4_lora_backward(grad_out2d: Tensor, x2d: Tensor, packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor,
                      absmax_offset: Tensor, nf4_code: Tensor, absmax_code: Tensor, N: int, K: int, lora_A: Tensor,
                      lora_B: Tensor, lora_x: Optional[Tensor], lora_hidden: Tensor, scale: float,
                      scale_tensor: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB) as the dense op's backward with W = dequantize_nf4(W_nf4) in x's
    dtype: dx = dY W (+ s (dY B) A when the adapter read x), d_lora_x = s (dY B) A when it read
    lora_x (else None), dA = s (dY B)^T X_l, dB = s dY^T H; dx in x's dtype and shape, every
    result contiguous."""
    fmt = (packed, absmax_codes, absmax_scale, absmax_offset, nf4_code, absmax_code)
    lead = x2d.shape[:-1]
    grad2d = rows(grad_out2d)
    if grad2d.dtype != x2d.dtype:
        grad2d = grad2d.to(x2d.dtype)
    M = grad2d.shape[0]

    def fused() -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        g, da, db = adapter_grads(grad2d, rows(x2d if lora_x is None else lora_x), lora_A, lora_B, lora_hidden,
                                  scale, scale_tensor)
        dx = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
        if lora_x is None:
            nf4_gemm_backward(grad2d, *fmt, K, g, row_contiguous(lora_A, grad2d.dtype), dx, scale, scale_tensor)
            return dx.reshape(*lead, K), None, da, db
        nf4_gemm_backward(grad2d, *fmt, K, g[:, :0], lora_A[:0], dx, scale, scale_tensor)  # rank 0: dY W alone
        compute = precision.compute_dtype(lora_x.dtype, lora_A.dtype)
        d_lora_x = _mm(g * effective_scale(scale, scale_tensor), lora_A, compute, lora_x.dtype)
        return dx.reshape(*lead, K), d_lora_x.reshape(*lead, K), da, db

    def dequantize() -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        weight = dequantize_nf4_triton(*fmt, N, K, x2d.dtype)
        return lora_linear_backward(grad2d, x2d, weight, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor,
                                    False, x2d.dtype)

    key = ("nf4 backward", x2d.device, x2d.dtype, lora_A.dtype, None if lora_x is None else lora_x.dtype,
           rows_bucket(M), N, K, next_power_of_2(lora_A.shape[0]), scale_tensor is not None, knob_key())
    if M == 0:
        return fused()
    return _run_chosen(key, fused, dequantize)
