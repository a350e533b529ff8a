"""The float8 frozen base (kernels/fp8/fp8.py has the math):

    unsloth::fp8_linear                 x W^T + b with W stored in e4m3 (Fp8Linear's forward,
                                        and what the LoRA pass recognises as an fp8 base)
    unsloth::fp8_linear_backward        its dx = dY W
    unsloth::lora_linear_fp8            the LoRA op with the base GEMM in fp8: the weight stored
                                        (e4m3 + weight_scale) or dense (weight_scale None:
                                        quantised on every call)
    unsloth::lora_linear_fp8_backward   its (dx, d_lora_x, dA, dB)

Where they run: on CUDA with impl "auto"/"triton", torch._scaled_mm (capability >= 8.9, else
a RuntimeError naming the way out); on any other device, or with impl="reference", the
emulation that quantises identically and multiplies in fp32. The weight never gets a gradient;
backward keeps it as given (the stored codes, or the dense parameter that backward quantises
again: nothing new is saved).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..kernels.fp8 import fp8
from .base_linear import register_base_linear_op
from .frozen_base import FrozenBase, LoraBackward, LoraForward
from .lora import register_lora_op


def emulate(impl: str, tensor: Tensor) -> bool:
    """True: the emulated GEMMs; False: torch._scaled_mm, after checking the GPU can run it."""
    if impl == "reference" or tensor.device.type != "cuda":
        return True
    fp8.require_scaled_mm(tensor.device)
    return False


@dataclass(frozen=True)
class Fp8Base(FrozenBase):
    """x W^T with x quantised per row and W per output channel to e4m3, fp32 accumulation."""

    def out_features(self, base) -> int:
        return base["weight"].shape[0]

    def forward(self, base, call: LoraForward):
        return fp8.lora_linear_fp8_forward(
            call.x, base["weight"], base["weight_scale"], call.bias, call.lora_A, call.lora_B, call.lora_B_bias,
            call.lora_x, call.residual, call.scale, call.scale_tensor, call.out_dtype, emulate(call.impl, call.x))

    def backward(self, base, call: LoraBackward):
        return fp8.lora_linear_fp8_backward(
            call.grad_out, call.x, base["weight"], base["weight_scale"], call.lora_A, call.lora_B, call.lora_x,
            call.lora_hidden, call.scale, call.scale_tensor, emulate(call.impl, call.grad_out))


FP8 = Fp8Base(
    name="lora_linear_fp8",
    forward_args=(
        "Tensor x, Tensor weight, Tensor? weight_scale, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor? lora_B_bias, Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, "
        "ScalarType out_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0"),
    backward_args=(
        "Tensor grad_out, Tensor x, Tensor weight, Tensor? weight_scale, Tensor lora_A, Tensor lora_B, "
        "Tensor? lora_x, Tensor lora_hidden, float scale, Tensor? scale_tensor, str impl, "
        "Tensor? dropout_mask=None, float dropout_scale=1.0"),
)

register_lora_op(FP8)


# ----------------------------------------------------------------------------- fp8_linear: the base alone


def _linear_forward(x, base, bias, impl):
    return fp8.fp8_linear_forward(x, base["weight"], base["weight_scale"], bias, emulate(impl, x))


def _linear_backward(grad_out, base, x_dtype, impl):
    return fp8.fp8_linear_backward(grad_out, base["weight"], base["weight_scale"], x_dtype, emulate(impl, grad_out))


FP8_LINEAR = register_base_linear_op("fp8_linear", "Tensor weight, Tensor weight_scale", _linear_forward,
                                     _linear_backward, shape=lambda base: tuple(base["weight"].shape))
