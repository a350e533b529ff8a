"""In which precision the fused LoRA paths multiply: one rule for the operands' dtype and one
for Triton's dot, shared by the Triton kernels, their cuBLAS alternatives and the 2:4 path.
(kernels/reference.py, the oracle, multiplies in the adapter dtype as PEFT does.) Nothing of
the project is imported here, nor Triton.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(activations: torch.dtype, adapter: torch.dtype) -> torch.dtype:
    """The dtype a LoRA GEMM reading activations (x, dropout(x), dY) rounds both operands to,
    accumulating in fp32: the activations' when half precision (what the tensor cores take;
    fp32 adapters are rounded to it), else the adapter's."""
    return activations if activations in HALF else adapter


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: exact for fp32 (which only reaches
    the Triton kernels in the interpreter tests), tf32 otherwise (ignored for half dtypes)."""
    return "ieee" if dtype == torch.float32 else "tf32"
