"""The 2:4 sparse frozen base (kernels/sparse24.py has the math):

    unsloth::sparse24_linear                x W^T + b with W 2:4 (Sparse24Linear's forward, and
                                            what the LoRA pass recognises as a pruned base)
    unsloth::sparse24_linear_backward       its dx = dY W
    unsloth::lora_linear_sparse24           the LoRA op with the base GEMM on the compressed 2:4
                                            weight (options sparsity="2:4")
    unsloth::lora_linear_sparse24_backward  its (dx, d_lora_x, dA, dB)

Each takes the dense masked weight, its compressed copies (`Tensor[] compressed`, empty on
the dense layout) and the layout name. Where they run: on CUDA with a compressed layout and
impl "auto"/"triton", torch's semi-structured sparse GEMMs; with impl="reference", on any
other device, or with the dense layout, the dense masked weight (plain torch, the oracle).
The weight never gets a gradient; backward keeps the weight and its compressed copies, the
module's own tensors (saving them costs nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import sparse24
from .base_linear import register_base_linear_op
from .frozen_base import FrozenBase, LoraBackward, LoraForward
from .lora import register_lora_op


def _layout(impl: str, layout: str) -> str:
    """impl="reference" computes on the dense masked weight whatever the layout."""
    return sparse24.DENSE if impl == "reference" else layout


@dataclass(frozen=True)
class Sparse24Base(FrozenBase):
    """x W^T with W 2:4 along K (and, with the transposable mask, along N for dY W)."""

    def out_features(self, base) -> int:
        return base["weight"].shape[0]

    def forward(self, base, call: LoraForward):
        return sparse24.lora_linear_sparse24_forward(
            call.x, base["weight"], list(base["compressed"]), _layout(call.impl, base["layout"]), call.bias,
            call.lora_A, call.lora_B, call.lora_B_bias, call.lora_x, call.residual, call.scale, call.scale_tensor,
            call.out_dtype)

    def backward(self, base, call: LoraBackward):
        return sparse24.lora_linear_sparse24_backward(
            call.grad_out, call.x, base["weight"], list(base["compressed"]), _layout(call.impl, base["layout"]),
            call.lora_A, call.lora_B, call.lora_x, call.lora_hidden, call.scale, call.scale_tensor)


SPARSE24 = Sparse24Base(
    name="lora_linear_sparse24",
    forward_args=(
        "Tensor x, Tensor weight, Tensor[] compressed, str layout, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, Tensor? lora_B_bias, Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, "
        "ScalarType out_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0"),
    backward_args=(
        "Tensor grad_out, Tensor x, Tensor weight, Tensor[] compressed, str layout, "
        "Tensor lora_A, Tensor lora_B, Tensor? lora_x, Tensor lora_hidden, float scale, Tensor? scale_tensor, "
        "str impl, Tensor? dropout_mask=None, float dropout_scale=1.0"),
)

register_lora_op(SPARSE24)


# ----------------------------------------------------------------------------- sparse24_linear: the base alone


def _linear_forward(x, base, bias, impl):
    return sparse24.sparse24_linear_forward(x, base["weight"], list(base["compressed"]),
                                            _layout(impl, base["layout"]), bias)


def _linear_backward(grad_out, base, x_dtype, impl):
    return sparse24.sparse24_linear_backward(grad_out, base["weight"], list(base["compressed"]),
                                             _layout(impl, base["layout"]), x_dtype)


SPARSE24_LINEAR = register_base_linear_op("sparse24_linear", "Tensor weight, Tensor[] compressed, str layout",
                                          _linear_forward, _linear_backward,
                                          shape=lambda base: tuple(base["weight"].shape))
