"""The LoRA op: one autograd Function over a frozen-base strategy (ops/frozen_base.py), and the
registration that makes a strategy two `torch.ops.unsloth` ops.

    register_lora_op(strategy)   defines <name> -> (out, lora_hidden) and
                                 <name>_backward -> (dx, d_lora_x, dA, dB), with
                                 - one implementation for every device (CompositeExplicitAutograd):
                                   the adapter's dropout, then the strategy's kernels;
                                 - fake impls: shapes from the strategy, contiguous outputs;
                                 - an Autograd kernel: LoraLinearFunction.apply(op, *inputs).

The Function is written once for every base: it saves x only when the adapter reads it (a
stand-in of x's shape otherwise: dx = dY W reads no x), the adapter's tensors, lora_hidden (for
dB), the dropout mask, and whatever the strategy keeps of its base. In backward it runs the
backward op, then the bias, LoRA-B bias and residual gradients, plain column sums and casts that
stay outside the ops, where Inductor fuses them. Gradients reach inputs by argument name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError
from ..kernels import reference
from .dropout import check_dropout_args, dropout_input, through_dropout
from .frozen_base import LORA_BACKWARD_ARGS, LORA_FORWARD_ARGS, FrozenBase, LoraBackward, LoraForward
from .saved_args import pack_saved, unpack_saved

_NO_DEFAULT = object()


@dataclass(frozen=True, eq=False)
class LoraOp:
    """A registered strategy: its two ops and their argument names, in schema order."""

    strategy: FrozenBase
    forward_op: Any  # torch._ops.OpOverload
    backward_op: Any
    forward_names: tuple[str, ...]
    forward_defaults: tuple
    backward_names: tuple[str, ...]
    backward_defaults: tuple
    base_names: tuple[str, ...]           # the forward's arguments that are the base's
    backward_base_names: tuple[str, ...]  # the backward's

    def forward_values(self, args: tuple) -> dict[str, Any]:
        return _by_name(self.forward_names, self.forward_defaults, args)

    def backward_values(self, args: tuple) -> dict[str, Any]:
        return _by_name(self.backward_names, self.backward_defaults, args)


def _by_name(names: tuple[str, ...], defaults: tuple, args: tuple) -> dict[str, Any]:
    # the dispatcher leaves out trailing arguments that were not passed: their defaults
    if len(args) < len(names):
        args = (*args, *defaults[len(args):])
    return dict(zip(names, args))


def _arguments(schema) -> tuple[tuple[str, ...], tuple]:
    args = schema.arguments
    return (tuple(a.name for a in args),
            tuple(a.default_value if a.has_default_value() else _NO_DEFAULT for a in args))


REGISTERED: dict[str, LoraOp] = {}
_libraries: list = []  # a Library unregisters its ops when collected


# ----------------------------------------------------------------------------- the ops' bodies


def _forward_call(values: dict[str, Any], check_shape: bool) -> LoraForward:
    x, lora_x, mask = values["x"], values["lora_x"], values["dropout_mask"]
    check_dropout_args(lora_x, mask, x, check_shape)
    call = LoraForward(*(values[name] for name in LoraForward._fields))
    if mask is not None and check_shape:
        call = call._replace(lora_x=dropout_input(x, values["lora_A"], mask, values["dropout_scale"]))
    return call


def _run_forward(op: LoraOp, *args):
    values = op.forward_values(args)
    base = {name: values[name] for name in op.base_names}
    return op.strategy.forward(base, _forward_call(values, check_shape=True))


def _run_backward(op: LoraOp, *args):
    values = op.backward_values(args)
    x, mask, dropout_scale = values["x"], values["dropout_mask"], values["dropout_scale"]
    call = LoraBackward(*(values[name] for name in LoraBackward._fields))
    if mask is not None:
        call = call._replace(lora_x=dropout_input(x, call.lora_A, mask, dropout_scale))
    base = {name: values[name] for name in op.backward_base_names}
    dx, d_lora_x, dA, dB = op.strategy.backward(base, call)
    return (*through_dropout(x, dx, d_lora_x, mask, dropout_scale), dA, dB)


def _fake_forward(op: LoraOp, *args):
    values = op.forward_values(args)
    call = _forward_call(values, check_shape=False)
    x, residual, out_dtype = call.x, call.residual, call.out_dtype
    n_out = op.strategy.out_features({name: values[name] for name in op.base_names})
    rows = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    if residual is not None:  # added after the cast: the sum promotes as torch's add does
        out_dtype = torch.promote_types(out_dtype, residual.dtype)
    out = x.new_empty((*x.shape[:-1], n_out), dtype=out_dtype)
    return out, call.lora_A.new_empty((rows, call.lora_A.shape[0]))


def _fake_backward(op: LoraOp, *args):
    # Contiguous, whatever the inputs' strides, as the implementations return them: empty_like
    # would copy the strides of the pass's A.t() / B.t() views (the `x @ A @ B` form) or of a
    # strided x, and Inductor checks the real strides against these.
    values = op.backward_values(args)
    x, lora_x, lora_A, lora_B = values["x"], values["lora_x"], values["lora_A"], values["lora_B"]
    d_lora_x = x.new_empty((0,)) if lora_x is None else lora_x.new_empty(lora_x.shape)
    return x.new_empty(x.shape), d_lora_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


# ----------------------------------------------------------------------------- autograd


def _stand_in(x_meta) -> Tensor:
    """x's shape, dtype and device in one element of memory, for a backward that reads no x."""
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


class LoraLinearFunction(torch.autograd.Function):
    """The LoRA op's autograd formula, for every frozen base (dispatch key Autograd).

    Written as a plain Function rather than through torch.library.register_autograd: that adds
    per-call generic work (schema default filling, a metadata dataclass, a Python redispatch)
    to every LoRA linear called eagerly. AOTAutograd traces it like any autograd.Function.
    """

    @staticmethod
    def forward(ctx, op: LoraOp, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            out, hidden = op.forward_op(*inputs)
        v = op.forward_values(inputs)
        x, lora_x, bias, residual = v["x"], v["lora_x"], v["bias"], v["residual"]
        kept = op.strategy.backward_base({name: v[name] for name in op.base_names})
        base_tensors, ctx.base_plan = pack_saved({name: kept[name] for name in op.backward_base_names})
        # With dropout given as lora_x, backward needs of x only dx's shape, dtype and device:
        # x itself is not kept, M x K elements less saved per LoRA layer (lora_x, which dA
        # needs, is saved instead). Given as a mask, x and the mask are kept and lora_x is
        # rebuilt.
        ctx.x_meta = None if lora_x is None else (x.shape, x.dtype, x.device)
        ctx.save_for_backward(x if lora_x is None else None, v["lora_A"], v["lora_B"], lora_x, hidden,
                              v["scale_tensor"], v["dropout_mask"], *base_tensors)
        ctx.op, ctx.scale, ctx.impl, ctx.dropout_scale = op, v["scale"], v["impl"], v["dropout_scale"]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.has_lora_B_bias = v["lora_B_bias"] is not None
        ctx.mark_non_differentiable(hidden)
        return out, hidden

    @staticmethod
    def backward(ctx, grad_out, _grad_hidden):
        # lora_hidden is an internal output (saved for dB) that the rewritten graph never reads:
        # its incoming gradient is zero or None and is ignored.
        op: LoraOp = ctx.op
        x, lora_A, lora_B, lora_x, hidden, scale_tensor, mask, *base_tensors = ctx.saved_tensors
        x = x if ctx.x_meta is None else _stand_in(ctx.x_meta)
        values = {"grad_out": grad_out, "x": x, "lora_A": lora_A, "lora_B": lora_B, "lora_x": lora_x,
                  "lora_hidden": hidden, "scale": ctx.scale, "scale_tensor": scale_tensor, "impl": ctx.impl,
                  "dropout_mask": mask, "dropout_scale": ctx.dropout_scale,
                  **unpack_saved(ctx.base_plan, base_tensors)}
        dx, d_lora_x, dA, dB = op.backward_op(*(values[name] for name in op.backward_names))
        needs = dict(zip(op.forward_names, ctx.needs_input_grad[1:]))
        dbias, d_lora_B_bias, dresidual = side_grads(
            grad_out, ctx.bias_dtype if needs["bias"] else None, ctx.has_lora_B_bias and needs["lora_B_bias"],
            lora_A.dtype, ctx.scale, scale_tensor, ctx.residual_dtype if needs["residual"] else None)
        grads = {"x": dx if needs["x"] else None, "bias": dbias, "lora_A": dA, "lora_B": dB,
                 "lora_B_bias": d_lora_B_bias, "lora_x": d_lora_x if lora_x is not None else None,
                 "residual": dresidual}
        return (None, *(grads.get(name) for name in op.forward_names))


def _autograd(op: LoraOp, *inputs):
    if len(inputs) < len(op.forward_names):
        inputs = (*inputs, *op.forward_defaults[len(inputs):])
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
        return LoraLinearFunction.apply(op, *inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return op.forward_op(*inputs)


# ----------------------------------------------------------------------------- registration


def _missing(names: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    return [name for name in wanted if name not in names]


def register_lora_op(strategy: FrozenBase, namespace: str = "unsloth") -> LoraOp:
    """Define `namespace::<name>` and `namespace::<name>_backward` from the strategy's schemas,
    with their implementation, fake impls and autograd (LoraLinearFunction)."""
    qualified = f"{namespace}::{strategy.name}"
    if qualified in REGISTERED:
        raise UnslothCompileError(f"unsloth_compile: LoRA op {qualified} is registered already; give the "
                                  f"strategy another name")
    forward_schema = f"{strategy.name}({strategy.forward_args}) -> (Tensor, Tensor)"
    backward_schema = f"{strategy.name}_backward({strategy.backward_args}) -> (Tensor, Tensor, Tensor, Tensor)"
    forward_names, forward_defaults = _arguments(torch._C.parse_schema(forward_schema))
    backward_names, backward_defaults = _arguments(torch._C.parse_schema(backward_schema))
    absent = _missing(forward_names, LORA_FORWARD_ARGS) + _missing(backward_names, LORA_BACKWARD_ARGS)
    if absent:
        raise UnslothCompileError(f"unsloth_compile: the schemas of LoRA op {qualified} lack the adapter's "
                                  f"arguments {absent}; every LoRA op takes {list(LORA_FORWARD_ARGS)} forward "
                                  f"and {list(LORA_BACKWARD_ARGS)} backward")
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(forward_schema)
    lib.define(backward_schema)
    packet = getattr(torch.ops, namespace)
    forward_op = getattr(packet, strategy.name).default
    backward_op = getattr(packet, f"{strategy.name}_backward").default
    op = LoraOp(strategy, forward_op, backward_op, forward_names, forward_defaults, backward_names, backward_defaults,
                tuple(n for n in forward_names if n not in LORA_FORWARD_ARGS),
                tuple(n for n in backward_names if n not in LORA_BACKWARD_ARGS))

    def run_forward(*args):
        return _run_forward(op, *args)

    def run_backward(*args):
        return _run_backward(op, *args)

    def autograd(*inputs):
        return _autograd(op, *inputs)

    # One implementation for every device: the strategy dispatches to its kernels on CUDA and
    # to the reference elsewhere, so a new backend (XPU, MPS) runs the reference instead of failing.
    lib.impl(strategy.name, run_forward, "CompositeExplicitAutograd")
    lib.impl(f"{strategy.name}_backward", run_backward, "CompositeExplicitAutograd")
    lib.impl(strategy.name, autograd, "Autograd")
    torch.library.register_fake(qualified, lambda *args: _fake_forward(op, *args), lib=lib)
    torch.library.register_fake(f"{qualified}_backward", lambda *args: _fake_backward(op, *args), lib=lib)
    _libraries.append(lib)
    REGISTERED[qualified] = op
    return op
