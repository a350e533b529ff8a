"""`torch.ops.unsloth.*` ops of the float8 frozen base (kernels/fp8.py has the math):

    unsloth::fp8_linear                 x W^T + b with W stored in e4m3 (Fp8Linear's forward,
                                        and what the LoRA pass recognises as an fp8 base)
    unsloth::fp8_linear_backward        its dx = dY W
    unsloth::lora_linear_fp8            unsloth::lora_linear with the base GEMM in fp8: the
                                        weight stored (e4m3 + weight_scale) or dense
                                        (weight_scale None: quantised on every call)
    unsloth::lora_linear_fp8_backward   its (dx, d_lora_x, dA, dB)

Where they run: on CUDA with impl "auto"/"triton", torch._scaled_mm (capability >= 8.9, else
a RuntimeError naming the way out); on any other device, or with impl="reference", the
emulation that quantises identically and multiplies in fp32. The weight never gets a gradient.
Imported at the end of ops.py (the library fragment extends the "unsloth" namespace).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import fp8
from .ops import (_check_dropout_args, _dropout_input, fake_lora_grads, fake_lora_outputs, saved_x, side_grads,
                  through_dropout)

_lib = torch.library.Library("unsloth", "FRAGMENT")
_lib.define("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str impl) -> Tensor")
_lib.define("fp8_linear_backward(Tensor grad_out, Tensor weight, Tensor weight_scale, ScalarType x_dtype, "
            "str impl) -> Tensor")
_lib.define(
    "lora_linear_fp8(Tensor x, Tensor weight, Tensor? weight_scale, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor? lora_B_bias, Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, "
    "ScalarType out_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0) -> (Tensor, Tensor)"
)
_lib.define(
    "lora_linear_fp8_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? weight_scale, Tensor lora_A, "
    "Tensor lora_B, Tensor? lora_x, Tensor lora_hidden, float scale, Tensor? scale_tensor, str impl, "
    "Tensor? dropout_mask=None, float dropout_scale=1.0) -> (Tensor, Tensor, Tensor, Tensor)"
)


def emulate(impl: str, tensor: Tensor) -> bool:
    """True: the emulated GEMMs; False: torch._scaled_mm, after checking the GPU can run it."""
    if impl == "reference" or tensor.device.type != "cuda":
        return True
    fp8.require_scaled_mm(tensor.device)
    return False


# ----------------------------------------------------------------------------- fp8_linear


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


# ----------------------------------------------------------------------------- lora_linear_fp8


def _lora_linear_fp8(x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                     scale_tensor, out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    _check_dropout_args(lora_x, dropout_mask, x)
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    return fp8.lora_linear_fp8_forward(x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x,
                                       residual, scale, scale_tensor, out_dtype, emulate(impl, x))


def _lora_linear_fp8_backward(grad_out, x, weight, weight_scale, lora_A, lora_B, lora_x, lora_hidden, scale,
                              scale_tensor, impl, dropout_mask=None, dropout_scale=1.0):
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    dx, d_lora_x, dA, dB = fp8.lora_linear_fp8_backward(
        grad_out, x, weight, weight_scale, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor,
        emulate(impl, grad_out))
    return (*through_dropout(x, dx, d_lora_x, dropout_mask, dropout_scale), dA, dB)


@torch.library.register_fake("unsloth::lora_linear_fp8")
def _(x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
      out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    _check_dropout_args(lora_x, dropout_mask, x, check_shape=False)
    return fake_lora_outputs(x, weight.shape[0], lora_A, residual, out_dtype)


@torch.library.register_fake("unsloth::lora_linear_fp8_backward")
def _(grad_out, x, weight, weight_scale, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor, impl,
      dropout_mask=None, dropout_scale=1.0):
    return fake_lora_grads(x, lora_x, lora_A, lora_B)


class _LoraLinearFp8Function(torch.autograd.Function):
    """ops._LoraLinearFunction's formula with the fp8 backward op: x is kept only when the
    adapter reads it (a stand-in of its shape otherwise), the weight as given (the stored
    codes, or the dense parameter that backward quantises again: nothing new is saved)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                scale_tensor, out_dtype, impl, dropout_mask, dropout_scale):
        with torch._C._AutoDispatchBelowAutograd():
            out, hidden = torch.ops.unsloth.lora_linear_fp8.default(
                x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                scale_tensor, out_dtype, impl, dropout_mask, dropout_scale)
        ctx.x_meta = None if lora_x is None else (x.shape, x.dtype, x.device)
        ctx.save_for_backward(x if lora_x is None else None, weight, weight_scale, lora_A, lora_B, lora_x, hidden,
                              scale_tensor, dropout_mask)
        ctx.scale, ctx.impl, ctx.dropout_scale = scale, impl, dropout_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.has_lora_B_bias = lora_B_bias is not None
        ctx.mark_non_differentiable(hidden)
        return out, hidden

    @staticmethod
    def backward(ctx, grad_out, _grad_hidden):
        x, weight, weight_scale, lora_A, lora_B, lora_x, hidden, scale_tensor, mask = ctx.saved_tensors
        x = saved_x(x, ctx.x_meta)
        needs = ctx.needs_input_grad
        dx, d_lora_x, dA, dB = torch.ops.unsloth.lora_linear_fp8_backward.default(
            grad_out, x, weight, weight_scale, lora_A, lora_B, lora_x, hidden, ctx.scale, scale_tensor,
            ctx.impl, mask, ctx.dropout_scale)
        dbias, d_lora_B_bias, dresidual = side_grads(
            grad_out, ctx.bias_dtype if needs[3] else None, ctx.has_lora_B_bias and needs[6], lora_A.dtype,
            ctx.scale, scale_tensor, ctx.residual_dtype if needs[8] else None)
        return (dx if needs[0] else None, None, None, dbias, dA, dB, d_lora_B_bias,
                d_lora_x if lora_x is not None else None, dresidual, None, None, None, None, None, None)


def _lora_linear_fp8_autograd(x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual,
                              scale, scale_tensor, out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    inputs = (x, weight, weight_scale, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
              out_dtype, impl, dropout_mask, dropout_scale)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
        return _LoraLinearFp8Function.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.lora_linear_fp8.default(*inputs)


_lib.impl("fp8_linear", _fp8_linear, "CompositeExplicitAutograd")
_lib.impl("fp8_linear_backward", _fp8_linear_backward, "CompositeExplicitAutograd")
_lib.impl("lora_linear_fp8", _lora_linear_fp8, "CompositeExplicitAutograd")
_lib.impl("lora_linear_fp8_backward", _lora_linear_fp8_backward, "CompositeExplicitAutograd")
_lib.impl("fp8_linear", _fp8_linear_autograd, "Autograd")
_lib.impl("lora_linear_fp8", _lora_linear_fp8_autograd, "Autograd")

