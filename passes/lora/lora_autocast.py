"""The dtypes a LoRA site computes in, autocast included, and the casts that make the fused op
compute in them.

Under `torch.autocast(device, dtype=bf16)` eager casts every floating operand of a linear,
matmul or addmm (input, weight, bias) to bf16 and computes in bf16, whatever the dtypes of the
model's tensors; the PEFT sum, scale and final cast then follow ordinary type promotion. On an
fp32 model (traced, torch 2.13) every projection of a site returns bf16, so the scale, the sum
and PEFT's `.to(result dtype)` are bf16 too. Dynamo records that in the graph: the example
value of each projection has the dtype it computed in, whether autocast was entered outside
the compiled region or inside it (`_enter_autocast` / `_exit_autocast` nodes around the
region) or switched off inside it (`enabled=False`: the projections are back in the tensors'
own dtypes).

`torch.ops.unsloth.lora_linear` falls through autocast (it sees its inputs as given), so the
pass reads each projection's dtype off the graph and casts the op's operands to it: x, W and
the base bias to the base projection's dtype, A, B, the B bias and the dropout output to the
adapter's. The casts are differentiable graph nodes: gradients of fp32 adapters come back in
fp32 through them, as they come back through autocast's casts in eager. Casting the frozen W
costs one copy of it per step; eager autocast pays the same copy (its cast cache keeps only
leaf tensors that require grad, which a frozen weight is not).

One difference is left: eager casts x once per projection, so when x is fp32 the gradients of
its two uses (base and adapter) meet in fp32, while the op returns their sum in the compute
dtype (one more bf16 rounding of dx at the site's input).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.fx import Node

from .. import fx_match as fm


def output_dtype(node: Node) -> Optional[torch.dtype]:
    value = fm.example_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def base_compute_dtype(base_output: Node) -> Optional[torch.dtype]:
    """The dtype the base projection computed in: its output's (under autocast, autocast's
    dtype; otherwise that of x and W, which eager requires to be equal)."""
    return output_dtype(base_output)


def adapter_dtype_mismatch(a_output: Node, b_output: Node) -> Optional[str]:
    """The reason A and B of one adapter computed in different dtypes (a form no autocast
    policy produces: the op computes both in one dtype), else None."""
    a_dtype, b_dtype = output_dtype(a_output), output_dtype(b_output)
    if a_dtype is None or a_dtype != b_dtype or not a_dtype.is_floating_point:
        return f"adapter projections compute in different dtypes (A: {a_dtype}, B: {b_dtype})"
    return None


def is_autocast_site(base_output: Node, weight: Node, adapter_output: Node, adapter_param: Node) -> bool:
    """Some projection of the site computes in another dtype than its parameter's."""
    return (output_dtype(base_output) != output_dtype(weight)
            or output_dtype(adapter_output) != output_dtype(adapter_param))


def cast_to(emit: Callable[..., Node], node: Optional[Node], dtype: torch.dtype) -> Optional[Node]:
    """`node.to(dtype)` emitted through `emit` when node's dtype differs, else node itself."""
    if node is None or output_dtype(node) == dtype:
        return node
    return emit("call_method", "to", (node, dtype))
