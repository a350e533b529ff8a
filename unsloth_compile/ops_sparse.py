"""`torch.ops.unsloth.*` ops of the 2:4 sparse frozen base (kernels/sparse24.py has the math):

    unsloth::sparse24_linear                x W^T + b with W 2:4 (Sparse24Linear's forward, and
                                            what the LoRA pass recognises as a pruned base)
    unsloth::sparse24_linear_backward       its dx = dY W
    unsloth::lora_linear_sparse24           unsloth::lora_linear with the base GEMM on the
                                            compressed 2:4 weight (options sparsity="2:4")
    unsloth::lora_linear_sparse24_backward  its (dx, d_lora_x, dA, dB)

Each takes the dense masked weight, its compressed copies (`Tensor[] compressed`, empty on
the dense layout) and the layout name. Where they run: on CUDA with a compressed layout and
impl "auto"/"triton", torch's semi-structured sparse GEMMs; with impl="reference", on any
other device, or with the dense layout, the dense masked weight (plain torch, the oracle).
The weight never gets a gradient. Imported at the end of ops.py (the library fragment
extends the "unsloth" namespace).
"""

from __future__ import annotations

import torch

from .kernels import sparse24
from .ops import (_check_dropout_args, _dropout_input, fake_lora_grads, fake_lora_outputs, saved_x, side_grads,
                  through_dropout)

_lib = torch.library.Library("unsloth", "FRAGMENT")
_lib.define("sparse24_linear(Tensor x, Tensor weight, Tensor[] compressed, str layout, Tensor? bias, str impl) "
            "-> Tensor")
_lib.define("sparse24_linear_backward(Tensor grad_out, Tensor weight, Tensor[] compressed, str layout, "
            "ScalarType x_dtype, str impl) -> Tensor")
_lib.define(
    "lora_linear_sparse24(Tensor x, Tensor weight, Tensor[] compressed, str layout, Tensor? bias, Tensor lora_A, "
    "Tensor lora_B, Tensor? lora_B_bias, Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, "
    "ScalarType out_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0) -> (Tensor, Tensor)"
)
_lib.define(
    "lora_linear_sparse24_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor[] compressed, str layout, "
    "Tensor lora_A, Tensor lora_B, Tensor? lora_x, Tensor lora_hidden, float scale, Tensor? scale_tensor, "
    "str impl, Tensor? dropout_mask=None, float dropout_scale=1.0) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _layout(impl: str, layout: str) -> str:
    """impl="reference" computes on the dense masked weight whatever the layout."""
    return sparse24.DENSE if impl == "reference" else layout


# ----------------------------------------------------------------------------- sparse24_linear


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


# ----------------------------------------------------------------------------- lora_linear_sparse24


def _lora_linear_sparse24(x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x, residual,
                          scale, scale_tensor, out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    _check_dropout_args(lora_x, dropout_mask, x)
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    return sparse24.lora_linear_sparse24_forward(x, weight, list(compressed), _layout(impl, layout), bias, lora_A,
                                                 lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
                                                 out_dtype)


def _lora_linear_sparse24_backward(grad_out, x, weight, compressed, layout, lora_A, lora_B, lora_x, lora_hidden,
                                   scale, scale_tensor, impl, dropout_mask=None, dropout_scale=1.0):
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    dx, d_lora_x, dA, dB = sparse24.lora_linear_sparse24_backward(
        grad_out, x, weight, list(compressed), _layout(impl, layout), lora_A, lora_B, lora_x, lora_hidden, scale,
        scale_tensor)
    return (*through_dropout(x, dx, d_lora_x, dropout_mask, dropout_scale), dA, dB)


@torch.library.register_fake("unsloth::lora_linear_sparse24")
def _(x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
      out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    _check_dropout_args(lora_x, dropout_mask, x, check_shape=False)
    return fake_lora_outputs(x, weight.shape[0], lora_A, residual, out_dtype)


@torch.library.register_fake("unsloth::lora_linear_sparse24_backward")
def _(grad_out, x, weight, compressed, layout, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor, impl,
      dropout_mask=None, dropout_scale=1.0):
    return fake_lora_grads(x, lora_x, lora_A, lora_B)


class _LoraLinearSparse24Function(torch.autograd.Function):
    """ops._LoraLinearFunction's formula with the sparse backward op: x is kept only when the
    adapter reads it (a stand-in of its shape otherwise); the weight and its compressed copies
    are the module's own tensors (saving them costs nothing)."""

    @staticmethod
    def forward(ctx, x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                scale_tensor, out_dtype, impl, dropout_mask, dropout_scale):
        with torch._C._AutoDispatchBelowAutograd():
            out, hidden = torch.ops.unsloth.lora_linear_sparse24.default(
                x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
                scale_tensor, out_dtype, impl, dropout_mask, dropout_scale)
        ctx.x_meta = None if lora_x is None else (x.shape, x.dtype, x.device)
        ctx.n_compressed = len(compressed)
        ctx.save_for_backward(x if lora_x is None else None, lora_A, lora_B, lora_x, hidden, scale_tensor,
                              dropout_mask, weight, *compressed)
        ctx.scale, ctx.layout, ctx.impl, ctx.dropout_scale = scale, layout, impl, dropout_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.has_lora_B_bias = lora_B_bias is not None
        ctx.mark_non_differentiable(hidden)
        return out, hidden

    @staticmethod
    def backward(ctx, grad_out, _grad_hidden):
        x, lora_A, lora_B, lora_x, hidden, scale_tensor, mask, weight, *compressed = ctx.saved_tensors
        x = saved_x(x, ctx.x_meta)
        needs = ctx.needs_input_grad
        dx, d_lora_x, dA, dB = torch.ops.unsloth.lora_linear_sparse24_backward.default(
            grad_out, x, weight, compressed, ctx.layout, lora_A, lora_B, lora_x, hidden, ctx.scale, scale_tensor,
            ctx.impl, mask, ctx.dropout_scale)
        dbias, d_lora_B_bias, dresidual = side_grads(
            grad_out, ctx.bias_dtype if needs[4] else None, ctx.has_lora_B_bias and needs[7], lora_A.dtype,
            ctx.scale, scale_tensor, ctx.residual_dtype if needs[9] else None)
        return (dx if needs[0] else None, None, None, None, dbias, dA, dB, d_lora_B_bias,
                d_lora_x if lora_x is not None else None, dresidual, None, None, None, None, None, None)


def _lora_linear_sparse24_autograd(x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x,
                                   residual, scale, scale_tensor, out_dtype, impl, dropout_mask=None,
                                   dropout_scale=1.0):
    inputs = (x, weight, compressed, layout, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale,
              scale_tensor, out_dtype, impl, dropout_mask, dropout_scale)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, bias, lora_A, lora_B, lora_B_bias, lora_x,
                                                                residual, scale_tensor):
        return _LoraLinearSparse24Function.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.lora_linear_sparse24.default(*inputs)


_lib.impl("sparse24_linear", _sparse24_linear, "CompositeExplicitAutograd")
_lib.impl("sparse24_linear_backward", _sparse24_linear_backward, "CompositeExplicitAutograd")
_lib.impl("lora_linear_sparse24", _lora_linear_sparse24, "CompositeExplicitAutograd")
_lib.impl("lora_linear_sparse24_backward", _lora_linear_sparse24_backward, "CompositeExplicitAutograd")
_lib.impl("sparse24_linear", _sparse24_linear_autograd, "Autograd")
_lib.impl("lora_linear_sparse24", _lora_linear_sparse24_autograd, "Autograd")
