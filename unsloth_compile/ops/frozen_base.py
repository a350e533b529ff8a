"""A LoRA op's frozen base: what the one LoRA autograd Function (ops/lora.py) asks of it.

A LoRA linear is `out = base(x) + scale * (dropout(x) A^T) B^T (+ b_B) (+ residual)` with the
base frozen. The Function owns everything that is the adapter's: the dropout (as a tensor or as
its mask), what is saved for backward, the gradients of the bias, LoRA-B bias and residual, the
routing of gradients to inputs. A strategy owns only the base:

- forward: the base product `x W^T + b` fused with the adapter's epilogue, as its kernels allow,
  returning (out, lora_hidden);
- backward: the input gradient `dY W` together with the adapter's gradients (dx, d_lora_x, dA, dB);
- what backward keeps of the base (`backward_base`): by default the forward's base arguments of
  the backward's names.

Its two ops are `<name>` and `<name>_backward` in the `torch.ops.unsloth` namespace. Their
schemas hold the adapter's arguments (`LORA_FORWARD_ARGS`, `LORA_BACKWARD_ARGS`, plus
`dropout_mask` and `dropout_scale`), in any order, and the base's own arguments, which the
strategy reads by name from a dict. A new base is a new `ops/base_<name>.py` with a subclass and
a `register_lora_op(...)` call, and its import in ops/__init__.py.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor


class LoraForward(NamedTuple):
    """The adapter's operands of a forward call; lora_x is the adapter input when it is not x
    (dropout given as a mask is already applied)."""

    x: Tensor
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    lora_B_bias: Optional[Tensor]
    lora_x: Optional[Tensor]
    residual: Optional[Tensor]
    scale: float
    scale_tensor: Optional[Tensor]
    out_dtype: torch.dtype
    impl: str


class LoraBackward(NamedTuple):
    """The adapter's operands of a backward call (lora_x as in LoraForward)."""

    grad_out: Tensor
    x: Tensor
    lora_A: Tensor
    lora_B: Tensor
    lora_x: Optional[Tensor]
    lora_hidden: Tensor
    scale: float
    scale_tensor: Optional[Tensor]
    impl: str


DROPOUT_ARGS = ("dropout_mask", "dropout_scale")
LORA_FORWARD_ARGS = LoraForward._fields + DROPOUT_ARGS
LORA_BACKWARD_ARGS = LoraBackward._fields + DROPOUT_ARGS


@dataclass(frozen=True)
class FrozenBase(abc.ABC):
    """A frozen-base strategy. `name` is the forward op's name; `forward_args` and
    `backward_args` are the two schemas' argument lists (what goes between the parentheses;
    the outputs are fixed: (out, lora_hidden) and (dx, d_lora_x, dA, dB))."""

    name: str
    forward_args: str
    backward_args: str

    @abc.abstractmethod
    def out_features(self, base: Mapping[str, Any]) -> int:
        """N, the output features of the base (the fake impl's output shape)."""

    @abc.abstractmethod
    def forward(self, base: Mapping[str, Any], call: LoraForward) -> tuple[Tensor, Tensor]:
        """(out, lora_hidden): out = x W^T + b + scale * lora_hidden B^T (+ b_B) (+ residual), cast
        to out_dtype before the residual add; lora_hidden = adapter input A^T, (rows, r)."""

    def backward_base(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The backward op's base arguments, from the forward's (saved or kept on the context:
        tensors and lists of tensors are saved, anything else is kept as it is)."""
        return dict(base)

    @abc.abstractmethod
    def backward(self, base: Mapping[str, Any], call: LoraBackward) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        """(dx, d_lora_x, dA, dB): dx = dY W plus, when the adapter read x, the adapter's part;
        d_lora_x the adapter's input gradient when it read lora_x, else None."""
