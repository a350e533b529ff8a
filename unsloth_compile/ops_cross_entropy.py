"""`torch.ops.unsloth.logits_cross_entropy*`: cross-entropy on logits the model keeps, upcast to
fp32 inside the kernel (kernels/logits_cross_entropy.py has the math), placed by
passes/linear_cross_entropy.py where the logits are returned and the fused head + loss cannot run.

    unsloth::logits_cross_entropy            loss = F.cross_entropy(logits.float(), target, ...)
    unsloth::logits_cross_entropy_forward    (loss, lse): what backward keeps besides the logits
    unsloth::logits_cross_entropy_backward   d loss / d logits in the logits' dtype

On CUDA (and in the Triton interpreter, for tests) the Triton kernels; elsewhere, or with
impl="reference", the chunked torch reference. Imported at the end of ops.py.
"""

from __future__ import annotations

import torch

from .kernels import logits_cross_entropy as kernel

_lib = torch.library.Library("unsloth", "FRAGMENT")
_ARGS = "Tensor logits, Tensor target, int ignore_index, str reduction, str impl"
_lib.define(f"logits_cross_entropy({_ARGS}) -> Tensor")
_lib.define(f"logits_cross_entropy_forward({_ARGS}) -> (Tensor, Tensor)")
_lib.define("logits_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
            "int ignore_index, str reduction, str impl) -> Tensor")


def _triton(impl: str, logits: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    if logits.device.type == "cuda":
        return True
    from .kernels.launch_args import interpreting

    return logits.device.type == "cpu" and interpreting() and logits.dtype != torch.bfloat16


def _forward(logits, target, ignore_index, reduction, impl):
    fn = kernel.cross_entropy_forward if _triton(impl, logits) else kernel.reference_forward
    return fn(logits, target, ignore_index, reduction)


def _backward(grad_loss, logits, target, lse, ignore_index, reduction, impl):
    fn = kernel.cross_entropy_backward if _triton(impl, logits) else kernel.reference_backward
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
