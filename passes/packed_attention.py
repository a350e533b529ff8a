"""Packed sequences: causal attention that never crosses a sequence boundary.

Padding-free batches (transformers' `DataCollatorWithFlattening`, TRL `padding_free=True`)
concatenate sequences into one row and pass `position_ids` that restart at 0 at each
sequence, and no `attention_mask`. transformers derives the sequences from `position_ids`
(`find_packed_sequence_indices`: a new sequence wherever the position does not step by 1) only
when no cache is in play; a decoder called with its config's default `use_cache=True` creates a
`DynamicCache` even in training, skips that detection, and passes SDPA `is_causal=True` (or a
causal mask built from positions, which `attention.py` turns into `is_causal=True`): every
token then attends to the sequences packed before it, eagerly and under compile alike.

Pattern (Dynamo graph, before `attention.py`): a graph input named `position_ids` of shape
(b, L), no graph input named `attention_mask`, and an SDPA call that is causal over the row
(`attn_mask=None, is_causal=True`, or a causal mask built from positions alone, as
`attention.is_causal_mask` recognises it), query and key length L and batch b (or b == 1).

Replacement, by the option `attention_packed`:
- "varlen" (and "auto" where the call's inputs are fp16/bf16 CUDA tensors that
  flash-attention's varlen kernels take): the call becomes
  `torch.ops.unsloth.packed_attention(q, k, v, position_ids, scale)[0]`
  (unsloth_compile/ops/packed_attention.py): every sequence its own causal problem, no work
  spent across sequences, so a packed row costs what its sequences cost alone; k and v are
  taken at their own heads (grouped heads are the kernels' own, transformers' repeat_kv is
  undone). The op reads the sequence boundaries on the host (one sync a call): such a graph
  does not run as CUDA graphs.
- "mask" (and "auto" elsewhere: CPU, fp32, attention dropout, head dim > 256): the same call
  with `is_causal=False` and the mask

    start = diff(position_ids, prepend=position_ids[:, :1] - 1) != 1
    seq   = start.cumsum(-1)                                   sequence index of each token
    mask  = (seq_q == seq_kv) & (position_kv <= position_q)    (b, 1, L, L), bool

  computed once per graph in the graph. Inside one sequence positions step by 1, so
  `position_kv <= position_q` is the causal test there; across sequences `seq` differs. A call
  that took k and v at their kv heads (`enable_gqa=True`) gets them repeated to the query heads
  (as transformers' `repeat_kv` does), because no fused CUDA kernel takes grouped heads together
  with a mask; without the repeat the call would fall to the math path. A bool mask dense along
  its last dimension keeps CUDA's fused memory-efficient kernel (bf16, no fp32 math path), and
  the graph stays free of data-dependent shapes; every query still spends work on the whole row.
Rows of unpacked position_ids (0..L-1, or any run that steps by 1) are one sequence each: both
forms compute SDPA's own causal attention there.

Check: `position_ids` is an integer tensor of two dimensions; the query is a plain tensor whose
length and batch match; the call is in the Dynamo graph itself (the bodies of checkpointed
layers do not see `position_ids`: such calls are reported, not rewritten). Every candidate call
is reported.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import Config, PackedAttention
from ..ops.packed_attention import flash_supports
from ..report import Report, Site
from . import fx_match as fm
from .attention import (PACKED_MASK, SDPA_TARGETS, erase_dead_chain, is_causal_mask, match_sdpa, repeated_heads,
                        set_sdpa_is_causal, set_sdpa_mask)
from .subgraphs import graph_modules, recompile

PATTERN = "attention"
# Dynamo names a graph input after its source: model(position_ids=...) -> L_kwargs_position_ids_
_POSITION_IDS = re.compile(r"l_(?:kwargs_)?position_ids_")
_ATTENTION_MASK = re.compile(r"l_(?:kwargs_)?attention_mask_")


# ----------------------------------------------------------------------------- pattern


def find_input(gm: GraphModule, name: re.Pattern) -> Optional[Node]:
    for node in gm.graph.find_nodes(op="placeholder"):
        if name.fullmatch(node.name.lower()):
            return node
    return None


def _flag(node: Node, name: str, position: int):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else None)


def match_causal_sdpa(node: Node) -> bool:
    """An SDPA call that is causal over its row: no mask and is_causal=True, or a causal mask
    built from positions alone (what attention.py turns into is_causal=True; matched here too
    so that the option `attention=False` leaves no packed row attending across sequences)."""
    if node.op != "call_function" or node.target not in SDPA_TARGETS or len(node.args) < 3:
        return False
    mask = match_sdpa(node)
    if mask is None:
        return _flag(node, "is_causal", 5) is True
    return is_causal_mask(node, mask)


# ----------------------------------------------------------------------------- check


def _known_equal(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def check_site(node: Node, position_ids: Node) -> Optional[str]:
    """None when the call can take the packed mask, else why not."""
    positions = fm.example_value(position_ids)
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point():
        return "position_ids is not a 2-D integer tensor"
    q, k = fm.example_value(node.args[0]), fm.example_value(node.args[1])
    if not isinstance(q, torch.Tensor) or q.is_nested or q.dim() != 4:
        return "query is not a plain 4-D tensor"
    b, length = positions.shape
    if not (_known_equal(q.shape[-2], length) and _known_equal(k.shape[-2], length)):
        return "query or key length differs from position_ids' (not self-attention over the packed row)"
    if not (_known_equal(b, 1) or _known_equal(b, q.shape[0])):
        return "position_ids' batch differs from the query's"
    return None


# ----------------------------------------------------------------------------- replacement


def _add(gm: GraphModule, like: Node, op: str, target, *args, **kwargs) -> Node:
    node = gm.graph.call_method(target, args, kwargs) if op == "call_method" \
        else gm.graph.call_function(target, args, kwargs)
    fm.set_fake_meta(node, like)
    return node


def build_packed_mask(gm: GraphModule, position_ids: Node, like: Node) -> Node:
    """(b, 1, L, L) bool: same sequence and key position <= query position."""
    f, m = "call_function", "call_method"
    first = _add(gm, like, f, operator.getitem, position_ids, (slice(None), slice(None, 1)))
    before_first = _add(gm, like, f, operator.sub, first, 1)
    step = _add(gm, like, f, torch.diff, position_ids, dim=-1, prepend=before_first)
    start = _add(gm, like, f, operator.ne, step, 1)
    sequence = _add(gm, like, m, "cumsum", start, -1)
    seq_q = _add(gm, like, f, operator.getitem, sequence, (slice(None), None, slice(None), None))
    seq_kv = _add(gm, like, f, operator.getitem, sequence, (slice(None), None, None, slice(None)))
    pos_q = _add(gm, like, f, operator.getitem, position_ids, (slice(None), None, slice(None), None))
    pos_kv = _add(gm, like, f, operator.getitem, position_ids, (slice(None), None, None, slice(None)))
    same = _add(gm, like, f, operator.eq, seq_q, seq_kv)
    causal = _add(gm, like, f, operator.le, pos_kv, pos_q)
    mask = _add(gm, like, f, operator.and_, same, causal)
    mask.meta[PACKED_MASK] = True
    return mask


def _repeat_heads(gm: GraphModule, x: Node, groups: int, like: Node) -> Node:
    """transformers' repeat_kv: head j of the result is head j // groups of x."""
    f, m = "call_function", "call_method"
    wide = _add(gm, like, f, operator.getitem, x, (slice(None), slice(None), None, slice(None), slice(None)))
    copies = _add(gm, like, m, "expand", wide, -1, -1, groups, -1, -1)  # -1: sizes stay (symbolic or not)
    return _add(gm, like, m, "flatten", copies, 1, 2)


def varlen_or_reason(node: Node, cfg: Config) -> tuple[bool, str]:
    """(the call becomes torch.ops.unsloth.packed_attention, why not)."""
    if cfg.attention_packed is PackedAttention.MASK:
        return False, "attention_packed='mask'"
    dropout = _flag(node, "dropout_p", 4) or 0.0
    if not isinstance(dropout, (int, float)) or dropout:
        return False, "attention dropout (the varlen op takes none)"
    scale = _flag(node, "scale", 6)
    if scale is not None and not isinstance(scale, (int, float)):
        return False, "a scale that is not a constant"
    if cfg.attention_packed is PackedAttention.VARLEN:
        return True, ""
    q, k = fm.example_value(node.args[0]), fm.example_value(node.args[1])
    return flash_supports(q, k)


def _unrepeated(value: Node) -> Node:
    """k or v before transformers' repeat_kv (the op takes grouped heads itself)."""
    repeated = repeated_heads(value)
    return repeated[0] if repeated is not None else value


def replace_site_varlen(gm: GraphModule, node: Node, position_ids: Node) -> str:
    q = fm.example_value(node.args[0])
    scale = _flag(node, "scale", 6)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    key, value = _unrepeated(node.args[1]), _unrepeated(node.args[2])
    replaced_mask = match_sdpa(node)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(torch.ops.unsloth.packed_attention.default,
                                      (node.args[0], key, value, position_ids, scale))
        out = gm.graph.call_function(operator.getitem, (call, 0))
    fm.set_fake_meta(call, node)
    fm.set_fake_meta(out, node)
    repeated = [node.args[1], node.args[2]]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    for dead in [*repeated, replaced_mask]:
        if isinstance(dead, Node) and not dead.users:
            erase_dead_chain(gm, dead)
    heads = fm.example_value(key).shape[1]
    return (f"packed sequences: torch.ops.unsloth.packed_attention (varlen kernels, k and v at their "
            f"{heads} heads)")


def replace_site(gm: GraphModule, node: Node, mask: Node) -> str:
    with gm.graph.inserting_before(node):
        if node.kwargs.get("enable_gqa", False):
            q, k = fm.example_value(node.args[0]), fm.example_value(node.args[1])
            groups = q.shape[1] // k.shape[1]
            if groups > 1:
                node.update_arg(1, _repeat_heads(gm, node.args[1], groups, node))
                node.update_arg(2, _repeat_heads(gm, node.args[2], groups, node))
            node.update_kwarg("enable_gqa", False)
    replaced = match_sdpa(node)
    set_sdpa_mask(node, mask)
    if replaced is not None and not replaced.users:
        erase_dead_chain(gm, replaced)
    set_sdpa_is_causal(node, False)
    return "packed sequences: causal within each sequence of position_ids (block-diagonal mask)"


# ----------------------------------------------------------------------------- the pass


def mask_packed_sequences(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Give every causal SDPA call of a graph fed packed `position_ids` (and no
    `attention_mask`) the block-diagonal causal mask; report each candidate."""
    report = report if report is not None else Report()
    cfg = cfg if cfg is not None else Config()
    position_ids = find_input(gm, _POSITION_IDS)
    if position_ids is None or find_input(gm, _ATTENTION_MASK) is not None:
        return gm  # nothing packed to honour: the calls are the ones eager makes
    modules = graph_modules(gm)
    mask = None
    for module in modules:
        for node in list(module.graph.nodes):
            if not match_causal_sdpa(node):
                continue
            path = fm.module_path(node)
            if module is not gm:
                report.add(Site(path, PATTERN, "refused", "causal attention inside a checkpointed body that "
                                "position_ids does not reach: packed sequences would attend across boundaries"))
                continue
            reason = check_site(node, position_ids)
            if reason is not None:
                report.add(Site(path, PATTERN, "kept", reason))
                continue
            varlen, why_not = varlen_or_reason(node, cfg)
            if varlen:
                report.add(Site(path, PATTERN, "rewritten", replace_site_varlen(gm, node, position_ids)))
                report.counters["attention.packed_varlen"] += 1
            else:
                if mask is None:
                    with gm.graph.inserting_before(node):
                        mask = build_packed_mask(gm, position_ids, node)
                description = replace_site(gm, node, mask)
                report.add(Site(path, PATTERN, "rewritten", f"{description}; not the varlen op: {why_not}"))
            report.counters["attention.packed"] += 1
    recompile(modules)
    return gm
