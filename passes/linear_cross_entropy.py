"""LM head + cross-entropy -> one chunked `torch.ops.unsloth.linear_cross_entropy` call.

Pattern (Dynamo graph, torch IR), what transformers' ForCausalLMLoss and hand-written models
produce:

    logits = torch._C._nn.linear(hidden, weight, bias)       the head (a tied embedding weight too)
    ...      elementwise steps, each read only by the next:  .float() / .to(dtype), x * c, x / c,
             torch.tanh (softcap: tanh(x / c) * c), and views that keep the vocabulary last
             (.view(-1, V), reshape, flatten, contiguous)
    loss = F.cross_entropy(logits_2d, target, ignore_index=..., reduction="mean" | "sum")

The label side (transformers' pad + slice + view of the labels) is not matched: the op takes
the target node cross_entropy reads, whatever computed it. A division by num_items_in_batch
after a "sum" stays in the graph.

Check: the logits have no other use. When the model returns them (transformers puts `logits`
in its output, so the Dynamo graph outputs them), the full logits exist anyway and fusing
saves nothing: the site is kept and reported, with the way out (`unsloth_compile.loss_only`,
which drops the logits from a training forward). Refused with the reason: class weights,
label smoothing, reduction "none", soft (probability) targets, a LoRA head (already fused into
unsloth::lora_linear: the op takes a plain linear head), a head computing in another dtype
than its input (autocast), anything else between the head and the loss.

Replacement: `torch.ops.unsloth.linear_cross_entropy(hidden, weight, bias, target, ignore_index,
reduction, steps, step_values, chunk_rows, impl)`; the steps run inside the op in eager's order and
dtypes, chunk_rows keeps a chunk's fp32 logits under the `cross_entropy_chunk_mib` budget. The
op computes the gradients of the inputs that need them in its forward (no weight gradient for
a frozen head) and saves those, never the logits.

Where the fused op cannot run because the logits are returned (or the head is not a plain
linear), option `cross_entropy_on_logits` puts torch.ops.unsloth.logits_cross_entropy on the
logits instead (`check_logits_site` / `replace_logits_site`): the chain must be views and one
fp32 upcast of fp16/bf16 logits; the upcast then happens in the kernel and backward keeps the
half-precision logits and the rows' logsumexp instead of the fp32 log-probabilities eager saves
(half the bytes; under Inductor, which fuses the upcast and log-softmax itself, measured no gain).

Only the root graph is searched: no model checkpoints its head, and a fused op inside a
checkpoint body would run its forward (with the gradients) again in backward.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..config import Config
from ..kernels import linear_cross_entropy as kernel
from ..report import Report, Site
from . import fx_match as fm

PATTERN = "linear_cross_entropy"
CE_TARGETS = {F.cross_entropy}
_CE_SIGNATURE = inspect.signature(F.cross_entropy)
_VIEW_METHODS = ("view", "reshape", "flatten", "contiguous")
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten}
_DIV_TARGETS = {operator.truediv, torch.div, torch.true_divide}
_TANH_TARGETS = {torch.tanh, F.tanh}
LOGITS_RETURNED = ("the logits are returned by the model (a graph output), so they exist in full anyway; "
                   "unsloth_compile.loss_only(model) drops them from a training forward")


@dataclasses.dataclass
class Match:
    ce: Node
    args: dict  # cross_entropy's arguments by name
    chain: list  # the nodes from the head's output to cross_entropy's input, in that order
    head: Node  # the node the chain starts from (a linear when the pattern holds)
    steps: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)
    stop: Optional[str] = None  # why the walk back from the loss stopped before a linear


# ----------------------------------------------------------------------------- pattern


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _step_of(node: Node):
    """(step, value, operand) for an elementwise step or a view, else None."""
    dtype = fm.cast_dtype(node)
    if dtype is not None:
        return kernel.cast_step(dtype), 0.0, node.args[0]
    if fm.is_call(node, _VIEW_FUNCTIONS, _VIEW_METHODS):
        return "view", 0.0, node.args[0]
    if fm.is_call(node, _TANH_TARGETS, ("tanh",)) and len(node.args) == 1 and not node.kwargs:
        return "tanh", 0.0, node.args[0]
    if fm.is_mul(node):
        a, b = node.args
        if isinstance(a, Node) and _number(b):
            return "mul", float(b), a
        if isinstance(b, Node) and _number(a):
            return "mul", float(a), b
    if fm.is_call(node, _DIV_TARGETS, ("div", "true_divide")) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, Node) and _number(b):
            return "div", float(b), a
    return None


def _describe(node: Node) -> str:
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    name = getattr(node.target, "__name__", node.target)
    return f"{node.op} {name}"


def match_cross_entropy(node: Node) -> Optional[Match]:
    """The chain from a head to this cross_entropy call, walked back from its input; None when
    the node is not a cross_entropy call."""
    if node.op != "call_function" or node.target not in CE_TARGETS:
        return None
    try:
        bound = _CE_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = dict(bound.arguments)
    chain, steps, values = [], [], []
    current = args["input"]
    while isinstance(current, Node) and not fm.is_linear(current):
        step = _step_of(current)
        if step is None:
            return Match(node, args, chain, current, steps, values, stop=f"the logits come from {_describe(current)}")
        chain.insert(0, current)
        if step[0] != "view":
            steps.insert(0, step[0])
            values.insert(0, step[1])
        current = step[2]
    if not isinstance(current, Node):
        return Match(node, args, chain, node, stop="cross_entropy's input is not a tensor of the graph")
    return Match(node, args, chain, current, steps, values)


# ----------------------------------------------------------------------------- check


def _lora_head(node: Node) -> bool:
    """The chain starts at getitem(unsloth::lora_linear(...), 0): the LoRA pass fused the head."""
    lora = torch.ops.unsloth.lora_linear
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node)
            and node.args[0].target in (lora, lora.default))


def check_arguments(m: Match) -> Optional[str]:
    """Why cross_entropy's own arguments cannot be fused, or None."""
    a = m.args
    if a["weight"] is not None:
        return "cross_entropy with class weights is not fused"
    if a["label_smoothing"] not in (0, 0.0):
        return f"label_smoothing={a['label_smoothing']} is not fused (only 0)"
    if a["size_average"] is not None or a["reduce"] is not None:
        return "the legacy size_average/reduce arguments are not fused"
    if a["reduction"] not in ("mean", "sum"):
        return f"reduction={a['reduction']!r} is not fused (mean or sum)"
    if not isinstance(a["ignore_index"], int):
        return "ignore_index is not a constant"
    target = fm.example_value(a["target"])
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dim() != 1:
        return "the target is not a 1-D tensor of class indices (soft targets are not fused)"
    return None


def check_head(m: Match) -> Optional[str]:
    """Why the chain is not a plain linear head followed by the fusable steps, or None."""
    if _lora_head(m.head):
        return ("the LM head has LoRA adapters (fused into unsloth::lora_linear): the fused "
                "cross-entropy takes a plain linear head")
    if m.stop is not None:
        return m.stop + ", not from a linear head through casts, scaling, softcap and views"
    hidden, weight = (fm.example_value(n) for n in m.head.args[:2])
    bias = m.head.args[2] if len(m.head.args) > 2 else m.head.kwargs.get("bias")
    logits, out = fm.example_value(m.args["input"]), fm.example_value(m.head)
    if not all(isinstance(v, torch.Tensor) for v in (hidden, weight, logits, out)) or weight.dim() != 2:
        return "the head's operands are not plain tensors with a 2-D weight"
    if isinstance(bias, Node) and fm.example_value(bias).dim() != 1:
        return "the head's bias is not 1-D"
    if not hidden.dtype == weight.dtype == out.dtype:
        return (f"the head computes in {out.dtype} from {hidden.dtype} input and {weight.dtype} weight "
                "(autocast?): not fused")
    vocab = weight.shape[0]
    if logits.dim() != 2 or logits.shape[1] != vocab:
        return f"cross_entropy reads logits of shape {tuple(logits.shape)}, not (rows, {vocab})"
    if any(fm.example_value(n).shape[-1] != vocab for n in m.chain):
        return "a view between the head and the loss moves the vocabulary dimension"
    if logits.shape[0] != fm.example_value(m.args["target"]).shape[0]:
        return "the target's length differs from the logits' rows"
    return None


def check_uses(m: Match) -> Optional[str]:
    """Why the logits must stay (another node or the graph's output reads them), or None."""
    for node, next_node in zip([m.head, *m.chain], [*m.chain, m.ce]):
        others = [u for u in node.users if u is not next_node]
        if any(u.op == "output" for u in others):
            return LOGITS_RETURNED
        if others:
            return f"the logits ({node.name}) are also read by {_describe(others[0])}"
    return None


# ----------------------------------------------------------------------------- replacement


def replace_site(gm: GraphModule, m: Match, cfg: Config) -> dict:
    """Put the fused op where cross_entropy was; erase the chain and the head. Returns details."""
    hidden, weight = m.head.args[:2]
    bias = m.head.args[2] if len(m.head.args) > 2 else m.head.kwargs.get("bias")
    vocab = fm.example_value(weight).shape[0]
    chunk_rows = kernel.chunk_rows_for(vocab, cfg.cross_entropy_chunk_mib * 2**20)
    args = (hidden, weight, bias, m.args["target"], m.args["ignore_index"], m.args["reduction"],
            list(m.steps), list(m.values), chunk_rows, cfg.kernels.value)
    with gm.graph.inserting_before(m.ce):
        fused = gm.graph.call_function(torch.ops.unsloth.linear_cross_entropy.default, args)
    fm.set_fake_meta(fused, m.ce)
    m.ce.replace_all_uses_with(fused)
    gm.graph.erase_node(m.ce)
    for node in reversed([m.head, *m.chain]):
        if not node.users:
            gm.graph.erase_node(node)
    rows = fm.example_value(m.args["input"]).shape[0]
    return {"vocab": vocab, "rows": rows if isinstance(rows, int) else str(rows), "chunk_rows": chunk_rows,
            "steps": list(m.steps), "reduction": m.args["reduction"],
            "weight_grad": fm.requires_grad(weight), "bias": bias is not None}


# ----------------------------------------------------------------------------- the returned-logits case


LOGITS_PATTERN = "logits_cross_entropy"
_FP32_UPCAST = [kernel.cast_step(torch.float32)]


def check_logits_site(m: Match) -> Optional[str]:
    """Why `cross_entropy(upcast(logits) through views)` cannot become the logits op, or None:
    the chain must be exactly views and one fp32 upcast of half-precision logits, keeping the
    vocabulary last and the rows in order (the op reads the logits as (rows, V))."""
    if m.steps != _FP32_UPCAST:
        return f"steps between the logits and the loss: {', '.join(m.steps) or 'none'} (only an fp32 upcast)"
    source, logits = fm.example_value(m.head), fm.example_value(m.args["input"])
    if not isinstance(source, torch.Tensor) or source.dtype not in (torch.float16, torch.bfloat16):
        return "the logits are not fp16/bf16"
    if logits.dim() != 2 or source.dim() < 1 or source.shape[-1] != logits.shape[1]:
        return f"cross_entropy reads logits of shape {tuple(logits.shape)}, not (rows, vocabulary)"
    if any(fm.example_value(n).shape[-1] != logits.shape[1] for n in m.chain):
        return "a view between the logits and the loss moves the vocabulary dimension"
    if logits.shape[0] != fm.example_value(m.args["target"]).shape[0]:
        return "the target's length differs from the logits' rows"
    return None


def replace_logits_site(gm: GraphModule, m: Match) -> dict:
    """cross_entropy(views(upcast(logits))) -> unsloth::logits_cross_entropy(logits.reshape(-1, V))."""
    vocab = fm.example_value(m.args["input"]).shape[1]
    with gm.graph.inserting_before(m.ce):
        rows = gm.graph.call_method("reshape", (m.head, -1, vocab))
        fm.set_fake_meta(rows, m.ce)
        loss = gm.graph.call_function(torch.ops.unsloth.logits_cross_entropy.default,
                                      (rows, m.args["target"], m.args["ignore_index"], m.args["reduction"], "auto"))
    fm.set_fake_meta(loss, m.ce)
    m.ce.replace_all_uses_with(loss)
    gm.graph.erase_node(m.ce)
    for node in reversed(m.chain):
        if not node.users:
            gm.graph.erase_node(node)
    return {"vocab": vocab, "dtype": str(fm.example_value(m.head).dtype).removeprefix("torch."),
            "reduction": m.args["reduction"]}


def describe_fused(details: dict) -> str:
    steps = ", ".join(details["steps"]) or "none"
    head = "trainable head (weight gradient)" if details["weight_grad"] else "frozen head (no weight gradient)"
    return (f"vocab {details['vocab']}, {details['rows']} rows in chunks of {details['chunk_rows']}, "
            f"steps: {steps}, reduction {details['reduction']}, {head}")


# ----------------------------------------------------------------------------- the pass


def fuse_linear_cross_entropy(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Rewrite every LM head + cross_entropy whose logits have no other use; report every
    cross_entropy call (fused, kept because the logits are used, or refused with the reason)."""
    cfg = cfg or Config()
    report = report if report is not None else Report()
    for node in list(gm.graph.nodes):
        m = match_cross_entropy(node)
        if m is None:
            continue
        path = fm.module_path(m.head if m.head.op != "output" else node)
        argument_problem = check_arguments(m)
        reason = argument_problem or check_head(m)
        if reason is not None:
            report.add(Site(path, PATTERN, "refused", reason))
            if argument_problem is None:  # the head is what stops the fusion: the loss alone may run
                _logits_cross_entropy(gm, m, cfg, report, path)
            continue
        reason = check_uses(m) or (None if cfg.fuse_cross_entropy else "fuse_cross_entropy=False")
        if reason is not None:
            report.add(Site(path, PATTERN, "kept", reason))
            _logits_cross_entropy(gm, m, cfg, report, path)
            continue
        details = replace_site(gm, m, cfg)
        report.add(Site(path, PATTERN, "fused", describe_fused(details), details))
    gm.graph.lint()
    gm.recompile()
    return gm


def _logits_cross_entropy(gm: GraphModule, m: Match, cfg: Config, report: Report, path: str) -> None:
    """The fallback where the fused head + loss cannot run (cross_entropy's own arguments
    allowed): the loss on the logits as they are, with option cross_entropy_on_logits."""
    if not cfg.cross_entropy_on_logits:
        return
    reason = check_logits_site(m)
    if reason is not None:
        report.add(Site(path, LOGITS_PATTERN, "refused", reason))
        return
    details = replace_logits_site(gm, m)
    report.add(Site(path, LOGITS_PATTERN, "fused",
                    f"cross-entropy on the returned {details['dtype']} logits (vocab {details['vocab']}, "
                    f"reduction {details['reduction']}): fp32 in the kernel, the rows' logsumexp saved", details))
