"""Float8 (e4m3) frozen base for the LoRA linear: rowwise quantisation, the base's two GEMMs
in fp8, and the LoRA term beside them in the adapter dtype.

Math (x: M x K activations, W: N x K frozen weight, dY: M x N output gradient):

    W   = diag(w_s) W_q              W_q = e4m3(W / w_s), one scale per output row, stored once
    Y   = X W^T   ~ diag(x_s) X_q W_q^T diag(w_s)       X_q: e4m3 of X by rows, per call
    dX  = dY W    = (dY diag(w_s)) W_q ~ diag(g_s) G_q W_q     G_q: e4m3 of G = dY diag(w_s) by rows

The backward folds the weight's row scales into dY's columns before quantising dY by rows, so
one fp8 copy of W with one scale vector serves both GEMMs: N K + 4 N bytes instead of bf16's
2 N K. The alternatives cost more memory: a second copy with per-column scales for dY W (the
rowwise layout torch._scaled_mm wants for `b`) brings the weight back to 2 N K bytes; a
per-tensor scale saves the same as ours but one outlier row then coarsens every row.
torch._scaled_mm takes `b` column-major only, so dY W reads W_q transposed: a transient
K x N fp8 copy per backward call (N K bytes read and written, freed at once; `transposed_codes`).

Conventions (torchao's float8 rowwise recipe; scales are dequantisation multipliers, what
torch._scaled_mm multiplies by):
- amax per row in fp32; scale = 448 / max(amax, 1e-12) rounded *down* to a power of two (its
  exponent bits), so |t * scale| <= 448, and multiplying by the scale or its inverse is exact.
- t * scale is clamped to [-448, 448] before the cast (saturation: CUDA's cast turns values
  past 448 into NaN, the CPU cast saturates them; the clamp makes both agree), then rounded to
  nearest-even by the cast to float8_e4m3fn.
- A zero row has amax 0, scale 2^48: its codes and its outputs are zero. Values below
  2^-9 / scale (e4m3's smallest subnormal) flush to zero.
- A NaN in a row makes the row's amax NaN, so every code of the row and every output of that
  row is NaN; an inf makes the scale 0 and inf * 0 = NaN: also the whole row. Non-finite
  inputs are never saturated into finite values (that would hide an overflow); a row of bf16
  eager output with an inf input is +-inf or NaN as well.

Two flavours of every GEMM, bitwise the same quantisation:
- emulated (`emulate=True`, the reference and the CPU path): codes to fp32, fp32 matmul,
  times both scales (exact: powers of two), rounded to bf16 as torch._scaled_mm returns;
- torch._scaled_mm (rowwise scales; CUDA capability >= 8.9), which needs K and N multiples
  of 16, `a` row-major, `b` column-major, fp32 scales (M, 1) and (1, N), bf16 output.

On the GPU, the quantisation is one Triton kernel (kernels/fp8/fp8_quantize.py, bitwise the torch
spelling here), and the LoRA term's thin products run on the bf16 path's Triton kernels
(lowrank_thin, lora_linear_triton's adapter gradients). The LoRA op's two GEMMs (`_lora_*_on_gpu`
below) are the Triton FP8 GEMM with the term in its epilogue (kernels/fp8/fp8_gemm.py) wherever it
runs (Hopper), else torch._scaled_mm followed by a rank-r cuBLAS addmm of the LoRA term into its
output (`_fp8_gemm`; the knob UNSLOTH_LORA_MAIN_GEMM=cublas forces the latter). The fused kernel
adds the term to the fp32 tile and rounds once, where the composition rounds the fp8 product to
bf16 first. Only kernels/ modules are imported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import adapter_backward, effective_scale, rows
from ...errors import UnslothCompileError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_EPS = 1e-12  # torchao's: keeps the scale of an all-zero row finite
GEMM_ALIGNMENT = 16  # torch._scaled_mm: K and N multiples of 16
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
GEMM_OUT_DTYPE = torch.bfloat16  # the only output dtype torch._scaled_mm takes with rowwise scales
HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- quantisation


def saturate_to_e4m3(t: Tensor) -> Tensor:
    """Clamp to +-448, then round to nearest-even e4m3. NaN stays NaN."""
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def scale_from_amax(amax: Tensor) -> Tensor:
    """fp32 power-of-two multiplier that maps amax to at most 448 (0 for inf, NaN for NaN): the
    largest power of two <= 448 / amax, read from the ratio's exponent bits (exact; a log2 in
    fp32 can round a ratio just below 2^k up to k). kernels/fp8/fp8_quantize.py does the same."""
    ratio = E4M3_MAX / amax.float().clamp(min=AMAX_EPS)
    power = (ratio.view(torch.int32) & 0x7F800000).view(torch.float32)
    return torch.where(ratio.isnan(), ratio, power)


def quantize_rowwise(t: Tensor, col_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(codes, dequant) for a 2-D tensor of any float dtype and strides (times col_scale (C,)
    fp32 along its columns first, when given): codes (R, C) e4m3 contiguous, dequant (R, 1)
    fp32 with t ~ codes * dequant. On CUDA one Triton kernel (kernels/fp8/fp8_quantize.py, bitwise
    the same); elsewhere torch."""
    if t.device.type == "cuda":
        from .fp8_quantize import quantize_rows

        return quantize_rows(t, col_scale)
    if col_scale is not None:
        t = t.float() * col_scale.reshape(1, -1)
    if t.shape[-1] == 0:  # amax over an empty row is undefined: no codes, unit scales
        return torch.empty(t.shape, dtype=E4M3, device=t.device), torch.ones(t.shape[0], 1, device=t.device)
    # amax from the row's min and max: one read of t, no |t| or fp32 copy of it (NaN propagates)
    low, high = torch.aminmax(t, dim=-1, keepdim=True)
    scale = scale_from_amax(torch.maximum(low.abs(), high.abs()))
    scaled = t * scale  # fp32 by type promotion; exact, the scale is a power of two
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous(), 1.0 / scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A dense (N, K) weight -> (W_q (N, K) e4m3, w_s (N,) fp32): the stored form."""
    codes, dequant = quantize_rowwise(weight)
    return codes, dequant.reshape(-1)


def dequantize_rowwise(codes: Tensor, dequant: Tensor) -> Tensor:
    """fp32 values of codes (R, C) with dequant of shape (R, 1) or (R,)."""
    return codes.float() * dequant.reshape(-1, 1)


# ----------------------------------------------------------------------------- where it runs


def gemm_shape_problem(n: int, k: int) -> Optional[str]:
    """Why torch._scaled_mm cannot run a linear with K inputs and N outputs, or None."""
    bad = [f"{name}={size}" for name, size in (("K (in_features)", k), ("N (out_features)", n))
           if size == 0 or size % GEMM_ALIGNMENT]
    if bad:
        return (f"{' and '.join(bad)} not a non-zero multiple of {GEMM_ALIGNMENT}, which the fp8 GEMM "
                f"(torch._scaled_mm) needs")
    return None


def scaled_mm_problem(device: torch.device) -> Optional[str]:
    """Why fp8 GEMMs cannot run on this CUDA device, with the way out, or None."""
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"precision='fp8' needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(fp8 tensor cores: Ada, Hopper, Blackwell); {device} ({torch.cuda.get_device_name(device)}) has "
            f"{capability[0]}.{capability[1]}. Use precision='default' (the base in its own dtype), or "
            f"kernels='reference' to emulate the fp8 numerics (slow; for checking accuracy only)")


def require_scaled_mm(device: torch.device) -> None:
    problem = scaled_mm_problem(device)
    if problem is not None:
        raise UnslothCompileError(f"unsloth_compile: {problem}")


# ----------------------------------------------------------------------------- the two GEMMs


def _scaled_gemm(a_codes: Tensor, a_dequant: Tensor, b_codes: Tensor, b_dequant: Tensor, emulate: bool) -> Tensor:
    """diag(a_dequant) A_q B_q diag(b_dequant) in bf16. a_codes (M, C) row-major; b_codes
    (C, P), column-major on the torch._scaled_mm path; dequants (M, 1) and (1, P) fp32."""
    if emulate:
        return ((a_codes.float() @ b_codes.float()) * a_dequant * b_dequant).to(GEMM_OUT_DTYPE)
    problem = gemm_shape_problem(b_codes.shape[1], a_codes.shape[1])
    if problem is not None:
        raise UnslothCompileError(f"unsloth_compile: {problem}")
    if a_codes.shape[0] == 0:
        return a_codes.new_empty((0, b_codes.shape[1]), dtype=GEMM_OUT_DTYPE)
    return torch._scaled_mm(a_codes, b_codes, scale_a=a_dequant, scale_b=b_dequant, out_dtype=GEMM_OUT_DTYPE)


def base_forward(x2d: Tensor, w_codes: Tensor, w_dequant: Tensor, emulate: bool) -> Tensor:
    """X W^T (M, N) in bf16: X quantised by rows here, W stored as (codes, row dequant)."""
    x_codes, x_dequant = quantize_rowwise(x2d)
    return _codes_times_weight(x_codes, x_dequant, w_codes, w_dequant, emulate)


def _codes_times_weight(x_codes: Tensor, x_dequant: Tensor, w_codes: Tensor, w_dequant: Tensor,
                        emulate: bool) -> Tensor:
    """X W^T (M, N) in bf16 from X already quantised by rows."""
    return _scaled_gemm(x_codes, x_dequant, w_codes.t(), w_dequant.reshape(1, -1), emulate)


def base_grad_input(grad2d: Tensor, w_codes: Tensor, w_dequant: Tensor, emulate: bool) -> Tensor:
    """dY W (M, K) in bf16: G = dY diag(w_s) (exact: w_s is a power of two) quantised by rows,
    times W_q, whose column-major layout is a transient transposed copy."""
    g_codes, g_dequant = quantize_rowwise(grad2d, col_scale=fold_scales(w_dequant))
    return _grad_codes_times_weight(g_codes, g_dequant, w_codes if emulate else transposed_codes(w_codes).t(),
                                    emulate)


# Rows of dY this wide or wider read W's scales for the fold in bf16 (exact: powers of two of
# fp32's exponent range, 2^-48 and up): from this width each row's fp32 scales, read from L2,
# cost more than the cast (docs/bench/design-choices.md#fp8-quantisation-and-transpose); narrower, two rows per
# program share the fp32 scales and the cast's extra launch would cost about what it saves.
FOLD_IN_BF16_FROM = 8192


def fold_scales(w_dequant: Tensor) -> Tensor:
    """W's row dequant scales as backward's quantisation of dY reads them for the fold."""
    if w_dequant.device.type == "cuda" and w_dequant.numel() >= FOLD_IN_BF16_FROM:
        return w_dequant.to(torch.bfloat16)
    return w_dequant


def transposed_codes(w_codes: Tensor) -> Tensor:
    """W_q^T (K, N) contiguous, the backward's transient copy: on CUDA (and under the Triton
    interpreter) one tiled Triton kernel (kernels/fp8/fp8_transpose.py: torch's strided copy of a
    1-byte dtype runs at an eighth of the memory's rate), elsewhere torch."""
    from ..launch_args import interpreting

    if w_codes.device.type == "cuda" or interpreting():
        from .fp8_transpose import transpose_codes

        return transpose_codes(w_codes)
    return w_codes.t().contiguous()


def _grad_codes_times_weight(g_codes: Tensor, g_dequant: Tensor, w_codes: Tensor, emulate: bool) -> Tensor:
    """G_q W_q (M, K) in bf16 from G = dY diag(w_s) already quantised by rows; w_codes (N, K),
    column-major on the torch._scaled_mm path. W's scales are in G, so its own are ones."""
    ones = torch.ones(1, w_codes.shape[1], dtype=torch.float32, device=w_codes.device)
    return _scaled_gemm(g_codes, g_dequant, w_codes, ones, emulate)


def stored_or_quantized(weight: Tensor, weight_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(codes, row dequant) of the base: as stored (weight e4m3 with its scale), or a dense
    weight quantised now (the pass's per-call form, for a model that was not converted)."""
    if weight_scale is not None:
        if weight.dtype != E4M3:
            raise UnslothCompileError(f"unsloth_compile: an fp8 base weight must be {E4M3}, got {weight.dtype}; with "
                                      "weight_scale pass the e4m3 codes from quantize_weight, or the dense weight "
                                      "without weight_scale")
        return weight, weight_scale
    return quantize_weight(weight)


def fp8_linear_forward(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                       emulate: bool) -> Tensor:
    """x W^T + b with W in fp8: (..., N) in x's dtype (bias added after the cast, in that dtype)."""
    out = base_forward(rows(x), weight, weight_scale, emulate).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_backward(grad_out: Tensor, weight: Tensor, weight_scale: Tensor, x_dtype: torch.dtype,
                        emulate: bool) -> Tensor:
    """dx = dY W with W in fp8: (..., K) in x's dtype."""
    dx = base_grad_input(rows(grad_out), weight, weight_scale, emulate).to(x_dtype)
    return dx.reshape(*grad_out.shape[:-1], weight.shape[1])


# ----------------------------------------------------------------------------- LoRA linear


def lora_linear_fp8_forward(x: Tensor, weight: Tensor, weight_scale: Optional[Tensor], bias: Optional[Tensor],
                            lora_A: Tensor, lora_B: Tensor, lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor],
                            residual: Optional[Tensor], scale: float, scale_tensor: Optional[Tensor],
                            out_dtype: torch.dtype, emulate: bool) -> tuple[Tensor, Tensor]:
    """reference.lora_linear_forward with the base GEMM in fp8: (out, lora_hidden).

    out = (fp8(x W^T) + b + s (x_l A^T) B^T + s b_B).to(out_dtype) (+ residual). Emulated: the
    LoRA term in the adapter dtype, in the reference's order of operations. On the GPU with
    half-precision activations: `_lora_forward_on_gpu`."""
    w_codes, w_dequant = stored_or_quantized(weight, weight_scale)
    if not emulate and x.dtype in HALF:
        return _lora_forward_on_gpu(x, w_codes, w_dequant, bias, lora_A, lora_B, lora_B_bias, lora_x, residual,
                                    scale, scale_tensor, out_dtype)
    base = rows(fp8_linear_forward(x, w_codes, w_dequant, bias, emulate))
    adapter_in = rows(x if lora_x is None else lora_x).to(lora_A.dtype)
    lora_hidden = adapter_in @ lora_A.t()
    lora = torch.nn.functional.linear(lora_hidden, lora_B, lora_B_bias)
    out = (base + lora * effective_scale(scale, scale_tensor)).to(out_dtype)
    if residual is not None:
        out = out + rows(residual)
    return out.reshape(*x.shape[:-1], out.shape[-1]), lora_hidden


def lora_linear_fp8_backward(grad_out: Tensor, x: Tensor, weight: Tensor, weight_scale: Optional[Tensor],
                             lora_A: Tensor, lora_B: Tensor, lora_x: Optional[Tensor], lora_hidden: Tensor,
                             scale: float, scale_tensor: Optional[Tensor], emulate: bool
                             ) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB), as reference.lora_linear_backward with dY W in fp8; x may be a
    stand-in of x's shape and dtype when the adapter reads lora_x. Contiguous results. On the
    GPU with half-precision activations: `_lora_backward_on_gpu`."""
    w_codes, w_dequant = stored_or_quantized(weight, weight_scale)
    if not emulate and x.dtype in HALF:
        return _lora_backward_on_gpu(grad_out, x, w_codes, w_dequant, lora_A, lora_B, lora_x, lora_hidden, scale,
                                     scale_tensor)
    grad2d = rows(grad_out)
    dx = base_grad_input(grad2d, w_codes, w_dequant, emulate).to(x.dtype)
    grad_lora = grad2d.to(lora_A.dtype) * effective_scale(scale, scale_tensor)
    return adapter_backward(grad_lora, dx, x, lora_x, lora_A, lora_B, lora_hidden)


# ----------------------------------------------------------------------------- LoRA linear on the GPU


def _lora_forward_on_gpu(x: Tensor, w_codes: Tensor, w_dequant: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                         lora_B: Tensor, lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor],
                         residual: Optional[Tensor], scale: float, scale_tensor: Optional[Tensor],
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The forward as the bf16 kernels compute the LoRA term: H = X_l A^T by the thin Triton
    GEMM (operands rounded to x's dtype, fp32 accumulation; H kept in the adapter dtype), X
    quantised by rows once, then the fp8 GEMM with s H B^T: fused in its epilogue, or
    torch._scaled_mm and one rank-r cuBLAS addmm into its output in place (the M x N output read
    and written once more) where the fused kernel cannot run (`_fp8_gemm`)."""
    from .fp8_gemm import PREFETCH_MAX_RANK
    from ..launch_args import row_contiguous
    from ..lora.lowrank_thin import rows_times_thin

    x2d = rows(x)
    adapter_in = x2d if lora_x is None else rows(lora_x)
    if adapter_in.dtype in HALF:
        lora_hidden = rows_times_thin(adapter_in, lora_A.t(), lora_A.dtype)
    else:
        lora_hidden = adapter_in.to(lora_A.dtype) @ lora_A.t()
    s = effective_scale(scale, scale_tensor)
    x_codes, x_dequant = quantize_rowwise(x2d)

    # The residual is added inside the op's GEMM (the fused kernel's epilogue: one pass over the
    # output fewer: docs/bench/design-choices.md#fp8-gemms) when that is what
    # the op computes, `out.to(x.dtype) + residual`: out_dtype is x's and the add does not promote.
    fuse_residual = (residual is not None and out_dtype == x.dtype
                     and torch.promote_types(out_dtype, residual.dtype) == out_dtype)

    def with_scaled_mm() -> Tensor:
        out = _codes_times_weight(x_codes, x_dequant, w_codes, w_dequant, emulate=False)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if bias is not None:
            out += bias
        out.addmm_((lora_hidden * s).to(out.dtype), lora_B.t().to(out.dtype))
        if lora_B_bias is not None:
            out += (lora_B_bias * s).to(out.dtype)
        if fuse_residual:
            out += rows(residual)
        return out

    def fused() -> Tensor:
        from .fp8_gemm import fp8_lora_gemm

        out = torch.empty((x2d.shape[0], w_codes.shape[0]), device=x.device, dtype=x.dtype)
        # H, and B^T as the (r, N) view of B (stride r along N), are read as they are: at r <= 64
        # the kernel loads both tiles before its main loop, where the strided loads cost nothing
        # measurable against a contiguous copy (docs/bench/design-choices.md#fp8-gemms); past that, loaded after it,
        # B^T is copied contiguous first.
        v = lora_B.t() if lora_B.shape[1] <= PREFETCH_MAX_RANK else row_contiguous(lora_B.t(), x.dtype)
        return fp8_lora_gemm(x_codes, x_dequant, w_codes, w_dequant, lora_hidden, v, out, scale, scale_tensor,
                             bias=bias, v_bias=lora_B_bias, residual=rows(residual) if fuse_residual else None)

    out = _fp8_gemm("forward", x_codes, w_codes, with_scaled_mm, fused).to(out_dtype)
    if residual is not None and not fuse_residual:
        out = out + rows(residual)
    return out.reshape(*x.shape[:-1], out.shape[-1]), lora_hidden


def _lora_backward_on_gpu(grad_out: Tensor, x: Tensor, w_codes: Tensor, w_dequant: Tensor, lora_A: Tensor,
                          lora_B: Tensor, lora_x: Optional[Tensor], lora_hidden: Tensor, scale: float,
                          scale_tensor: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """dX = dY W in fp8 (dY quantised by rows with W's row scales folded in, one Triton pass);
    G = dY B, dA, dB by the bf16 path's thin Triton kernels (lora_linear_triton's adapter
    gradients, read from dY in x's dtype); the adapter's share s G A added to dX in the fp8
    GEMM's epilogue or by one rank-r cuBLAS addmm after torch._scaled_mm (`_fp8_gemm`'s choice),
    or, with lora_x, computed apart as d_lora_x."""
    from ..lora.lora_linear_triton import adapter_grads

    grad2d = rows(grad_out)
    if grad2d.dtype != x.dtype:
        grad2d = grad2d.to(x.dtype)
    adapter_in = rows(x if lora_x is None else lora_x)
    g, dA, dB = adapter_grads(grad2d, adapter_in, lora_A, lora_B, lora_hidden, scale, scale_tensor)
    g_codes, g_dequant = quantize_rowwise(grad2d, col_scale=fold_scales(w_dequant))
    w_t = transposed_codes(w_codes)  # (K, N): W_q K-contiguous for dY W, a transient copy
    s = effective_scale(scale, scale_tensor)
    M, (K, N) = grad2d.shape[0], w_t.shape
    lead = x.shape[:-1]

    def base_only() -> Tensor:
        dx = _grad_codes_times_weight(g_codes, g_dequant, w_t.t(), emulate=False)
        return dx if dx.dtype == x.dtype else dx.to(x.dtype)

    if lora_x is not None:
        d_lora_x = ((g * s).to(lora_x.dtype) @ lora_A.to(lora_x.dtype)).reshape(*lead, K)
        return base_only().reshape(*lead, K), d_lora_x, dA, dB

    def with_scaled_mm() -> Tensor:
        dx = base_only()
        dx.addmm_((g * s).to(dx.dtype), lora_A.to(dx.dtype))
        return dx

    def fused() -> Tensor:
        from .fp8_gemm import fp8_lora_gemm

        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        return fp8_lora_gemm(g_codes, g_dequant, w_t, None, g, lora_A, dx, scale, scale_tensor)

    dx = _fp8_gemm("backward", g_codes, w_t, with_scaled_mm, fused)
    return dx.reshape(*lead, K), None, dA, dB


def _fp8_gemm(direction: str, a_codes: Tensor, b_codes: Tensor, with_scaled_mm, fused) -> Tensor:
    """The LoRA op's fp8 GEMM plus its low-rank term: `fused` (kernels/fp8/fp8_gemm.py) wherever it
    can run, else `with_scaled_mm`; the knob main_gemm="cublas" forces the latter.

    Why not timed per problem, as the bf16 path's main GEMM is: timed alone, back to back, the
    two come out close and the timing can pick torch._scaled_mm, while inside whole fwd+bwd
    steps the fused kernel was faster at every benchmark shape (docs/bench/design-choices.md#fp8-gemms)."""
    from .. import knobs
    from .fp8_gemm import unsupported

    main_gemm = knobs.current().main_gemm
    if main_gemm == "cublas" or a_codes.shape[0] == 0:
        return with_scaled_mm()
    problem = unsupported(a_codes, b_codes)
    if problem is not None:
        if main_gemm == "triton":
            raise UnslothCompileError("unsloth_compile: main_gemm='triton' but the Triton FP8 GEMM cannot run the "
                                      f"{direction} GEMM {tuple(a_codes.shape)} x {tuple(b_codes.shape)}^T: {problem}")
        return with_scaled_mm()
    return fused()
