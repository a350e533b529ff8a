"""Plain-torch implementations of every `torch.ops.unsloth.*` op.

They are the CPU path and the numerical oracle of every test: each mirrors, operation by
operation and dtype by dtype, what eager PyTorch computes for the unfused pattern (PEFT's
`result + lora_B(lora_A(dropout(x.to(adapter_dtype)))) * scaling`, then `.to(base_dtype)`,
then the residual add), so that on CPU the compiled model matches eager to rounding.

Nothing of the project is imported here (kernels/ sits at the bottom of the dependency
order).

Shapes (leading dimensions of x are flattened to M rows):
    x        (..., K)     activations, base dtype
    weight   (N, K)       frozen base weight; (K, N) when weight_transposed (GPT-2 Conv1D)
    bias     (N,)         base bias, optional, frozen or trainable
    lora_A   (r, K)       adapter dtype (fp32 under PEFT's default autocast_adapter_dtype)
    lora_B   (N, r)
    lora_B_bias (N,)      optional (PEFT lora_bias=True)
    lora_x   (..., K)     what the adapter reads when it differs from x (dropout output), optional
    residual (..., N)     added after the cast to out_dtype, optional
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """(..., D) -> (rows, D): a view whenever the strides allow it (the Triton kernels take strides)."""
    return t.reshape(-1, t.shape[-1])


def base_linear(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], weight_transposed: bool) -> Tensor:
    """x W^T + b (nn.Linear) or b + x W (transformers' Conv1D, weight stored (K, N))."""
    if weight_transposed:
        return torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return torch.nn.functional.linear(x2d, weight, bias)


def effective_scale(scale: float, scale_tensor: Optional[Tensor]):
    return scale if scale_tensor is None else scale_tensor * scale


def lora_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    lora_B_bias: Optional[Tensor],
    lora_x: Optional[Tensor],
    residual: Optional[Tensor],
    scale: float,
    scale_tensor: Optional[Tensor],
    weight_transposed: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Returns (out, lora_hidden) with out = (x W^T + b + s (x_l A^T) B^T + s b_B).to(out_dtype)
    (+ residual), and lora_hidden = x_l A^T (M, r), kept for backward's dB. Both contiguous
    (out in promote(out_dtype, residual's dtype)), as the op's fake impl says."""
    lead = x.shape[:-1]
    base = base_linear(rows(x), weight, bias, weight_transposed)
    adapter_in = rows(x if lora_x is None else lora_x).to(lora_A.dtype)
    lora_hidden = adapter_in @ lora_A.t()
    lora = torch.nn.functional.linear(lora_hidden, lora_B, lora_B_bias)
    out = (base + lora * effective_scale(scale, scale_tensor)).to(out_dtype)
    if residual is not None:
        out = out + rows(residual)  # out first: the sum takes its contiguous layout
    return out.reshape(*lead, out.shape[-1]), lora_hidden


def lora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_x: Optional[Tensor],
    lora_hidden: Tensor,
    scale: float,
    scale_tensor: Optional[Tensor],
    weight_transposed: bool,
    base_dtype: torch.dtype,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Gradients of lora_linear_forward's `out` but the biases': those are column sums of dY
    that unsloth_compile/ops/lora.py takes outside the op (side_grads), where Inductor fuses them.

    Returns (dx, d_lora_x, dA, dB). d_lora_x is None when the adapter reads x
    itself (its part is then inside dx). There is never a gradient for `weight`: the base is
    frozen and computing dW would be a full M x N x K GEMM thrown away.
    Every result is contiguous whatever the inputs' strides (a transposed A or B, a strided
    x), dx in x's dtype: the op's fake impl promises exactly that layout to the compiler.
    """
    grad2d = rows(grad_out)
    dx = grad2d.to(base_dtype) @ (weight.t() if weight_transposed else weight)
    grad_lora = grad2d.to(lora_A.dtype) * effective_scale(scale, scale_tensor)
    return adapter_backward(grad_lora, dx, x, lora_x, lora_A, lora_B, lora_hidden)


def adapter_backward(grad_lora: Tensor, dx: Tensor, x: Tensor, lora_x: Optional[Tensor], lora_A: Tensor,
                     lora_B: Tensor, lora_hidden: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """The LoRA term's share of a backward, given grad_lora = s dY (M, N) in the adapter dtype
    and the base's dx = dY W (M, K): (dx with the adapter's part added when it read x, in x's
    dtype and shape; d_lora_x when it read lora_x, else None; dA; dB), all contiguous."""
    dB = grad_lora.t() @ lora_hidden
    d_hidden = grad_lora @ lora_B
    adapter_in = rows(x if lora_x is None else lora_x).to(lora_A.dtype)
    dA = d_hidden.t() @ adapter_in
    d_adapter_in = d_hidden @ lora_A
    # K spelled out, not -1: with no rows (an empty batch) -1 is ambiguous and reshape raises.
    lead, K = x.shape[:-1], x.shape[-1]
    if lora_x is None:
        dx = dx + d_adapter_in.to(x.dtype)
        d_lora_x = None
    else:
        d_lora_x = d_adapter_in.to(lora_x.dtype).reshape(*lead, K)
    return dx.to(x.dtype).reshape(*lead, K), d_lora_x, dA, dB
