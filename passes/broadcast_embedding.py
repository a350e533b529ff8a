"""Embedding lookups of an index broadcast along the batch: one lookup per distinct row.

Pattern (Dynamo graph): `torch.nn.functional.embedding(idx.expand(B, L), weight, ...)` where
`idx` has size 1 along the expanded dimensions (stride 0 there after the expand). BERT-style
models do this when the caller passes no `token_type_ids`: the registered `token_type_ids`
buffer, `(1, max_len)`, is sliced (or gathered by position) to `(1, L)` and expanded to the
batch, so every row of the batch looks up the same embedding rows.

Replacement: `embedding(idx, weight, ...)` of shape `(1, L, H)`, expanded to `(B, L, H)`. The
values are the same function of the inputs (each row of the expanded index is `idx`); the
lookup reads and writes one row instead of B, the expand is a view that the consumer (the add
into the word embeddings) reads as a broadcast, and no stride-0 integer tensor reaches a
kernel. The spelling with `token_type_ids` passed as a full `(B, L)` tensor is not touched (its
values can differ by row). With a trainable weight, autograd sums the B copies of the gradient
before the scatter instead of scattering B rows: the same sum, in another order.

Check: the index's example value is a plain tensor; the expand's input has size 1 wherever the
expand made a dimension larger (only a broadcast, no new leading dimensions to resolve with
-1 elsewhere); the embedding has no `max_norm` (which renormalises `weight` in place, once per
looked-up row). Refusals are reported with the reason.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import Config
from ..report import Report, Site
from . import fx_match as fm
from .subgraphs import graph_modules, recompile

PATTERN = "embedding"
EMBEDDING_TARGETS = {torch.nn.functional.embedding}
_EXPAND_METHODS = ("expand",)


# ----------------------------------------------------------------------------- pattern


def match_broadcast_index(node: Node) -> Optional[Node]:
    """The expand node feeding an embedding's index when it broadcasts a size-1 dimension
    (stride 0 in its example value), else None."""
    if node.op != "call_function" or node.target not in EMBEDDING_TARGETS or not node.args:
        return None
    index = node.args[0]
    if not fm.is_call(index, {torch.broadcast_to}, _EXPAND_METHODS):
        return None
    value = fm.example_value(index)
    if not isinstance(value, torch.Tensor):
        return None
    if not any(stride == 0 and size != 1 for size, stride in zip(value.shape, value.stride())):
        return None
    return index


# ----------------------------------------------------------------------------- check


def _max_norm(node: Node):
    return node.kwargs.get("max_norm", node.args[3] if len(node.args) > 3 else None)


def check_site(node: Node, expand: Node) -> Optional[str]:
    """None when the lookup can run on the expand's input, else why not."""
    if _max_norm(node) is not None:
        return "embedding with max_norm renormalises its weight per looked-up row"
    source, expanded = fm.example_value(expand.args[0]), fm.example_value(expand)
    if not isinstance(source, torch.Tensor) or source.dim() != expanded.dim():
        return "the expand adds leading dimensions"
    for before, after in zip(source.shape, expanded.shape):
        if before != after and before != 1:
            return "the expand's input is not size 1 where it broadcasts"
    return None


# ----------------------------------------------------------------------------- replacement


def _expand_sizes(expand: Node) -> list:
    """The sizes the expand was given (ints, SymInt nodes or -1), as one list."""
    sizes = expand.args[1:] if expand.op == "call_method" else expand.args[1:2]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    return list(sizes)


def replace_site(gm: GraphModule, node: Node, expand: Node) -> str:
    """embedding(idx.expand(*sizes)) -> embedding(idx).expand(*sizes, -1)."""
    source = expand.args[0]
    with gm.graph.inserting_before(node):
        lookup = gm.graph.call_function(node.target, (source, *node.args[1:]), dict(node.kwargs))
        fm.set_fake_meta(lookup, node)
        broadcast = gm.graph.call_method("expand", (lookup, *_expand_sizes(expand), -1))
        fm.set_fake_meta(broadcast, node)
    node.replace_all_uses_with(broadcast)
    gm.graph.erase_node(node)
    if not expand.users:
        gm.graph.erase_node(expand)
    return (f"index broadcast to {tuple(fm.example_value(broadcast).shape[:-1])}: looked up at "
            f"{tuple(fm.example_value(source).shape)}, the rows expanded")


# ----------------------------------------------------------------------------- the pass


def lookup_broadcast_rows_once(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Rewrite embedding lookups of a batch-broadcast index; report each one seen."""
    report = report if report is not None else Report()
    modules = graph_modules(gm)
    for module in modules:
        for node in list(module.graph.nodes):
            expand = match_broadcast_index(node)
            if expand is None:
                continue
            path = fm.module_path(node)
            reason = check_site(node, expand)
            if reason is not None:
                report.add(Site(path, PATTERN, "kept", reason))
                continue
            report.add(Site(path, PATTERN, "rewritten", replace_site(module, node, expand)))
            report.counters["embedding.broadcast_index"] += 1
    recompile(modules)
    return gm
