"""The dense frozen base (bf16/fp16/fp32 weight, or Conv1D's transposed one):

    unsloth::lora_linear           forward: (out, lora_hidden)
    unsloth::lora_linear_backward  the GEMM part of its backward: (dx, d_lora_x, dA, dB)

Dispatch is by device and by the `impl` argument the pass bakes in from the Config: CUDA +
Triton importable -> kernels/lora/lora_linear_triton.py; anything else -> kernels/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..kernels import reference
from .frozen_base import FrozenBase, LoraBackward, LoraForward
from .kernel_loader import KernelLoader
from .lora import register_lora_op

TRITON = KernelLoader(
    module_name="unsloth_compile.kernels.lora.lora_linear_triton",
    kernels="Triton kernels",
    unavailable="unsloth_compile: Triton kernels unavailable (%s); using the reference ops",
    unsupported="unsloth_compile: lora_linear runs the reference op: %s",
)


def pick_kernels(impl: str, tensors: list[Optional[Tensor]]):
    """The module whose lora_linear_forward/backward run these tensors."""
    module = TRITON.pick(impl, tensors[0].device, tuple(tensors))
    return reference if module is None else module


@dataclass(frozen=True)
class DenseBase(FrozenBase):
    """x W^T (W^T given as `weight` when weight_transposed) in the weight's dtype."""

    def out_features(self, base) -> int:
        weight = base["weight"]
        return weight.shape[1] if base["weight_transposed"] else weight.shape[0]

    def forward(self, base, call: LoraForward):
        weight = base["weight"]
        module = pick_kernels(call.impl, [call.x, weight, call.lora_A, call.lora_B, call.lora_x])
        return module.lora_linear_forward(
            call.x, weight, call.bias, call.lora_A, call.lora_B, call.lora_B_bias, call.lora_x, call.residual,
            call.scale, call.scale_tensor, base["weight_transposed"], call.out_dtype)

    def backward_base(self, base):
        return {**base, "base_dtype": base["weight"].dtype}

    def backward(self, base, call: LoraBackward):
        weight = base["weight"]
        module = pick_kernels(call.impl, [call.x, weight, call.lora_A, call.lora_B, call.lora_x])
        return module.lora_linear_backward(
            call.grad_out, call.x, weight, call.lora_A, call.lora_B, call.lora_x, call.lora_hidden, call.scale,
            call.scale_tensor, base["weight_transposed"], base["base_dtype"])


# dropout_mask / dropout_scale (ops/dropout.py) have defaults: the dispatcher then passes fewer
# arguments, and graphs written before they existed keep working.
DENSE = DenseBase(
    name="lora_linear",
    forward_args=(
        "Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_B_bias, "
        "Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, bool weight_transposed, "
        "ScalarType out_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0"),
    backward_args=(
        "Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? lora_x, "
        "Tensor lora_hidden, float scale, Tensor? scale_tensor, bool weight_transposed, ScalarType base_dtype, "
        "str impl, Tensor? dropout_mask=None, float dropout_scale=1.0"),
)

register_lora_op(DENSE)
