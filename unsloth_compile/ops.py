"""`torch.ops.unsloth.*`: the ops the passes emit, with schema, fake impl and autograd.

    unsloth::lora_linear           forward: (out, lora_hidden)
    unsloth::lora_linear_backward  the GEMM part of its backward: (dx, d_lora_x, dA, dB)

Dispatch is by device and by the `impl` argument the pass bakes in from the Config:
CUDA + Triton importable -> kernels/lora_linear_triton.py; anything else -> kernels/reference.py.
Bias gradients are plain column sums and stay outside the op, where Inductor fuses them.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
from torch import Tensor

from .kernels import reference

log = logging.getLogger("unsloth_compile")

_TRITON_MODULE = "unsloth_compile.kernels.lora_linear_triton"
_triton_kernels = None
_warned: set[str] = set()


def _triton_or_reason():
    """The Triton kernel module, or the reason it cannot be used (import error text)."""
    global _triton_kernels
    if _triton_kernels is None:
        try:
            _triton_kernels = importlib.import_module(_TRITON_MODULE)
        except Exception as error:  # ImportError, or Triton failing to initialise
            return None, f"{type(error).__name__}: {error}"
    return _triton_kernels, None


def _pick(impl: str, tensors: list[Optional[Tensor]]):
    """The module whose lora_linear_forward/backward run these tensors."""
    if impl == "reference" or tensors[0].device.type != "cuda":
        return reference
    module, reason = _triton_or_reason()
    if module is None:
        if impl == "triton":
            raise RuntimeError(
                f"unsloth_compile: options kernels='triton' but the Triton kernels cannot be "
                f"loaded ({reason}); install triton or use kernels='auto'/'reference'"
            )
        if "import" not in _warned:
            _warned.add("import")
            log.warning("unsloth_compile: Triton kernels unavailable (%s); using the reference ops", reason)
        return reference
    ok, why = module.supports(*tensors)
    if not ok:
        if impl == "triton":
            raise RuntimeError(f"unsloth_compile: kernels='triton' cannot run these inputs: {why}")
        if why not in _warned:
            _warned.add(why)
            log.warning("unsloth_compile: lora_linear runs the reference op: %s", why)
        return reference
    return module


# Ops are defined with a plain torch.library.Library rather than @custom_op: the custom_op
# wrapper adds about 15 us of Python per call (CPU, measured here: 22 vs 37 us for a trivial
# op), paid for every LoRA linear of every step.
_lib = torch.library.Library("unsloth", "DEF")
_lib.define(
    "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor? lora_B_bias, Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, "
    "bool weight_transposed, ScalarType out_dtype, str impl, Tensor? dropout_mask=None, "
    "float dropout_scale=1.0) -> (Tensor, Tensor)"
)
_lib.define(
    "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor? lora_x, Tensor lora_hidden, float scale, Tensor? scale_tensor, bool weight_transposed, "
    "ScalarType base_dtype, str impl, Tensor? dropout_mask=None, float dropout_scale=1.0) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
# dropout_mask / dropout_scale: the adapter reads dropout(x) given as its boolean mask and
# 1 / (1 - p) instead of as a tensor (lora_x): backward keeps 1 byte per element of x rather
# than lora_x in the adapter dtype (4 bytes for PEFT's fp32 adapters). Defaults keep the
# trailing arguments optional (the dispatcher then passes fewer; the impls default them).


def _dropout_input(x: Tensor, lora_A: Tensor, dropout_mask: Tensor, dropout_scale: float) -> Tensor:
    """The adapter input under dropout, rebuilt from its mask: x in the adapter dtype (PEFT
    casts before its dropout) times the mask times 1 / (1 - p), the products of
    aten.native_dropout in its order, so bitwise the value eager computed."""
    return x.to(lora_A.dtype) * dropout_mask * dropout_scale


def _check_dropout_args(lora_x: Optional[Tensor], dropout_mask: Optional[Tensor], x: Tensor,
                        check_shape: bool = True) -> None:
    """ValueError for both dropout forms at once or a mask that is not bool of x's shape (the
    fake impl skips the shape comparison: with dynamic shapes it would add a guard)."""
    if dropout_mask is None:
        return
    if lora_x is not None:
        raise ValueError("unsloth::lora_linear: pass the adapter's dropout either as lora_x or as "
                         "dropout_mask, not both")
    # An empty mask may be of any dtype: aten's native_dropout returns empty_like(input) as
    # the mask of an empty input (a float tensor on CPU, while its fake impl says bool, so
    # only the real impl, check_shape, needs the exception).
    wrong_dtype = dropout_mask.dtype != torch.bool and not (check_shape and dropout_mask.numel() == 0)
    if wrong_dtype or (check_shape and dropout_mask.shape != x.shape):
        raise ValueError(f"unsloth::lora_linear: dropout_mask must be a bool tensor of x's shape "
                         f"{tuple(x.shape)}, got {dropout_mask.dtype} {tuple(dropout_mask.shape)}")


# ---- pieces every LoRA op family shares (dense here, fp8 in ops_fp8.py, 2:4 in ops_sparse.py)


def fake_lora_outputs(x: Tensor, n_out: int, lora_A: Tensor, residual: Optional[Tensor],
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Fake (out, lora_hidden) of a LoRA forward op with n_out output features."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    if residual is not None:  # added after the cast: the sum promotes as torch's add does
        out_dtype = torch.promote_types(out_dtype, residual.dtype)
    out = x.new_empty((*x.shape[:-1], n_out), dtype=out_dtype)
    return out, lora_A.new_empty((rows, lora_A.shape[0]))


def fake_lora_grads(x: Tensor, lora_x: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (dx, d_lora_x, dA, dB) of a LoRA backward op. Contiguous, whatever the inputs'
    strides, as the implementations return them: empty_like would copy the strides of the
    pass's A.t() / B.t() views (the `x @ A @ B` form) or of a strided x, and Inductor checks
    the real strides against these."""
    d_lora_x = x.new_empty((0,)) if lora_x is None else lora_x.new_empty(lora_x.shape)
    return (x.new_empty(x.shape), d_lora_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


def through_dropout(x: Tensor, dx: Tensor, d_lora_x: Optional[Tensor], dropout_mask: Optional[Tensor],
                    dropout_scale: float) -> tuple[Tensor, Tensor]:
    """(dx, d_lora_x) as a backward op returns them. With dropout given as its mask, the
    adapter's input gradient goes back through the dropout (grad * mask * scale,
    native_dropout_backward's order) and PEFT's cast to the adapter dtype, then is added to
    the base's dx as autograd adds the gradients of x's two uses. d_lora_x is an empty
    tensor unless the adapter read lora_x."""
    if dropout_mask is not None:
        dx = dx + (d_lora_x * dropout_mask * dropout_scale).to(dx.dtype)
        d_lora_x = None
    return dx, x.new_empty((0,)) if d_lora_x is None else d_lora_x


def saved_x(x: Optional[Tensor], x_meta) -> Tensor:
    """x as saved for backward, or, when dropout came as lora_x and x was not kept, a stand-in
    with its shape, dtype and device (one element of memory: dx = dY W reads no x)."""
    if x is not None:
        return x
    shape, dtype, device = x_meta
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def side_grads(grad_out: Tensor, bias_dtype: Optional[torch.dtype], lora_B_bias_wanted: bool,
               adapter_dtype: torch.dtype, scale: float, scale_tensor: Optional[Tensor],
               residual_dtype: Optional[torch.dtype]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dbias, d_lora_B_bias, dresidual), the plain column sums and casts that stay outside the
    ops (Inductor fuses them); None for each not wanted (its dtype None, or the flag False)."""
    dbias = d_lora_B_bias = dresidual = None
    if bias_dtype is not None or lora_B_bias_wanted:
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if bias_dtype is not None:
            dbias = rows.to(bias_dtype).sum(0)
        if lora_B_bias_wanted:
            d_lora_B_bias = (rows.to(adapter_dtype) * reference.effective_scale(scale, scale_tensor)).sum(0)
    if residual_dtype is not None:
        dresidual = grad_out.to(residual_dtype)
    return dbias, d_lora_B_bias, dresidual


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor], residual: Optional[Tensor],
                scale: float, scale_tensor: Optional[Tensor], weight_transposed: bool,
                out_dtype: torch.dtype, impl: str, dropout_mask: Optional[Tensor] = None,
                dropout_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(out, lora_hidden): see kernels/reference.py for the math."""
    _check_dropout_args(lora_x, dropout_mask, x)
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    module = _pick(impl, [x, weight, lora_A, lora_B, lora_x])
    return module.lora_linear_forward(
        x, weight, bias, lora_A, lora_B, lora_B_bias, lora_x, residual,
        scale, scale_tensor, weight_transposed, out_dtype,
    )


@torch.library.register_fake("unsloth::lora_linear")
def _(x, weight, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
      weight_transposed, out_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    _check_dropout_args(lora_x, dropout_mask, x, check_shape=False)
    return fake_lora_outputs(x, weight.shape[1] if weight_transposed else weight.shape[0], lora_A, residual,
                             out_dtype)


def lora_linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                         lora_x: Optional[Tensor], lora_hidden: Tensor, scale: float,
                         scale_tensor: Optional[Tensor], weight_transposed: bool,
                         base_dtype: torch.dtype, impl: str, dropout_mask: Optional[Tensor] = None,
                         dropout_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB); d_lora_x is an empty tensor unless the adapter read lora_x."""
    if dropout_mask is not None:
        lora_x = _dropout_input(x, lora_A, dropout_mask, dropout_scale)
    module = _pick(impl, [x, weight, lora_A, lora_B, lora_x])
    dx, d_lora_x, dA, dB = module.lora_linear_backward(
        grad_out, x, weight, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor,
        weight_transposed, base_dtype,
    )
    return (*through_dropout(x, dx, d_lora_x, dropout_mask, dropout_scale), dA, dB)


@torch.library.register_fake("unsloth::lora_linear_backward")
def _(grad_out, x, weight, lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor,
      weight_transposed, base_dtype, impl, dropout_mask=None, dropout_scale=1.0):
    return fake_lora_grads(x, lora_x, lora_A, lora_B)


# One implementation for every device: it dispatches to Triton on CUDA and to the reference
# elsewhere (_pick), so a new backend (XPU, MPS) runs the reference instead of failing.
_lib.impl("lora_linear", lora_linear, "CompositeExplicitAutograd")
_lib.impl("lora_linear_backward", lora_linear_backward, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, lora_B_bias, lora_x, residual, scale, scale_tensor,
     weight_transposed, out_dtype, impl, dropout_mask, dropout_scale) = inputs
    # With dropout given as lora_x, backward needs of x only dx's shape, dtype and device
    # (dx = dY W involves no x): x itself is not kept, M x K elements less saved per LoRA
    # layer (lora_x, which dA needs, is saved instead). Given as a mask, x and the mask are
    # kept and lora_x is rebuilt.
    ctx.x_meta = None if lora_x is None else (x.shape, x.dtype, x.device)
    ctx.dropout_scale = dropout_scale
    ctx.save_for_backward(x if lora_x is None else None, weight, lora_A, lora_B, lora_x, output[1],
                          scale_tensor, dropout_mask)
    ctx.scale = scale
    ctx.weight_transposed = weight_transposed
    ctx.impl = impl
    ctx.base_dtype = weight.dtype
    ctx.has_bias = bias is not None
    ctx.has_lora_B_bias = lora_B_bias is not None
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward(ctx, grad_out, _grad_lora_hidden):
    # lora_hidden is an internal output (saved for dB) that the rewritten graph never reads,
    # so its incoming gradient is zero/None and is ignored.
    x, weight, lora_A, lora_B, lora_x, lora_hidden, scale_tensor, dropout_mask = ctx.saved_tensors
    x = saved_x(x, ctx.x_meta)
    needs = ctx.needs_input_grad
    dx, d_lora_x, dA, dB = torch.ops.unsloth.lora_linear_backward.default(
        grad_out, x, weight, lora_A, lora_B, lora_x, lora_hidden, ctx.scale, scale_tensor,
        ctx.weight_transposed, ctx.base_dtype, ctx.impl, dropout_mask, ctx.dropout_scale,
    )
    dbias, d_lora_B_bias, dresidual = side_grads(
        grad_out, ctx.base_dtype if ctx.has_bias and needs[2] else None, ctx.has_lora_B_bias and needs[5],
        lora_A.dtype, ctx.scale, scale_tensor, ctx.residual_dtype if ctx.has_residual and needs[7] else None)
    return (dx if needs[0] else None, None, dbias, dA, dB, d_lora_B_bias,
            d_lora_x if lora_x is not None else None, dresidual,
            None, None, None, None, None, None, None)


class _LoraLinearFunction(torch.autograd.Function):
    """The op's autograd formula (dispatch key Autograd).

    What torch.library.register_autograd builds, minus its per-call generic work (schema
    default filling, a metadata dataclass, a Python redispatch): about 0.25 ms of host time
    per forward+backward on the H200 machine's CPU (cProfile), paid by every LoRA linear
    called eagerly. AOTAutograd traces it like any autograd.Function.
    """

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.unsloth.lora_linear.default(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lora_hidden):
        return _backward(ctx, grad_out, grad_lora_hidden)


# The trailing optional arguments (dropout_mask, dropout_scale) with their defaults: the
# dispatcher leaves out trailing arguments that were not passed.
_OPTIONAL_TAIL = (None, 1.0)


def _lora_linear_autograd(*inputs):
    if len(inputs) < 15:
        inputs = inputs + _OPTIONAL_TAIL[len(inputs) - 13:]
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
        return _LoraLinearFunction.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.unsloth.lora_linear.default(*inputs)


_lib.impl("lora_linear", _lora_linear_autograd, "Autograd")


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

from .kernels import linear_cross_entropy as _lce  # noqa: E402

_LCE_ARGS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
             "str[] steps, float[] step_values, int chunk_rows")
_lib.define(f"linear_cross_entropy({_LCE_ARGS}, str impl=\"auto\") -> Tensor")
_lib.define(f"linear_cross_entropy_forward({_LCE_ARGS}, bool grad_hidden, bool grad_weight, bool grad_bias, "
            "str impl=\"auto\") -> (Tensor, Tensor, Tensor, Tensor)")


def _lce_loss_like(hidden: Tensor, steps) -> Tensor:
    return hidden.new_empty((), dtype=_lce.logits_dtype(hidden.dtype, steps))


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


def _triton_chunk_loss(logits: Tensor, target: Tensor, ignore_index: int, grad_scale: Optional[Tensor]):
    """kernels/linear_cross_entropy.ChunkLoss with the Triton kernels: the sum of the chunk's
    losses and lse in one pass over its logits, the gradient (times grad_scale) in another."""
    from .kernels import logits_cross_entropy as ce

    loss_sum, lse = ce.cross_entropy_forward(logits, target, ignore_index, "sum")
    if grad_scale is None:
        return loss_sum, None
    return loss_sum, ce.cross_entropy_backward(grad_scale, logits, target, lse, ignore_index, "sum")


def _linear_cross_entropy_forward(hidden, weight, bias, target, ignore_index, reduction, steps, step_values,
                                  chunk_rows, grad_hidden, grad_weight, grad_bias, impl="auto"):
    from .ops_cross_entropy import _triton as _triton_cross_entropy

    chunk_loss = _triton_chunk_loss if _triton_cross_entropy(impl, hidden) else None
    # no autograd inside: the gradients are computed by hand (and out= matmuls refuse it)
    with torch.no_grad():
        return _lce.linear_cross_entropy_forward(hidden, weight, bias, target, ignore_index, reduction, steps,
                                                 step_values, chunk_rows, grad_hidden, grad_weight, grad_bias,
                                                 chunk_loss)


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

from . import ops_fp8  # noqa: E402,F401  torch.ops.unsloth.*fp8* (needs the helpers above)
from . import ops_compress  # noqa: E402,F401  torch.ops.unsloth.* that compress saved tensors (issue 12)
from . import ops_sparse  # noqa: E402,F401  torch.ops.unsloth.*sparse24* (2:4 frozen bases, issue 15)
from . import ops_cross_entropy  # noqa: E402,F401  torch.ops.unsloth.logits_cross_entropy* (returned logits)
from . import ops_packed_attention  # noqa: E402,F401  torch.ops.unsloth.packed_attention (padding-free rows)
from . import ops_attention_bias  # noqa: E402,F401  torch.ops.unsloth.attention_bias (attention masks at any length)
