"""subgraphs.operand_source: what a checkpoint body's placeholder stands for in the graph that
calls the body (the attention pass evaluates a causal mask built outside the body through it)."""

import torch
from torch.utils.checkpoint import checkpoint

from helpers import dynamo_graphs
from unsloth_compile.passes import subgraphs


def _masked_sum(x, mask):
    return torch.where(mask, x, 0.0).sum(-1)


def _checkpointed(x):
    mask = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool).tril()  # built outside the body
    return checkpoint(_masked_sum, x, mask, use_reentrant=False)


def test_a_body_placeholder_is_traced_to_the_operand_the_checkpoint_passes():
    (gm,) = dynamo_graphs(_checkpointed, torch.randn(5, 5, requires_grad=True))
    modules = subgraphs.graph_modules(gm)
    assert len(modules) == 2, "no checkpoint body: the test proves nothing"
    body = modules[1]
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    sources = [subgraphs.operand_source(gm, body, p) for p in placeholders]
    assert all(s.graph is gm.graph for s in sources)  # every operand comes from the root graph
    tril = [s for s in sources if s.op == "call_method" and s.target == "tril"]
    assert len(tril) == 1, [(s.op, s.target) for s in sources]
    # a node that is not a placeholder, or one of the root graph, stands for itself
    inner = next(n for n in body.graph.nodes if n.op == "call_function")
    assert subgraphs.operand_source(gm, body, inner) is inner
    root_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert subgraphs.operand_source(gm, gm, root_input) is root_input

