"""`torch.ops.unsloth.*cross_entropy*`: the losses the cross-entropy pass
(passes/linear_cross_entropy.py) places.

    unsloth::linear_cross_entropy            loss = CE(steps(linear(hidden, weight, bias)), target)
    unsloth::linear_cross_entropy_forward    (loss, dhidden, dweight, dbias) for a gradient of 1
    unsloth::logits_cross_entropy            loss = F.cross_entropy(logits.float(), target, ...)
    unsloth::logits_cross_entropy_forward    (loss, lse): what backward keeps besides the logits
    unsloth::logits_cross_entropy_backward   d loss / d logits in the logits' dtype

The first pair is the fused LM head + loss, which never materialises the full-vocabulary logits;
the second the loss on logits the model keeps (returned), upcast to fp32 inside the kernel.
On CUDA (and in the Triton interpreter, for tests) the Triton cross-entropy kernels
(kernels/logits_cross_entropy.py); elsewhere, or with impl="reference", plain torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import linear_cross_entropy as lce_kernel
from ..kernels import logits_cross_entropy as ce_kernel
from ..kernels.launch_args import interpreting

_lib = torch.library.Library("unsloth", "FRAGMENT")


# ----------------------------------------------------------------------------- logits_cross_entropy

_CE_ARGS = "Tensor logits, Tensor target, int ignore_index, str reduction, str impl"
_lib.define(f"logits_cross_entropy({_CE_ARGS}) -> Tensor")
_lib.define(f"logits_cross_entropy_forward({_CE_ARGS}) -> (Tensor, Tensor)")
_lib.define("logits_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
            "int ignore_index, str reduction, str impl) -> Tensor")


def triton_cross_entropy(impl: str, logits: Tensor) -> bool:
    """True: the Triton kernels run these logits (CUDA, or the interpreter and not bf16)."""
    if impl == "reference":
        return False
    if logits.device.type == "cuda":
        return True
    return logits.device.type == "cpu" and interpreting() and logits.dtype != torch.bfloat16


def _forward(logits, target, ignore_index, reduction, impl):
    fn = ce_kernel.cross_entropy_forward if triton_cross_entropy(impl, logits) else ce_kernel.reference_forward
    return fn(logits, target, ignore_index, reduction)


def _backward(grad_loss, logits, target, lse, ignore_index, reduction, impl):
    fn = ce_kernel.cross_entropy_backward if triton_cross_entropy(impl, logits) else ce_kernel.reference_backward
    return fn(grad_loss, logits, target, lse, ignore_index, reduction)


@torch.library.register_fake("unsloth::logits_cross_entropy")
def _(logits, target, ignore_index, reduction, impl):
    return logits.new_empty((), dtype=torch.float32)


@torch.library.register_fake("unsloth::logits_cross_entropy_forward")
def _(logits, target, ignore_index, reduction, impl):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[:1], dtype=torch.float32)


@torch.library.register_fake("unsloth::logits_cross_entropy_backward")
def _(grad_loss, logits, target, lse, ignore_index, reduction, impl):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _loss(logits, target, ignore_index, reduction, impl):
    return _forward(logits, target, ignore_index, reduction, impl)[0]


class _LogitsCrossEntropy(torch.autograd.Function):
    """Saves the logits in their own dtype and the rows' lse, never fp32 log-probabilities."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, impl):
        with torch._C._AutoDispatchBelowAutograd():
            loss, lse = torch.ops.unsloth.logits_cross_entropy_forward.default(
                logits, target, ignore_index, reduction, impl)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index, ctx.reduction, ctx.impl = ignore_index, reduction, impl
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        grad = torch.ops.unsloth.logits_cross_entropy_backward.default(
            grad_loss, logits, target, lse, ctx.ignore_index, ctx.reduction, ctx.impl)
        return grad, None, None, None, None


def _loss_autograd(logits, target, ignore_index, reduction, impl):
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LogitsCrossEntropy.apply(logits, target, ignore_index, reduction, impl)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.logits_cross_entropy.default(logits, target, ignore_index, reduction, impl)


_lib.impl("logits_cross_entropy", _loss, "CompositeExplicitAutograd")
_lib.impl("logits_cross_entropy_forward", _forward, "CompositeExplicitAutograd")
_lib.impl("logits_cross_entropy_backward", _backward, "CompositeExplicitAutograd")
_lib.impl("logits_cross_entropy", _loss_autograd, "Autograd")
_lib.impl("logits_cross_entropy_forward", torch.library.fallthrough_kernel, "Autograd")


# ----------------------------------------------------------------------------- linear_cross_entropy
#
#   unsloth::linear_cross_entropy          loss = CE(steps(linear(hidden, weight, bias)), target)
#   unsloth::linear_cross_entropy_forward  (loss, dhidden, dweight, dbias) for a gradient of 1
#
# The first is what the pass emits; its autograd runs the second, which computes the gradients
# chunk by chunk while the chunk's logits exist (kernels/linear_cross_entropy.py), and saves
# them: backward only scales them by the incoming gradient. Nothing of size rows x vocab is
# saved. The matmuls are torch's (cuBLAS); a chunk's loss and gradient from its logits run
# the Triton cross-entropy kernels (kernels/logits_cross_entropy.py) on CUDA and in the
# interpreter (not bf16 there), plain torch elsewhere or with impl="reference".

_LCE_ARGS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
             "str[] steps, float[] step_values, int chunk_rows")
_lib.define(f"linear_cross_entropy({_LCE_ARGS}, str impl=\"auto\") -> Tensor")
_lib.define(f"linear_cross_entropy_forward({_LCE_ARGS}, bool grad_hidden, bool grad_weight, bool grad_bias, "
            "str impl=\"auto\") -> (Tensor, Tensor, Tensor, Tensor)")


def _lce_loss_like(hidden: Tensor, steps) -> Tensor:
    return hidden.new_empty((), dtype=lce_kernel.logits_dtype(hidden.dtype, steps))


@torch.library.register_fake("unsloth::linear_cross_entropy")
def _(hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows, impl="auto"):
    return _lce_loss_like(hidden, steps)


@torch.library.register_fake("unsloth::linear_cross_entropy_forward")
def _(hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows,
      grad_hidden, grad_weight, grad_bias, impl="auto"):
    # contiguous gradients, as the implementation returns them; empty where not asked for
    dh = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if grad_weight else weight.new_empty((0,))
    db = bias.new_empty(bias.shape) if grad_bias else weight.new_empty((0,))
    return _lce_loss_like(hidden, steps), dh, dw, db


def triton_chunk_loss(logits: Tensor, target: Tensor, ignore_index: int, grad_scale: Optional[Tensor]):
    """kernels/linear_cross_entropy.ChunkLoss with the Triton kernels: the sum of the chunk's
    losses and lse in one pass over its logits, the gradient (times grad_scale) in another."""
    loss_sum, lse = ce_kernel.cross_entropy_forward(logits, target, ignore_index, "sum")
    if grad_scale is None:
        return loss_sum, None
    return loss_sum, ce_kernel.cross_entropy_backward(grad_scale, logits, target, lse, ignore_index, "sum")


def _linear_cross_entropy_forward(hidden, weight, bias, target, ignore_index, reduction, steps, step_values,
                                  chunk_rows, grad_hidden, grad_weight, grad_bias, impl="auto"):
    chunk_loss = triton_chunk_loss if triton_cross_entropy(impl, hidden) else None
    # no autograd inside: the gradients are computed by hand (and out= matmuls refuse it)
    with torch.no_grad():
        return lce_kernel.linear_cross_entropy_forward(hidden, weight, bias, target, ignore_index, reduction,
                                                       steps, step_values, chunk_rows, grad_hidden, grad_weight,
                                                       grad_bias, chunk_loss)


def _linear_cross_entropy(hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows,
                          impl="auto"):
    """Without autograd (no gradient wanted): the loss only, no gradient computed."""
    return torch.ops.unsloth.linear_cross_entropy_forward.default(
        hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows,
        False, False, False, impl)[0]


_lib.impl("linear_cross_entropy", _linear_cross_entropy, "CompositeExplicitAutograd")
_lib.impl("linear_cross_entropy_forward", _linear_cross_entropy_forward, "CompositeExplicitAutograd")
# Its outputs are gradients, not differentiable functions of its inputs: autograd passes it by.
_lib.impl("linear_cross_entropy_forward", torch.library.fallthrough_kernel, "Autograd")


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward computes the loss and, per chunk, the gradients of the inputs that need them;
    backward scales those by the incoming gradient (a 0-d tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows,
                impl):
        needs = ctx.needs_input_grad
        grad_bias = bias is not None and needs[2]
        with torch._C._AutoDispatchBelowAutograd():
            loss, dh, dw, db = torch.ops.unsloth.linear_cross_entropy_forward.default(
                hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows,
                needs[0], needs[1], grad_bias, impl)
        ctx.save_for_backward(dh, dw, db)
        ctx.grads = (needs[0], needs[1], grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, db = ctx.saved_tensors
        wants = ctx.grads
        scaled = [(g * grad_loss).to(g.dtype) if want else None for g, want in zip((dh, dw, db), wants)]
        return (*scaled, None, None, None, None, None, None, None)


def _linear_cross_entropy_autograd(hidden, weight, bias, target, ignore_index, reduction, steps, step_values,
                                   chunk_rows, impl="auto"):
    inputs = (hidden, weight, bias, target, ignore_index, reduction, steps, step_values, chunk_rows, impl)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(hidden, weight, bias):
        return _LinearCrossEntropyFunction.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.linear_cross_entropy.default(*inputs)


_lib.impl("linear_cross_entropy", _linear_cross_entropy_autograd, "Autograd")
