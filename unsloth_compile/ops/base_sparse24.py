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

import torch

from ..kernels import sparse24
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

_lib = torch.library.Library("unsloth", "FRAGMENT")
_lib.define("sparse24_linear(Tensor x, Tensor weight, Tensor[] compressed, str layout, Tensor? bias, str impl) "
            "-> Tensor")
_lib.define("sparse24_linear_backward(Tensor grad_out, Tensor weight, Tensor[] compressed, str layout, "
            "ScalarType x_dtype, str impl) -> Tensor")


def _sparse24_linear(x, weight, compressed, layout, bias, impl):
    return sparse24.sparse24_linear_forward(x, weight, list(compressed), _layout(impl, layout), bias)


def _sparse24_linear_backward(grad_out, weight, compressed, layout, x_dtype, impl):
    return sparse24.sparse24_linear_backward(grad_out, weight, list(compressed), _layout(impl, layout), x_dtype)


@torch.library.register_fake("unsloth::sparse24_linear")
def _(x, weight, compressed, layout, bias, impl):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("unsloth::sparse24_linear_backward")
def _(grad_out, weight, compressed, layout, x_dtype, impl):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=x_dtype)


class _Sparse24LinearFunction(torch.autograd.Function):
    """dx through W^T's compressed copy, the bias gradient as a column sum; none for W."""

    @staticmethod
    def forward(ctx, x, weight, compressed, layout, bias, impl):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.unsloth.sparse24_linear.default(x, weight, compressed, layout, bias, impl)
        ctx.save_for_backward(weight, *compressed)
        ctx.x_dtype, ctx.layout, ctx.impl = x.dtype, layout, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, *compressed = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.unsloth.sparse24_linear_backward.default(grad_out, weight, compressed, ctx.layout,
                                                                    ctx.x_dtype, ctx.impl)
        if ctx.needs_input_grad[4]:
            dbias = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.bias_dtype).sum(0)
        return dx, None, None, None, dbias, None


def _sparse24_linear_autograd(x, weight, compressed, layout, bias, impl):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, bias):
        return _Sparse24LinearFunction.apply(x, weight, compressed, layout, bias, impl)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.sparse24_linear.default(x, weight, compressed, layout, bias, impl)


_lib.impl("sparse24_linear", _sparse24_linear, "CompositeExplicitAutograd")
_lib.impl("sparse24_linear_backward", _sparse24_linear_backward, "CompositeExplicitAutograd")
_lib.impl("sparse24_linear", _sparse24_linear_autograd, "Autograd")
