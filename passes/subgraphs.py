"""The graphs a pass rewrites: the Dynamo graph and the bodies of the higher-order ops in it.

Dynamo puts some regions of a model into a higher-order op (HOP) whose body is a GraphModule
submodule of the graph, called through a `get_attr` node:

    wrap_body_0 = self.wrap_body_0
    tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(
        wrap_body_0, hidden, w_q, lora_A_q, ..., use_reentrant=False)

Gradient checkpointing (`torch.utils.checkpoint.checkpoint`, `use_reentrant` True or False,
as transformers' `gradient_checkpointing_enable()` calls it) becomes `tag_activation_checkpoint`
on torch 2.11-2.13; AOTAutograd inlines the body with recompute tags and the partitioner
recomputes it in backward. A pass must therefore look inside the body to see the model.

A body is rewritten only when that keeps the HOP's meaning: the HOP is one of
`REWRITABLE_HOPS` (they run their body as a plain function: whatever is functional inside it
stays correct, recomputation included), and every use of the body is such a call. Bodies of
other HOPs (cond, while_loop, an autograd.Function's forward/backward pair, invoke_subgraph,
...) are left alone: their semantics tie the body to something a rewrite would not update.

Usage in a pass:

    modules = graph_modules(gm)            # root first, then HOP bodies, depth first
    for module in modules:
        rewrite(module)                    # never changes a body's inputs or outputs
    recompile(modules)
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.fx import GraphModule, Node

# Looked up by name: a torch that lacks one simply does not get it rewritten.
REWRITABLE_HOP_NAMES = ("tag_activation_checkpoint", "wrap")


def rewritable_hops() -> tuple:
    return tuple(hop for name in REWRITABLE_HOP_NAMES
                 if (hop := getattr(torch.ops.higher_order, name, None)) is not None)


def is_hop_call(node: Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def hop_name(node: Node) -> str:
    return f"torch.ops.higher_order.{getattr(node.target, '__name__', node.target)}"


def _attr(gm: GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _body_of(gm: GraphModule, node: Node) -> Optional[GraphModule]:
    """The body of a rewritable HOP call (its first argument, a get_attr of a GraphModule)."""
    if not (is_hop_call(node) and node.target in rewritable_hops() and node.args):
        return None
    getter = node.args[0]
    if not (isinstance(getter, Node) and getter.op == "get_attr"):
        return None
    body = _attr(gm, getter.target)
    return body if isinstance(body, GraphModule) else None


def _only_called_as_body(getter: Node) -> bool:
    """Every use of the body is as the body of a rewritable HOP (not an operand of another op)."""
    return all(is_hop_call(u) and u.target in rewritable_hops() and u.args[0] is getter
               and getter not in u.args[1:] and getter not in u.kwargs.values() for u in getter.users)


def rewritten_body(gm: GraphModule, node: Node) -> Optional[GraphModule]:
    """The body `graph_modules` yields for this HOP call, or None when the body is left alone."""
    body = _body_of(gm, node)
    if body is None or not _only_called_as_body(node.args[0]):
        return None
    # A body reached through some other get_attr too (another op's operand) is left alone.
    getters = [n for n in gm.graph.nodes if n.op == "get_attr" and _attr(gm, n.target) is body]
    return body if all(_only_called_as_body(g) for g in getters) else None


def _walk(gm: GraphModule, seen: set[int]) -> Iterator[GraphModule]:
    if id(gm) in seen:
        return
    seen.add(id(gm))
    yield gm
    for node in gm.graph.nodes:
        body = rewritten_body(gm, node)
        if body is not None:
            yield from _walk(body, seen)


def graph_modules(gm: GraphModule) -> list[GraphModule]:
    """Every GraphModule a pass rewrites: `gm` first, then the bodies of rewritable HOPs,
    recursively (a checkpoint inside a checkpoint), each once even when called twice."""
    return list(_walk(gm, set()))


def operand_source(root: GraphModule, body: GraphModule, node: Node) -> Node:
    """What `node` of `body` stands for in the graph that calls it: a placeholder of a rewritable
    HOP body is the operand the HOP passes at its position (`hop(body, *operands)`), followed up
    through nested bodies; `node` itself when it is not a placeholder, when `body` is `root`, or
    when the body's calls pass different operands there."""
    if node.op != "placeholder" or body is root:
        return node
    index = [n for n in body.graph.nodes if n.op == "placeholder"].index(node)
    for parent in graph_modules(root):
        calls = [n for n in parent.graph.nodes if rewritten_body(parent, n) is body]
        if not calls:
            continue
        operands = {call.args[1 + index] if 1 + index < len(call.args) else None for call in calls}
        if len(operands) != 1:
            return node
        operand = operands.pop()
        return operand_source(root, parent, operand) if isinstance(operand, Node) else node
    return node


def recompile(modules: list[GraphModule]) -> None:
    """After a pass: check and regenerate the code of every graph it may have changed."""
    for module in modules:
        module.graph.lint()
        module.recompile()
