"""Attention masks of dynamic graphs: one compiled graph for every sequence length.

Pattern: an SDPA call with a mask (`attn_mask` a tensor) of 3 or 4 dimensions whose strides,
but the last, are not known to be multiples of 8 elements: in practice a (b, 1, L, S) padding
mask of a graph that Dynamo made dynamic in the sequence length (`L`, `S` symbolic).

Inductor gives SDPA's CUDA kernels a mask only with strides aligned to 8 elements; with a
symbolic length it cannot prove that, so it guards on `S % 8` and the next batch of the other
kind compiles the whole model again (a guard such as `not (L % 8 == 0 and L*L % 8 == 0)` on
a padded Llama: docs/bench/design-choices.md#attention).

Replacement: `attn_mask=torch.ops.unsloth.attention_bias(mask, q.dtype, 8)`: the additive bias
SDPA makes of the mask itself (0 / -inf in the query's dtype for a bool mask, a cast for a
float one), laid out with its last dimension padded in storage to a multiple of 8, strides
Inductor can prove aligned at every length (unsloth_compile/ops/attention_bias.py). The
values SDPA computes are unchanged.

Check: the query is a floating CUDA tensor (the constraint is the CUDA kernels'; elsewhere the
mask is left as it is), the mask a plain tensor of 3 or 4 dimensions with a floating or bool
dtype; masks whose strides are concrete (static lengths: Inductor pads those itself, with no
guard) or already known to be aligned are left alone. Each rewrite is reported as an
`attention` site.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import Config
from ..report import Report, Site
from . import fx_match as fm
from .attention import SDPA_TARGETS, match_sdpa, set_sdpa_mask
from .subgraphs import graph_modules, recompile

PATTERN = "attention"
ALIGNMENT = 8  # elements: sdpa_constraint's ALIGNMENT in torch/_inductor/lowering.py


def has_symbolic_strides(value: torch.Tensor) -> bool:
    return any(isinstance(stride, torch.SymInt) for stride in value.stride())


def strides_known_aligned(value: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return all(statically_known_true(stride % ALIGNMENT == 0) or statically_known_true(size == 1)
               for stride, size in zip(value.stride()[:-1], value.shape[:-1]))


def check_site(node: Node, mask: Node) -> Optional[str]:
    """None when the mask is rewritten, else why not (None also for nothing to do: see caller)."""
    value, query = fm.example_value(mask), fm.example_value(node.args[0])
    if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
        return "mask is not a 3-D or 4-D tensor"
    if not (value.dtype == torch.bool or value.is_floating_point()):
        return f"mask of dtype {value.dtype}"
    if not isinstance(query, torch.Tensor) or not query.is_floating_point():
        return "query is not a floating tensor"
    return None


def on_cuda(node: Node) -> bool:
    query = fm.example_value(node.args[0]) if node.args else None
    return isinstance(query, torch.Tensor) and query.device.type == "cuda"


def replace_site(gm: GraphModule, node: Node, mask: Node) -> str:
    dtype = fm.example_value(node.args[0]).dtype
    with gm.graph.inserting_before(node):
        bias = gm.graph.call_function(torch.ops.unsloth.attention_bias.default, (mask, dtype, ALIGNMENT))
    fm.set_fake_meta(bias, node)
    set_sdpa_mask(node, bias)
    return f"mask of symbolic length as an additive {dtype} bias with aligned strides (one graph for every length)"


def align_attention_masks(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Give every SDPA call whose mask Inductor cannot prove aligned the aligned bias."""
    report = report if report is not None else Report()
    modules = graph_modules(gm)
    for module in modules:
        biases: dict[Node, Node] = {}  # one bias per mask, shared by the calls that share it
        for node in list(module.graph.nodes):
            if node.op != "call_function" or node.target not in SDPA_TARGETS:
                continue
            mask = match_sdpa(node)
            value = fm.example_value(mask) if mask is not None else None
            if not isinstance(value, torch.Tensor) or not on_cuda(node) or not has_symbolic_strides(value) \
                    or strides_known_aligned(value):
                continue  # no mask, not CUDA's constraint, or a mask Inductor aligns without a guard
            path = fm.module_path(node)
            reason = check_site(node, mask)
            if reason is not None:
                report.add(Site(path, PATTERN, "kept", f"mask strides not known aligned: {reason}"))
                continue
            if mask in biases:
                set_sdpa_mask(node, biases[mask])
                description = "shares the aligned bias of an earlier call"
            else:
                description = replace_site(module, node, mask)
                biases[mask] = match_sdpa(node)
            report.add(Site(path, PATTERN, "rewritten", description))
            report.counters["attention.mask_aligned"] += 1
    recompile(modules)
    return gm
