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

import torch
from torch import Tensor

from ..kernels.fp8 import fp8
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

_lib = torch.library.Library("unsloth", "FRAGMENT")
_lib.define("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str impl) -> Tensor")
_lib.define("fp8_linear_backward(Tensor grad_out, Tensor weight, Tensor weight_scale, ScalarType x_dtype, "
            "str impl) -> Tensor")


def _fp8_linear(x, weight, weight_scale, bias, impl):
    return fp8.fp8_linear_forward(x, weight, weight_scale, bias, emulate(impl, x))


def _fp8_linear_backward(grad_out, weight, weight_scale, x_dtype, impl):
    return fp8.fp8_linear_backward(grad_out, weight, weight_scale, x_dtype, emulate(impl, grad_out))


@torch.library.register_fake("unsloth::fp8_linear")
def _(x, weight, weight_scale, bias, impl):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("unsloth::fp8_linear_backward")
def _(grad_out, weight, weight_scale, x_dtype, impl):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=x_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """dx through the fp8 GEMM, the bias gradient as a column sum; none for the weight."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, impl):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.unsloth.fp8_linear.default(x, weight, weight_scale, bias, impl)
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype, ctx.impl = x.dtype, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.unsloth.fp8_linear_backward.default(grad_out, weight, weight_scale, ctx.x_dtype, ctx.impl)
        if ctx.needs_input_grad[3]:
            dbias = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.bias_dtype).sum(0)
        return dx, None, None, dbias, None


def _fp8_linear_autograd(x, weight, weight_scale, bias, impl):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, bias):
        return _Fp8LinearFunction.apply(x, weight, weight_scale, bias, impl)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.fp8_linear.default(x, weight, weight_scale, bias, impl)


_lib.impl("fp8_linear", _fp8_linear, "CompositeExplicitAutograd")
_lib.impl("fp8_linear_backward", _fp8_linear_backward, "CompositeExplicitAutograd")
_lib.impl("fp8_linear", _fp8_linear_autograd, "Autograd")
