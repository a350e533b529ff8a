"""The frozen dense layers that fp8.py and sparsity.py convert and give back: nn.Linear and
transformers' Conv1D (GPT-2), which stores its weight (in, out) and computes y = x W + b."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised by name (transformers is not imported for it)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(module: nn.Module) -> Optional[Tensor]:
    """The (N, K) weight of an nn.Linear or a Conv1D (a transposed view), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    return None


def frozen_dense(weight_nk: Tensor, bias: Optional[nn.Parameter], conv1d: bool) -> nn.Module:
    """An nn.Linear (or a Conv1D when `conv1d`) holding the (N, K) weight, frozen, sharing `bias`."""
    out_features, in_features = weight_nk.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features)
        dense.weight = nn.Parameter(weight_nk.t().contiguous(), requires_grad=False)
    else:
        dense = nn.Linear(in_features, out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(weight_nk, requires_grad=False)
    dense.bias = bias
    return dense
