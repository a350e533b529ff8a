"""A frozen base alone (a stored linear outside any LoRA layer: Fp8Linear, Sparse24Linear,
Nf4Linear), as two `torch.ops.unsloth` ops of its own:

    register_base_linear_op(name, base_args, forward, backward, shape) defines
        <name>(Tensor x, <base_args>, Tensor? bias, str impl) -> Tensor                    x W^T + b
        <name>_backward(Tensor grad_out, <base_args>, ScalarType x_dtype, str impl) -> Tensor   dx = dY W
    with
        - one implementation for every device (CompositeExplicitAutograd): `forward` and
          `backward`, which read the base's arguments by name from a dict;
        - fake impls: the shapes from `shape(base)` = (N, K);
        - an Autograd kernel for the forward: BaseLinearFunction.

The weight is frozen: it gets no gradient, and backward keeps the base's arguments as given
(the module's own tensors: saving them costs nothing). The bias gradient is a column sum
outside the ops, where Inductor fuses it. The LoRA pass recognises `<name>` as a base of its
kind (passes/lora/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .saved_args import pack_saved, unpack_saved

Base = dict[str, Any]  # the base's arguments by name, in schema order


@dataclass(frozen=True, eq=False)
class BaseLinearOp:
    """A registered base alone: its two ops and the names of the base's arguments."""

    forward_op: Any  # torch._ops.OpOverload
    backward_op: Any
    base_names: tuple[str, ...]

    def base(self, args) -> Base:
        return dict(zip(self.base_names, args))


_libraries: list = []  # a Library unregisters its ops when collected


class BaseLinearFunction(torch.autograd.Function):
    """dx through the backward op, the bias gradient as a column sum; none for the weight.
    Inputs: (op, x, *base, bias, impl)."""

    @staticmethod
    def forward(ctx, op: BaseLinearOp, x, *rest):
        *base, bias, impl = rest
        with torch._C._AutoDispatchBelowAutograd():
            out = op.forward_op(x, *base, bias, impl)
        tensors, ctx.base_plan = pack_saved(op.base(base))
        ctx.save_for_backward(*tensors)
        ctx.op, ctx.x_dtype, ctx.impl = op, x.dtype, impl
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        op: BaseLinearOp = ctx.op
        base = unpack_saved(ctx.base_plan, ctx.saved_tensors)
        dx = dbias = None
        if ctx.needs_input_grad[1]:
            dx = op.backward_op(grad_out, *base.values(), ctx.x_dtype, ctx.impl)
        if ctx.needs_input_grad[-2]:
            dbias = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.bias_dtype).sum(0)
        return None, dx, *(None for _ in op.base_names), dbias, None


def register_base_linear_op(name: str, base_args: str, forward: Callable[[Tensor, Base, Optional[Tensor], str], Tensor],
                            backward: Callable[[Tensor, Base, torch.dtype, str], Tensor],
                            shape: Callable[[Base], tuple[int, int]], namespace: str = "unsloth") -> BaseLinearOp:
    """Define `namespace::<name>` and `namespace::<name>_backward` over the base's arguments
    `base_args` (a schema's argument list), with their implementation, fake impls and autograd."""
    forward_schema = f"{name}(Tensor x, {base_args}, Tensor? bias, str impl) -> Tensor"
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(forward_schema)
    lib.define(f"{name}_backward(Tensor grad_out, {base_args}, ScalarType x_dtype, str impl) -> Tensor")
    packet = getattr(torch.ops, namespace)
    forward_op, backward_op = getattr(packet, name).default, getattr(packet, f"{name}_backward").default
    base_names = tuple(a.name for a in torch._C.parse_schema(forward_schema).arguments[1:-2])
    op = BaseLinearOp(forward_op, backward_op, base_names)

    def run_forward(x, *rest):
        *base, bias, impl = rest
        return forward(x, op.base(base), bias, impl)

    def run_backward(grad_out, *rest):
        *base, x_dtype, impl = rest
        return backward(grad_out, op.base(base), x_dtype, impl)

    def fake_forward(x, *rest):
        return x.new_empty((*x.shape[:-1], shape(op.base(rest[:-2]))[0]))

    def fake_backward(grad_out, *rest):
        return grad_out.new_empty((*grad_out.shape[:-1], shape(op.base(rest[:-2]))[1]), dtype=rest[-2])

    def autograd(x, *rest):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(x, rest[-2]):
            return BaseLinearFunction.apply(op, x, *rest)
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(x, *rest)

    lib.impl(name, run_forward, "CompositeExplicitAutograd")
    lib.impl(f"{name}_backward", run_backward, "CompositeExplicitAutograd")
    lib.impl(name, autograd, "Autograd")
    torch.library.register_fake(f"{namespace}::{name}", fake_forward, lib=lib)
    torch.library.register_fake(f"{namespace}::{name}_backward", fake_backward, lib=lib)
    _libraries.append(lib)
    return op
