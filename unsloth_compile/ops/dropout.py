"""The adapter's dropout as the LoRA ops take it: either the dropped input itself (`lora_x`) or
its boolean mask and 1 / (1 - p) (`dropout_mask`, `dropout_scale`).

Given as a mask, backward keeps 1 byte per element of x rather than lora_x in the adapter dtype
(4 bytes for PEFT's fp32 adapters), and the ops rebuild the dropped input where they need it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError


def dropout_input(x: Tensor, lora_A: Tensor, dropout_mask: Tensor, dropout_scale: float) -> Tensor:
    """The adapter input under dropout, rebuilt from its mask: x in the adapter dtype (PEFT
    casts before its dropout) times the mask times 1 / (1 - p), the products of
    aten.native_dropout in its order, so bitwise the value eager computed."""
    return x.to(lora_A.dtype) * dropout_mask * dropout_scale


def check_dropout_args(lora_x: Optional[Tensor], dropout_mask: Optional[Tensor], x: Tensor,
                       check_shape: bool = True) -> None:
    """UnslothCompileError for both dropout forms at once or a mask that is not bool of x's shape
    (fake impls skip the shape comparison: with dynamic shapes it would add a guard)."""
    if dropout_mask is None:
        return
    if lora_x is not None:
        raise UnslothCompileError("unsloth_compile: unsloth::lora_linear: pass the adapter's dropout either as "
                                  "lora_x or as dropout_mask, not both")
    # An empty mask may be of any dtype: aten's native_dropout returns empty_like(input) as
    # the mask of an empty input (a float tensor on CPU, while its fake impl says bool, so
    # only the real impl, check_shape, needs the exception).
    wrong_dtype = dropout_mask.dtype != torch.bool and not (check_shape and dropout_mask.numel() == 0)
    if wrong_dtype or (check_shape and dropout_mask.shape != x.shape):
        raise UnslothCompileError(
            f"unsloth_compile: unsloth::lora_linear: dropout_mask must be a bool tensor of x's shape "
            f"{tuple(x.shape)}, got {dropout_mask.dtype} {tuple(dropout_mask.shape)}; pass the mask "
            f"aten.native_dropout returned for x")


def through_dropout(x: Tensor, dx: Tensor, d_lora_x: Optional[Tensor], dropout_mask: Optional[Tensor],
                    dropout_scale: float) -> tuple[Tensor, Tensor]:
    """(dx, d_lora_x) as a backward op returns them. With dropout given as its mask, the
    adapter's input gradient goes back through the dropout (grad * mask * scale,
    native_dropout_backward's order) and PEFT's cast to the adapter dtype, then is added to
    the base's dx as autograd adds the gradients of x's two uses. d_lora_x is an empty
    tensor unless the adapter read lora_x."""
    if dropout_mask is not None:
        dx = dx + (d_lora_x * dropout_mask * dropout_scale).to(dx.dtype)
        d_lora_x = None
    return dx, x.new_empty((0,)) if d_lora_x is None else d_lora_x
