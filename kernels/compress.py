"""Compression of tensors saved for backward: plain torch, the CPU path and the oracle.

    rowwise_compress(x, "fp8")    q (..., K) float8_e4m3fn, scale (..., 1) fp32   COAT-style
    rowwise_compress(x, "int8")   q (..., K) int8,          scale (..., 1) fp32   absmax
    rowwise_decompress(q, scale, dtype)  q * scale in fp32, then dtype

    random_projection(K, k, seed, device, dtype)   P (K, k), entries +-1/sqrt(k)
    range_projection(x, k, seed, dtype)            Q (K, k), orthonormal, ~ x's top-k row space
    project_rows(x, P, mask, mask_scale)            Z = (x [* mask * mask_scale]) P, (..., k)
    lora_linear_backward_projected(...)             the LoRA op's backward with dA from Z, P

Row-wise scales: one scale per row of the last dimension (a token's activations), so an
outlier token costs precision in its own row only. e4m3 keeps 3 mantissa bits (relative
rounding error <= 2^-4 per element, about 31 dB SQNR on Gaussian rows); int8 with absmax
scaling has a step of amax / 127 (41-45 dB on Gaussian rows of 64-4096 elements).

Low rank (CompAct-style): the LoRA op needs its input X only for dA = s G^T X, G = dY B
(r x K from M x K). With a random P (K x k) whose entries are independent +-1/sqrt(k)
(Rademacher), E[P P^T] = I_K, so s G^T (X P) P^T is an unbiased estimate of dA that keeps
only Z = X P (M x k) and P. Its error is large per step: for each row m of dA,
E ||m P P^T - m||^2 = (K - 1) / k * ||m||^2 (a Gaussian P gives (K + 1) / k), so the
relative error is about sqrt(K / k): training relies on P being drawn afresh each step.

Range (the default, GaLore's argument): P = Q, orthonormal columns spanning approximately the
top-k right singular subspace of this step's X, from a randomized range finder with one
power iteration (Halko, Martinsson, Tropp 2011, alg. 4.3): Omega (K x k) Gaussian,
Q = orth(X^T X Omega). Then s G^T Z Q^T = s G^T X Q Q^T drops only the part of X outside
that subspace: biased, but where activations have a decaying spectrum its error is far
below the random projection's (on MiniLM's LoRA inputs, k = 128: relative error of dA
0.23-0.29 for K = 384 and 0.38-0.48 for K = 1536, against 1.7 and 3.4;
docs/bench/compress-lowrank-error.md).
Cost 2 M K k more flops than the random projection (X Omega, X^T Y) and a QR of K x k; the
same bytes are saved (Z and Q). With M <= k, Q spans all of X's rows and dA is exact.

All of this is a few torch ops per tensor, which run on CUDA as well. The pass writes the
row-wise compress and decompress into the graphs as these same aten ops
(passes/compress/compress_rewrite.py), which Inductor fuses with their neighbours. Where a
hand-written Triton kernel would still help: the LoRA backward's dA GEMM reading the fp8 or
int8 rows and their scales directly (Inductor runs the decompress as its own kernel before
the opaque LoRA op, writing the decompressed x once), and lowrank's Z = X P computed inside
the forward LoRA kernel, which reads X anyway (today a separate GEMM re-reads it).

Nothing of the project is imported here (kernels/ sits at the bottom of the dependency
order).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError

ROWWISE_FORMATS = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# Largest magnitude each code represents: e4m3fn's finite max, int8's symmetric range.
CODE_MAX = {"fp8": torch.finfo(torch.float8_e4m3fn).max, "int8": 127.0}


def rows(t: Tensor) -> Tensor:
    """(..., D) -> (rows, D), a view whenever the strides allow it."""
    return t.reshape(-1, t.shape[-1])


def rowwise_compress(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(q, scale): x ~= q * scale row by row; q contiguous in the format's dtype, scale fp32
    of shape (..., 1). A row of zeros gets scale 1 (its codes are 0)."""
    if fmt not in ROWWISE_FORMATS:
        raise UnslothCompileError(f"unsloth_compile.kernels.compress: rowwise_compress format {fmt!r} is not one of "
                                  f"{sorted(ROWWISE_FORMATS)}")
    code_max = CODE_MAX[fmt]
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / code_max, torch.ones_like(amax))
    scaled = (xf / scale).clamp(-code_max, code_max)  # rounding of amax / scale may exceed by 1 ulp
    if fmt == "int8":
        scaled = scaled.round()
    return scaled.to(ROWWISE_FORMATS[fmt]).contiguous(), scale.contiguous()


def rowwise_decompress(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale in fp32, returned contiguous in `dtype` (the compressed tensor's dtype)."""
    return (q.float() * scale).to(dtype).contiguous()


def random_projection(in_features: int, k: int, seed: int, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    """P (in_features, k) with independent entries +-1/sqrt(k) drawn from `seed` on `device`
    (a private generator: the global random stream, dropout's included, is untouched)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    signs = torch.randint(0, 2, (in_features, k), generator=generator, device=device, dtype=torch.float32)
    return ((signs * 2 - 1) / math.sqrt(k)).to(dtype)


def range_projection(x: Tensor, k: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Q (K, k) with orthonormal columns, Q = orth(X^T X Omega) for X = x as rows and Omega
    (K, k) standard normal drawn from `seed` on x's device (a private generator). Computed in
    fp32 (fp64 for an fp64 x): X^T X squares X's scale, which fp16 could not hold."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2d = rows(x).to(compute)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    omega = torch.randn(x2d.shape[1], k, generator=generator, device=x.device, dtype=compute)
    # Householder QR, not Cholesky-QR: X^T X Omega is rank-deficient whenever M < k (and
    # for rows of zeros), where Cholesky fails; QR still returns orthonormal columns whose
    # span contains every row of X.
    q = torch.linalg.qr(x2d.t() @ (x2d @ omega)).Q
    return q.to(dtype)


def project_rows(x: Tensor, projection: Tensor, dropout_mask: Optional[Tensor] = None,
                 dropout_scale: float = 1.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Z = x' P, (..., k), where x' is what the LoRA adapter reads: x cast to the adapter
    dtype (P's), times the dropout mask and 1 / (1 - p) when given, the order of
    ops/dropout.py's dropout_input. Computed in P's dtype, stored in `out_dtype` (default P's): the pass
    stores Z in x's dtype when that is smaller (bf16 rounding, 2^-9 relative, is far below
    the estimator's own error)."""
    x_in = x.to(projection.dtype)
    if dropout_mask is not None:
        x_in = x_in * dropout_mask * dropout_scale
    z = (rows(x_in) @ projection).reshape(*x.shape[:-1], projection.shape[1])
    return z.to(out_dtype or projection.dtype)


def lora_linear_backward_projected(
    grad_out: Tensor, x_proj: Tensor, projection: Tensor, x_dtype: torch.dtype, weight: Tensor,
    lora_A: Tensor, lora_B: Tensor, lora_x_dtype: Optional[torch.dtype], lora_hidden: Tensor,
    scale, weight_transposed: bool, base_dtype: torch.dtype,
    dropout_mask: Optional[Tensor] = None, dropout_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB) of the LoRA op as reference.lora_linear_backward computes them,
    except dA = s (G^T Z) P^T from Z = x' P instead of s G^T x'. `scale` is the effective
    scale (a float or a 0-d tensor). dx, d_lora_x and dB do not involve x and are exact.
    lora_x_dtype: the dtype of the adapter's separate input (dropout given as a tensor), whose
    gradient is returned as d_lora_x; None when the adapter read x (dx then includes it)."""
    grad2d = rows(grad_out)
    dx = grad2d.to(base_dtype) @ (weight.t() if weight_transposed else weight)
    grad_lora = grad2d.to(lora_A.dtype) * scale
    dB = grad_lora.t() @ lora_hidden
    d_hidden = grad_lora @ lora_B
    # (G^T Z) P^T: r x k then r x K, never the M x K reconstruction Z P^T.
    dA = (d_hidden.t() @ rows(x_proj).to(lora_A.dtype)) @ projection.t().to(lora_A.dtype)
    d_adapter_in = d_hidden @ lora_A
    lead, K = x_proj.shape[:-1], lora_A.shape[1]
    d_lora_x = x_proj.new_empty((0,), dtype=x_dtype)
    if lora_x_dtype is not None:
        d_lora_x = d_adapter_in.to(lora_x_dtype).reshape(*lead, K)
    elif dropout_mask is not None:
        # ops.lora_linear_backward's order: the base's dx in x's dtype, plus the adapter
        # input's gradient (adapter dtype) back through the dropout, cast to it.
        d_in = d_adapter_in.reshape(*lead, K) * dropout_mask * dropout_scale
        dx = dx.to(x_dtype).reshape(*lead, K)
        dx = dx + d_in.to(dx.dtype)
    else:
        dx = dx + d_adapter_in.to(x_dtype)
    return dx.to(x_dtype).reshape(*lead, K).contiguous(), d_lora_x, dA, dB
