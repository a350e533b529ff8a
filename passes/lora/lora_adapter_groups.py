"""Several active adapters on one layer: which the fused op computes, which stay graph nodes.

`torch.ops.unsloth.lora_linear` takes one adapter input (x, one dropout draw as lora_x, or one
dropout mask); adapters reading that input are concatenated along the rank. PEFT with two
adapters of different `lora_dropout` (or two non-zero ones: each adapter has its own Dropout
module, so its own draw) gives adapters reading different tensors. They are grouped by what
they read; the op computes the base and one group, and the other groups' summands

    result = base + lora_a(drop_a(x)) * s_a + lora_b(x) * s_b        (PEFT, active ["a", "b"])
      ->  out = lora_linear(x, W, A_a, B_a, dropout_mask=..., residual=lora_b(x) * s_b)

stay the graph nodes they were (each dropout draw at its place in the graph, so the random
stream is eager's) and reach the op as its residual, added to the op's sum. The op takes a
single adapter whose dropout can go in as a mask when there is one (its dropped input is then
not kept for backward), else the first group; the terms left outside save for backward what
they save in eager.

Why not more in the op: a mask or input per adapter, or a second op without a base weight,
would change the op's schema and every kernel behind it. The terms left outside cost what
they cost in eager (two thin GEMMs and an (M, N) summand), compiled by Inductor.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.fx import Node

from .lora_autocast import cast_to

if TYPE_CHECKING:
    from .lora_site import Adapter


def group_by_input(adapters: list["Adapter"]) -> list[list["Adapter"]]:
    """Adapters whose ranks can be concatenated, in the order of the model: those reading the
    same tensor (the layer input, or one dropout output) in the same compute dtype, with float
    scales. An adapter with a 0-d tensor scale is a group of its own (its scale cannot be
    folded into B as a float)."""
    groups: dict = {}
    for index, adapter in enumerate(adapters):
        key = (adapter.lora_x, adapter.compute_dtype) if adapter.scale_tensor is None else index
        groups.setdefault(key, []).append(adapter)
    return list(groups.values())


def split_by_input(adapters: list["Adapter"], takes_mask: Callable[["Adapter"], bool]
                   ) -> tuple[list["Adapter"], list["Adapter"]]:
    """(adapters the op computes, adapters left as graph terms). The op takes the first group
    that is a single adapter whose dropout it can take as a mask (the largest saving: the
    dropped input is not kept for backward), else the first group."""
    groups = group_by_input(adapters)
    chosen = next((g for g in groups if len(g) == 1 and takes_mask(g[0])), groups[0])
    return chosen, [a for g in groups if g is not chosen for a in g]


def summed_terms(emit: Callable[..., Node], extras: list["Adapter"], dtype: Optional[torch.dtype]) -> Node:
    """The extra adapters' summands added in the model's order, cast to the dtype of the site's
    sum (a widening cast: the sum has at least their dtype), as the op's residual."""
    total = extras[0].term
    for adapter in extras[1:]:
        total = emit("call_function", operator.add, (total, adapter.term))
    return cast_to(emit, total, dtype) if dtype is not None else total


def op_operands(emit: Callable[..., Node], adapters: list["Adapter"]) -> tuple:
    """(A (r, K), B (N, r), B bias, float scale, tensor scale) for the op, in the parameters'
    dtypes: one adapter's own, or a group's concatenated along the rank with each (float) scale
    folded into its B and B bias."""
    As = [emit("call_method", "t", (a.A,)) if a.A_in_out else a.A for a in adapters]
    Bs = [emit("call_method", "t", (a.B,)) if a.B_in_out else a.B for a in adapters]
    if len(adapters) == 1:
        return As[0], Bs[0], adapters[0].B_bias, adapters[0].scale, adapters[0].scale_tensor
    A = emit("call_function", torch.cat, (As, 0))
    scaled = [emit("call_function", operator.mul, (b, a.scale)) for a, b in zip(adapters, Bs)]
    B = emit("call_function", torch.cat, (scaled, 1))
    B_bias = None
    for a in adapters:
        if a.B_bias is not None:
            term = emit("call_function", operator.mul, (a.B_bias, a.scale))
            B_bias = term if B_bias is None else emit("call_function", operator.add, (B_bias, term))
    return A, B, B_bias, 1.0, None
