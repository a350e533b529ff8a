"""LoRA layers the LoRA pass left in the graph, and why: DoRA, Embedding/Conv LoRA, other
variants it does not understand, adapters merged or disabled, LoRA inside a higher-order op
whose body is not rewritten. Run after passes/lora/lora_linear.py has fused what it could."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ...report import Report, Site
from .. import fx_match as fm
from .. import subgraphs

_ADAPTER_NAME_PARTS = ("lora_a", "lora_b", "lora_embedding", "magnitude")
_CONV_FUNCTIONS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                   torch.conv1d, torch.conv2d, torch.conv3d}


def _is_adapter_param(node: Node) -> bool:
    name = str(node.target if node.op == "placeholder" else node.name).lower()
    return fm.is_param_like(node) and any(part in name for part in _ADAPTER_NAME_PARTS)


_FRAGMENT = "<fragment after a graph break>"


def _owner_path(node: Node) -> tuple[str, str]:
    """(path, class) of the LoRA layer a node runs in: the module just above its lora_* part.
    After a graph break the frame starts inside PEFT and the path is relative to it."""
    stack = fm.module_stack(node)
    owner = ("", "")
    for path, cls in stack:
        if any(part in component for component in path.lower().split(".")[-2:]
               for part in ("lora_", "magnitude")):
            break
        owner = (path, cls)
    if not owner[0] or owner[0] == "<root>":
        return _FRAGMENT, owner[1]
    return owner


def _is_peft_lora_layer(qualified_class: str) -> bool:
    """A PEFT LoRA *layer* (peft.tuners.lora.layer.Linear, .bnb.Linear8bitLt, ...), not the
    LoraModel wrapper (peft.tuners.lora.model.LoraModel) that contains them all."""
    return qualified_class.startswith("peft.tuners.lora.") and not qualified_class.startswith("peft.tuners.lora.model.")


def report_leftover_lora_layers(modules: list[GraphModule], report: Report, pattern: str) -> None:
    """LoRA layers whose adapters are still computed after the rewrite were not understood
    (DoRA, Embedding/Conv LoRA, other variants); PEFT LoRA layers that run only their base
    layer have merged or disabled adapters. Report each with the reason.

    `modules`: the root graph and the HOP bodies the pass rewrote (subgraphs.graph_modules).
    A call of such a HOP passes adapter weights to its body, where they are judged; a HOP
    whose body is left alone but receives adapter weights is reported by name."""
    reported = {s.module for s in report.sites}
    has_magnitude = any(_is_adapter_param(n) and "magnitude" in str(n.target).lower()
                        for gm in modules for n in gm.graph.nodes if n.op == "placeholder")
    leftovers: dict[str, str] = {}
    lora_layers_seen: dict[str, str] = {}
    for gm in modules:
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method") or subgraphs.rewritten_body(gm, node) is not None:
                continue
            for path, cls in fm.module_stack(node):
                if _is_peft_lora_layer(cls) and not path.rsplit(".", 1)[-1].startswith("lora_"):
                    lora_layers_seen.setdefault(path, cls)
            if not any(_is_adapter_param(a) for a in node.all_input_nodes) or _feeds_fused_op(node):
                continue
            path, cls = (fm.module_path(node), "") if subgraphs.is_hop_call(node) else _owner_path(node)
            if path not in reported and path not in leftovers:
                leftovers[path] = _leftover_reason(node, path, cls, has_magnitude)
    for path, reason in leftovers.items():
        report.add(Site(path, pattern, "refused", reason))
    for path, cls in lora_layers_seen.items():
        if path not in reported and path not in leftovers and not any(p.startswith(path + ".") for p in leftovers):
            report.add(Site(path, pattern, "refused", "adapters merged or disabled: only the base layer runs",
                            {"class": cls}))


def _is_unsloth_op(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "unsloth"


def _feeds_fused_op(node: Node, depth: int = 0) -> bool:
    """The fused op itself, or a node the rewrite emitted for it (A.t(), the concatenation of
    several adapters' ranks, a scaled B), whose every use ends in a fused op: adapter
    parameters reaching it were consumed by a fused site, not left over."""
    if _is_unsloth_op(node):
        return True
    if depth >= 3 or not node.users:
        return False
    return all(_feeds_fused_op(user, depth + 1) for user in node.users)


def _leftover_reason(node: Node, path: str, cls: str, has_magnitude: bool) -> str:
    """Why a node that still reads adapter weights was not fused."""
    if subgraphs.is_hop_call(node):
        return (f"LoRA inside a {subgraphs.hop_name(node)} region, whose body the pass does not rewrite "
                f"(rewritten: {', '.join(subgraphs.REWRITABLE_HOP_NAMES)})")
    kind = cls.rsplit(".", 1)[-1]
    if has_magnitude or "magnitude" in " ".join(p for p, _ in fm.module_stack(node)):
        return "DoRA (use_dora=True) is not fused"
    if node.target is torch.nn.functional.embedding or kind == "Embedding":
        return "LoRA on Embedding layers is not fused"
    if node.target in _CONV_FUNCTIONS or kind.startswith("Conv") and kind != "Conv1D":
        return f"LoRA on {kind or 'convolution'} layers is not fused"
    if path == _FRAGMENT:
        return ("unrecognised LoRA form in a graph fragment: a graph break inside the LoRA layer "
                "split it (torch._dynamo.explain(model)(...) shows where)")
    return f"unrecognised LoRA form ({cls})"
