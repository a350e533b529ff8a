"""Attention: keep `scaled_dot_product_attention` on a fused kernel under compile.

Pattern (Dynamo graph): `torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=mask, ...)`
with a boolean or additive mask that eager never passes to the kernel in that form:

1. **An all-True boolean mask** (`new_ones(..., dtype=bool)` / `torch.ones(..., dtype=bool)`,
   through views, expands, device moves and `&` with other all-True masks). Under tracing,
   transformers cannot look at the padding mask's values, so it builds such a mask where eager
   passes none (`_ignore_*_mask_sdpa` returns False when tracing). Masking nothing, it is
   dropped: the call is the one eager makes, and keeps the kernel eager gets. The same for a
   mask that tests positions against 0 (`arange(n)[...] >= 0`, transformers' bidirectional mask
   without a padding mask: true at every size) and for any mask built from positions alone that
   evaluates, once at compile time, to all True (or all 0, additive).
2. **A mask broadcast along its last dimension** (stride 0 there, an `expand` of a (.., 1)
   tensor). Every fused CUDA kernel requires the mask's last dimension to have stride 1 and
   refuses it (`sdp_utils.cpp`: "All fused kernels require the last dimension of the input to
   have stride 1 ... Attn_mask.stride(-1): 0"), so SDPA falls back to the math decomposition,
   which runs in fp32 for bf16 inputs (`_safe_softmax` and fp32 SIMT GEMMs: docs/bench/design-choices.md#attention).
   The mask is made dense along
   its last dimension and kept at size 1 along every other broadcast dimension (`narrow(d, 0, 1)`,
   values unchanged: a stride-0 dimension repeats one slice), then `contiguous()`.

3. **A causal mask built from positions alone** (`kv_idx <= q_idx` from `arange`s, expanded to
   the batch): transformers builds it under tracing where eager passes none and `is_causal=True`
   (transformers 5.17 with torch < 2.14, where Dynamo answers `torch.compiler.is_exporting()`
   with True). With a mask, cuDNN's flash backward runs several times slower per call than
   with `is_causal=True` (docs/bench/design-choices.md#attention). The mask's producers read no
   graph input (no placeholder, no module state: only allow-listed pure ops on constants), so
   its value is the same at every call: it is evaluated once at compile time, and when it is
   exactly `ones(L, S).tril()` (SDPA's own `is_causal` mask) in every batch and head, the call
   becomes `attn_mask=None, is_causal=True`. A padding mask (from an input) is never evaluated.
   With symbolic sequence lengths (a dynamic graph) there is no value to evaluate: the mask is
   rewritten only when its graph is transformers' `(arange(S) + c)[..., None, :] <=
   (arange(L) + c)[..., :, None]` with S and L provably the key and query lengths, equal, and
   the same constant offset: causal at every size.

4. **k and v repeated to the query heads** (option `attention_gqa`): transformers' `repeat_kv`,
   `x[:, :, None, :, :].expand(b, h_kv, n, s, d).reshape(b, h_kv * n, s, d)`, feeding an SDPA
   call without a mask (after the rewrites above). Under tracing transformers repeats where
   eager passes `enable_gqa=True` (it decides on the mask it built, case 3). The call takes k
   and v at their own heads with `enable_gqa=True`, which repeats them the same way (query
   head j reads kv head j // n): the same values, no repeat kernels, and backward keeps the
   k and v of the kv heads, not n copies.

5. **A kernel preference** (option `attention_kernel`, not "auto"): every SDPA call becomes
   the same call inside `torch.nn.attention.sdpa_kernel([preferred, *the rest], set_priority=True)`
   (`prefer_flash` and the like below), so that AOTAutograd, which picks the kernel when it
   traces, picks the preferred one where it can run the inputs and torch's next choice where it
   cannot. For a measured case where torch's choice is slower in the compiled step.

Replacement: the same SDPA call with `attn_mask=None` (and `is_causal=True` for 3), or with the
densified mask, or (4) with the unrepeated k and v and `enable_gqa=True`. Values are
the same function of the inputs (an all-True mask masks nothing; a densified mask holds the
same values); on CUDA the kernel that runs then is the one eager's dispatcher picks.

Check: the mask is a tensor in the graph (not an input whose values are unknown when it is
not all-True and not broadcast), nested tensors are not handled. Every SDPA call with a mask
is reported: rewritten, or kept with the reason (a call without a mask has nothing to decide).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..config import Config
from ..report import Report, Site
from . import fx_match as fm
from .subgraphs import graph_modules, operand_source, recompile

PATTERN = "attention"
SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
# (prefer_* below join SDPA_TARGETS once defined: a rewritten call is still an SDPA call)
# Ops that keep "every element is True" true: views, broadcasts, copies, moves, bool casts.
_SHAPE_METHODS = {"expand", "expand_as", "view", "reshape", "unsqueeze", "contiguous", "clone", "to", "bool",
                  "repeat", "permute", "transpose", "flatten", "squeeze", "__getitem__"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.broadcast_to, operator.getitem, torch.permute,
                    torch.transpose, torch.squeeze, torch.flatten}
_AND_TARGETS = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and"}


# ----------------------------------------------------------------------------- pattern


def match_sdpa(node: Node) -> Optional[Node]:
    """The attn_mask argument node of an SDPA call, or None (not SDPA, or no mask tensor)."""
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    return mask if isinstance(mask, Node) else None


def is_all_true(node, depth: int = 0) -> bool:
    """Whether a boolean tensor node is True everywhere by construction."""
    if depth > 32 or not isinstance(node, Node):
        return node is True
    value = fm.example_value(node)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        return False
    if node.op == "call_method" and node.target in ("new_ones",):
        return True
    if node.op == "call_function" and node.target is torch.ones:
        return True
    if node.op == "call_function" and node.target is torch.full or node.op == "call_method" and node.target == "new_full":
        fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        return fill is True or fill == 1
    if node.op == "call_method" and node.target in _AND_METHODS or node.op == "call_function" and node.target in _AND_TARGETS:
        return all(is_all_true(a, depth + 1) for a in node.args[:2])
    if node.op == "call_method" and node.target in _SHAPE_METHODS or \
            node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return is_all_true(node.args[0], depth + 1)
    return is_nonnegative_position_test(node) or is_one_sequence_test(node)


# Calls that keep a tensor's values and their layout where they keep its dtype (stripped when
# following a mask's producers; a `.to(float)` of a bool mask is another mask and is not stripped)
_VALUE_KEEPING_METHODS = {"expand", "to", "bool", "contiguous", "clone"}


def _strip_value_keeping(node):
    while isinstance(node, Node) and node.op == "call_method" and node.target in _VALUE_KEEPING_METHODS:
        value, source = fm.example_value(node), fm.example_value(node.args[0])
        if not (isinstance(value, torch.Tensor) and isinstance(source, torch.Tensor) and value.dtype == source.dtype):
            break
        node = node.args[0]
    return node


def _is_call(node, functions: tuple, method: str) -> bool:
    return isinstance(node, Node) and (node.op == "call_function" and node.target in functions
                                       or node.op == "call_method" and node.target == method)


def is_consecutive_positions(node) -> bool:
    """Whether the node is `arange(...)` with step 1 along its last axis, plus a uniform offset,
    with axes added or broadcast in front (`cache_position.unsqueeze(0).expand(b, -1)`): every
    position one more than the one before it, at every size."""
    return consecutive_positions_start(node, uniform_offset_ok=True) is not None


def consecutive_positions_start(node, uniform_offset_ok: bool = False):
    """The first position of consecutive positions (is_consecutive_positions) as an int, where
    every offset is an int (`arange(n)`, `arange(start, end)`, `+ c`); with `uniform_offset_ok`,
    True for positions whose offset is uniform but not an int (a symbolic start). None when the
    node is not such positions."""
    start, symbolic = 0, False
    for _ in range(16):
        node = _strip_value_keeping(node)
        if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
            return None
        if node.op == "call_method" and node.target == "unsqueeze":
            if node.args[1] != 0:
                return None
            node = node.args[0]
        elif _is_call(node, (operator.add, torch.add, operator.sub, torch.sub), "add") and len(node.args) == 2:
            first_is_tensor = isinstance(node.args[0], Node) and isinstance(fm.example_value(node.args[0]),
                                                                            torch.Tensor)
            tensor, offset = node.args if first_is_tensor else node.args[::-1]
            if isinstance(offset, Node) and isinstance(fm.example_value(offset), torch.Tensor):
                return None  # a tensor offset may differ per position
            subtract = _is_call(node, (operator.sub, torch.sub), "sub")
            if subtract and not first_is_tensor:
                return None  # c - positions counts down
            if isinstance(offset, int) and not isinstance(offset, bool):
                start += -offset if subtract else offset
            else:
                symbolic = True
            node = tensor
        elif node.op == "call_function" and node.target is torch.arange:
            step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
            if len(node.args) > 3 or step != 1:
                return None
            first = node.args[0] if len(node.args) > 1 else node.kwargs.get("start", 0)
            if not (isinstance(first, int) and not isinstance(first, bool)):
                symbolic = True
            if symbolic:
                return True if uniform_offset_ok else None
            return start + first
        else:
            return None
    return None


def is_one_sequence_test(node: Node) -> bool:
    """Whether the node is transformers' packed-sequence test (`find_packed_sequence_indices`,
    built when no cache is in play: `s[b, q] == s[b, kv]` with `s = cumsum(diff(positions) != 1)`)
    on consecutive positions (is_consecutive_positions): every position follows the one before it,
    so `s` is the same everywhere in a row and the test is True at every element and every size."""
    if not _is_call(node, (operator.eq, torch.eq), "eq") or len(node.args) != 2:
        return False
    sides = []
    for side in node.args:
        if not (isinstance(side, Node) and side.op == "call_function" and side.target is operator.getitem):
            return False
        sides.append(side.args[0])
    counts = sides[0]
    if sides[1] is not counts or not _is_call(counts, (torch.cumsum,), "cumsum") or not counts.args:
        return False
    dim = counts.args[1] if len(counts.args) > 1 else counts.kwargs.get("dim")
    steps = counts.args[0]
    if dim != -1 or not _is_call(steps, (operator.ne, torch.ne), "ne") or len(steps.args) != 2 or steps.args[1] != 1:
        return False
    diff = steps.args[0]
    if not (isinstance(diff, Node) and diff.op == "call_function" and diff.target is torch.diff and diff.args):
        return False
    if diff.kwargs.get("dim", diff.args[2] if len(diff.args) > 2 else -1) != -1 or \
            diff.kwargs.get("n", diff.args[1] if len(diff.args) > 1 else 1) != 1:
        return False
    # the prepended first value only shifts the whole row's count: the test holds whatever it is
    return is_consecutive_positions(diff.args[0])


def is_nonnegative_position_test(node: Node) -> bool:
    """Whether the node is `(arange(n) + c)[index] >= k` (or `k <= ...`, `> k - 1`) with int
    c >= 0 >= k: True at every position and every size. transformers' bidirectional mask without
    a padding mask is this test (`q_idx >= 0`) when it does not skip the mask under tracing."""
    if node.op != "call_function" or len(node.args) != 2:
        return False
    if node.target in (operator.ge, torch.ge, operator.gt, torch.gt):
        positions, bound = node.args
    elif node.target in (operator.le, torch.le, operator.lt, torch.lt):
        bound, positions = node.args
    else:
        return False
    if not isinstance(bound, int) or isinstance(bound, bool):
        return False
    strict = node.target in (operator.gt, torch.gt, operator.lt, torch.lt)
    index = _position_index(positions)
    return (index is not None and isinstance(index[2], int) and index[2] >= 0
            and (bound < 0 if strict else bound <= 0))


# Pure, deterministic ops a position-only mask is built from (transformers' sdpa_mask and friends).
_CONSTANT_MASK_FUNCTIONS = {torch.arange, torch.ones, torch.zeros, torch.full, torch.tril, torch.triu, torch.where,
                            torch.ones_like, torch.zeros_like, torch.logical_and, torch.logical_or, torch.logical_not,
                            torch.broadcast_to, torch.reshape, torch.unsqueeze, torch.eq, torch.ne, torch.le, torch.lt,
                            torch.ge, torch.gt, torch.add, torch.sub, operator.add, operator.sub, operator.le,
                            operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_,
                            operator.or_, operator.invert, operator.neg, operator.getitem,
                            # transformers' packed-sequence test on position_ids, built without a cache
                            torch.diff, torch.cumsum}
_CONSTANT_MASK_METHODS = _SHAPE_METHODS | _AND_METHODS | {"__or__", "__invert__", "logical_not", "logical_or", "le",
                                                          "lt", "ge", "gt", "eq", "ne", "add", "sub", "masked_fill",
                                                          "tril", "triu", "new_ones", "new_zeros", "new_full",
                                                          "cumsum", "diff"}
_CONSTANT_MASK_MAX_NODES = 128


def _constant_args(args) -> bool:
    """Whether the non-node arguments are plain constants (no SymInt: a dynamic size reads an input)."""
    leaves = []
    torch.fx.node.map_aggregate(args, lambda a: leaves.append(a) or a)
    return all(isinstance(a, (Node, bool, int, float, str, slice, type(None), type(Ellipsis), torch.device,
                              torch.dtype)) for a in leaves)


def constant_mask_value(mask: Node) -> Optional[torch.Tensor]:
    """The mask's value when its producers read no graph input (only allow-listed pure ops on
    constants), evaluated now on real tensors; None otherwise."""
    order: list[Node] = []
    seen: set[Node] = set()

    def visit(node: Node) -> bool:
        if node in seen:
            return True
        seen.add(node)
        pure = node.op == "call_function" and node.target in _CONSTANT_MASK_FUNCTIONS or \
            node.op == "call_method" and node.target in _CONSTANT_MASK_METHODS
        if not pure or len(seen) > _CONSTANT_MASK_MAX_NODES or not _constant_args((node.args, node.kwargs)):
            return False
        if not all(visit(n) for n in node.all_input_nodes):
            return False
        order.append(node)
        return True

    if not visit(mask):
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    values: dict[Node, object] = {}
    with unset_fake_temporarily(), torch.no_grad():
        for node in order:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" \
                else node.target(*args, **kwargs)
    value = values[mask]
    return value if isinstance(value, torch.Tensor) else None


def _split_offset(node) -> tuple[object, object]:
    """(x, c) for `x + c` or `c + x` with c a constant int or a placeholder (a symbolic
    offset); (node, 0) otherwise."""
    if fm.is_add(node):
        for x, c in (node.args, node.args[::-1]):
            if isinstance(x, Node) and (isinstance(c, int) or isinstance(c, Node) and c.op == "placeholder"):
                return x, c
    return node, 0


def _position_index(node) -> Optional[tuple[int, object, object]]:
    """(axis counted from the end, length, offset) of `(arange(length) + offset)[index]` (the
    offset added before or after indexing) whose index puts the positions on one axis and None
    (a new size-1 axis) everywhere else."""
    node, outer = _split_offset(node)
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    base, index = node.args
    looked_up = _looked_up_position(base, index)
    if looked_up is not None:  # positions[batch, idx] with positions[b, j] = j + start
        axis, length, offset = looked_up
        if not isinstance(outer, int):
            return None
        return axis, length, offset + outer
    if not isinstance(index, tuple) or sum(isinstance(e, slice) for e in index) != 1:
        return None
    if any(not (e is None or e == slice(None)) for e in index):
        return None
    axis = next(i for i, e in enumerate(index) if isinstance(e, slice)) - len(index)
    base, inner = _split_offset(base)
    if not (isinstance(base, Node) and base.op == "call_function" and base.target is torch.arange
            and len(base.args) == 1 and set(base.kwargs) <= {"device", "dtype"}):
        return None
    offsets = [c for c in (outer, inner) if not (isinstance(c, int) and c == 0)]
    if len(offsets) > 1 and not all(isinstance(c, int) for c in offsets):
        return None  # a symbolic offset plus another: not compared
    offset = sum(offsets) if all(isinstance(c, int) for c in offsets) else offsets[0]
    return axis, base.args[0], offset


def _looked_up_position(positions, index) -> Optional[tuple[int, object, int]]:
    """(axis, length, offset) of `positions[batch_index, idx]` where `positions` holds the same
    consecutive positions `j + start` (int start) in every row (consecutive_positions_start)
    and `idx` is a position index (_position_index) with an int offset: the value is
    `idx + start`. transformers' mask functions index position_ids so (`position_ids[b, kv_idx]`)."""
    if not (isinstance(index, tuple) and len(index) == 2 and all(isinstance(e, Node) for e in index)):
        return None
    start = consecutive_positions_start(positions)
    if start is None or start is True:
        return None
    value = fm.example_value(positions)
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    inner = _position_index(index[1])
    if inner is None or not isinstance(inner[2], int):
        return None
    return inner[0], inner[1], inner[2] + start


def _same_length(node_or_int, size) -> bool:
    """Whether an arange's length (a SymInt placeholder node or an int) is `size` (an int or
    SymInt of the query or key), without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    length = fm.example_value(node_or_int) if isinstance(node_or_int, Node) else node_or_int
    return length is not None and statically_known_true(length == size)


def _and_terms(mask, depth: int = 0) -> list:
    """The terms of a conjunction of masks (`a & b & ...`, through value-keeping calls)."""
    mask = _strip_value_keeping(mask)
    if depth < 16 and isinstance(mask, Node) and (
            mask.op == "call_method" and mask.target in _AND_METHODS or
            mask.op == "call_function" and mask.target in _AND_TARGETS):
        return [t for a in mask.args[:2] for t in _and_terms(a, depth + 1)]
    return [mask]


def is_structurally_causal(node: Node, mask: Node) -> bool:
    """Whether the mask is `(arange(S) + c)[..., None, :] <= (arange(L) + c)[..., :, None]`
    (through expands), with S = L the key and query lengths and the same constant offset c, and
    with any other terms of a conjunction True everywhere by construction (is_all_true: a ones
    tensor, transformers' packed-sequence test on consecutive positions): true for every size,
    so a graph with symbolic sequence lengths (where the mask cannot be evaluated once) is
    rewritten on this proof alone."""
    terms = _and_terms(mask)
    causal = [t for t in terms if _is_causal_comparison(node, t)]
    return bool(causal) and all(t in causal or is_all_true(t) for t in terms)


def _is_causal_comparison(node: Node, mask: Node) -> bool:
    while isinstance(mask, Node) and mask.op == "call_method" and mask.target == "expand":
        mask = mask.args[0]
    if not isinstance(mask, Node) or mask.op != "call_function":
        return False
    if mask.target in (operator.le, torch.le):
        kv, q = mask.args[:2]
    elif mask.target in (operator.ge, torch.ge):
        q, kv = mask.args[:2]
    else:
        return False
    kv_index, q_index = _position_index(kv), _position_index(q)
    if kv_index is None or q_index is None or kv_index[0] != -1 or q_index[0] != -2:
        return False
    if kv_index[2] is not q_index[2] and not (isinstance(kv_index[2], int) and kv_index[2] == q_index[2]):
        return False  # offsets: the same int, or the same symbolic placeholder
    query, key = fm.example_value(node.args[0]), fm.example_value(node.args[1])
    return (_same_length(kv_index[1], key.shape[-2]) and _same_length(q_index[1], query.shape[-2])
            and _same_length(q_index[1], key.shape[-2]))


def is_causal_mask(node: Node, mask: Node) -> bool:
    """Whether the mask is, in every batch and head, SDPA's own is_causal mask ones(L, S).tril()
    (bool: True there; additive: 0 there and -inf or the dtype's lowest value elsewhere)."""
    if len(node.args) < 2:
        return False  # query and key given by keyword: not a call transformers makes
    q, k = fm.example_value(node.args[0]), fm.example_value(node.args[1])
    value = fm.example_value(mask)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    if node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False) is not False:
        return False  # SDPA refuses a mask with is_causal=True; a symbolic flag is left alone
    if not all(isinstance(d, int) for d in (*value.shape, q.shape[-2], k.shape[-2])):
        return is_structurally_causal(node, mask)  # symbolic sizes: no value to evaluate
    if tuple(value.shape[-2:]) != (q.shape[-2], k.shape[-2]):
        return False
    actual = constant_mask_value(mask)
    if actual is None:
        return False
    for dim in range(actual.dim() - 2):  # a broadcast (expanded) dimension repeats one slice: check it once
        if actual.stride(dim) == 0:
            actual = actual.narrow(dim, 0, 1)
    causal = torch.ones(actual.shape[-2:], dtype=torch.bool, device=actual.device).tril()
    if actual.dtype == torch.bool:
        return bool((actual == causal).all())
    if not actual.is_floating_point():
        return False
    blocked = (actual == float("-inf")) | (actual <= torch.finfo(actual.dtype).min)
    return bool(((actual == 0) | blocked).all() and ((actual == 0) == causal).all())


def masks_nothing(mask: Node) -> bool:
    """Whether a mask built from positions alone (no graph input, concrete sizes) masks no
    element: True everywhere (bool) or 0 everywhere (additive), evaluated once at compile time."""
    value = fm.example_value(mask)
    if not isinstance(value, torch.Tensor) or not all(isinstance(d, int) for d in value.shape):
        return False
    actual = constant_mask_value(mask)
    if actual is None:
        return False
    return bool(actual.all()) if actual.dtype == torch.bool else bool(actual.is_floating_point() and (actual == 0).all())


def broadcast_last_dim(mask: Node) -> bool:
    value = fm.example_value(mask)
    return (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[-1] != 1
            and value.stride(-1) == 0)


# ----------------------------------------------------------------------------- check


# What a rewritable mask is, as check_site finds it: the counter suffix of each kind.
DROPPED, CAUSAL, DENSIFIED = "dropped", "causal", "densified"
# meta flag of the block-diagonal mask packed_attention.py builds (reported there, left here)
PACKED_MASK = "unsloth_packed_mask"


def check_site(node: Node, mask: Node, source: Optional[Node] = None) -> tuple[Optional[str], Optional[str]]:
    """(kind, None) when the mask can be rewritten (DROPPED: all-True, CAUSAL: a position-only
    causal mask, DENSIFIED: broadcast along its last dimension), else (None, why the call is
    kept as it is). Decided once: a causal mask is evaluated here, not again by replace_site.
    `source`: where the mask is computed, when that is outside the graph holding the call (the
    mask an activation-checkpoint body receives as an operand, subgraphs.operand_source)."""
    q = fm.example_value(node.args[0])
    if not isinstance(q, torch.Tensor) or q.is_nested:
        return None, "query is not a plain tensor"
    value = fm.example_value(mask)
    if not isinstance(value, torch.Tensor):
        return None, "mask has no example value"
    source = mask if source is None else source
    if value.dtype == torch.bool and is_all_true(source) or masks_nothing(source):
        return DROPPED, None
    if is_causal_mask(node, source):
        return CAUSAL, None
    if broadcast_last_dim(mask):
        return DENSIFIED, None
    if value.dtype != torch.bool and value.dtype != q.dtype:
        return None, f"additive mask in {value.dtype} for {q.dtype} inputs (fused kernels take bool or the query dtype)"
    return None, "mask is dense along its last dimension: the fused kernels take it as it is"


# ----------------------------------------------------------------------------- replacement


def _set_meta(node: Node, like: Node) -> None:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fm.example_value)
    fake_modes = [v.fake_mode for v in map(fm.example_value, node.all_input_nodes) if hasattr(v, "fake_mode")]
    with fake_modes[0] if fake_modes else contextlib.nullcontext():
        value = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" \
            else node.target(*args, **kwargs)
    node.meta["example_value"] = value
    node.meta["val"] = value
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]


def set_sdpa_mask(node: Node, mask: Optional[Node]) -> None:
    """An SDPA call's attn_mask, positional (argument 3) or keyword, whichever the call uses."""
    if len(node.args) > 3:
        node.update_arg(3, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def set_sdpa_is_causal(node: Node, causal: bool) -> None:
    """An SDPA call's is_causal, positional (argument 5) or keyword, whichever the call uses."""
    if len(node.args) > 5:
        node.update_arg(5, causal)
    else:
        node.update_kwarg("is_causal", causal)


def replace_site(gm: GraphModule, node: Node, mask: Node, kind: str) -> str:
    """Rewrite the call's mask as check_site's `kind` says; returns what was done."""
    if kind == DROPPED:
        set_sdpa_mask(node, None)
        return "all-True mask dropped"
    if kind == CAUSAL:
        set_sdpa_mask(node, None)
        set_sdpa_is_causal(node, True)
        return "causal mask built from positions replaced by is_causal=True"
    value = fm.example_value(mask)
    dense = mask
    with gm.graph.inserting_before(node):
        for dim in range(value.dim() - 1):
            if value.stride(dim) == 0 and value.shape[dim] != 1:
                dense = gm.graph.call_method("narrow", (dense, dim, 0, 1))
                _set_meta(dense, node)
        dense = gm.graph.call_method("contiguous", (dense,))
        _set_meta(dense, node)
    set_sdpa_mask(node, dense)
    return f"mask broadcast along its last dimension made dense ({tuple(fm.example_value(dense).shape)})"


# ----------------------------------------------------------------------------- grouped-query attention


def repeated_heads(node) -> Optional[tuple[Node, int]]:
    """(x, n) when `node` is transformers' repeat_kv of x: `x[:, :, None, :, :]` expanded to n
    copies along the new axis and reshaped to n * h_kv heads (copies of a head adjacent, as
    SDPA's enable_gqa repeats); checked on the example values' shapes, n > 1."""
    if not (isinstance(node, Node) and (node.op == "call_method" and node.target in ("reshape", "view")
                                        or node.op == "call_function" and node.target is torch.reshape)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    unsqueezed = expand.args[0]
    if not (isinstance(unsqueezed, Node) and unsqueezed.op == "call_function" and unsqueezed.target is operator.getitem):
        return None
    source, index = unsqueezed.args
    if not isinstance(index, tuple) or [e is None for e in index][:3] != [False, False, True] or \
            any(e is not None and e != slice(None) and e is not Ellipsis for e in index) or index.count(None) != 1:
        return None
    values = [fm.example_value(n) for n in (source, unsqueezed, expand, node)]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    x, u, e, r = (tuple(v.shape) for v in values)
    if len(x) != 4 or u != (x[0], x[1], 1, x[2], x[3]):
        return None
    n = e[2] if len(e) == 5 else 0
    if n < 2 or e != (x[0], x[1], n, x[2], x[3]) or r != (x[0], x[1] * n, x[2], x[3]):
        return None
    return source, n


def check_gqa(node: Node) -> tuple[Optional[tuple[Node, Node]], Optional[str]]:
    """((k, v) unrepeated, None) when the call can take them with enable_gqa=True; (None, why
    not) when k and v are repeated but the call cannot; (None, None) when they are not repeated."""
    if len(node.args) < 3:
        return None, None
    key, value = repeated_heads(node.args[1]), repeated_heads(node.args[2])
    if key is None and value is None:
        return None, None
    if key is None or value is None or key[1] != value[1]:
        return None, "k and v are not both repeated by the same factor"
    if match_sdpa(node) is not None:
        return None, "k and v repeated for a call with a mask (the GQA kernels take none)"
    if node.kwargs.get("enable_gqa", False):
        return None, "enable_gqa is already set"
    q = fm.example_value(node.args[0])
    if isinstance(q, torch.Tensor) and q.device.type == "cuda" and (
            q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256):
        # torch 2.11: the efficient kernel refuses grouped heads, so outside flash's and cuDNN's
        # range enable_gqa would fall to the math path, slower than repeating
        return None, (f"k and v kept repeated: {q.dtype} with head_dim {q.shape[-1]} is outside the GQA kernels' "
                      "range (fp16/bf16, head_dim <= 256)")
    return (key[0], value[0]), None


def replace_gqa(gm: GraphModule, node: Node, key: Node, value: Node) -> str:
    repeated = [node.args[1], node.args[2]]
    groups = fm.example_value(repeated[0]).shape[1] // fm.example_value(key).shape[1]
    node.update_arg(1, key)
    node.update_arg(2, value)
    node.update_kwarg("enable_gqa", True)
    for r in repeated:
        erase_dead_chain(gm, r)
    return (f"k and v repeated {groups}x to the query heads taken at their "
            f"{fm.example_value(key).shape[1]} heads with enable_gqa=True")


# ----------------------------------------------------------------------------- kernel preference


def _preferring(first: str):
    """SDPA under a backend priority list that starts with `first` (an SDPBackend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, name) for name in
             dict.fromkeys([first, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"])]

    def sdpa(*args, **kwargs):
        with sdpa_kernel(order, set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    sdpa.__name__ = sdpa.__qualname__ = f"prefer_{first.split('_')[0].lower()}"
    sdpa.__module__ = __name__
    return sdpa


# Module-level, so that a graph calling them pickles by name (Inductor's caches).
prefer_flash = _preferring("FLASH_ATTENTION")
prefer_efficient = _preferring("EFFICIENT_ATTENTION")
prefer_cudnn = _preferring("CUDNN_ATTENTION")
PREFERRED = {"flash": prefer_flash, "efficient": prefer_efficient, "cudnn": prefer_cudnn}
SDPA_TARGETS |= set(PREFERRED.values())


# ----------------------------------------------------------------------------- the pass


def keep_attention_fused(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Rewrite SDPA masks that would push a compiled attention off the fused kernels; report
    every SDPA call. Usable on its own on a Dynamo graph, like `fuse_lora_linears`."""
    report = report if report is not None else Report()
    modules = graph_modules(gm)
    for module in modules:
        for node in list(module.graph.nodes):
            if node.op != "call_function" or node.target not in SDPA_TARGETS:
                continue
            path = fm.module_path(node)
            kernel = cfg.attention_kernel.value if cfg is not None else "auto"
            if kernel != "auto":
                node.target = PREFERRED[kernel]
                report.add(Site(path, PATTERN, "rewritten", f"{kernel} kernel tried first (attention_kernel)"))
                report.counters[f"attention.prefer_{kernel}"] += 1
            mask = match_sdpa(node)
            if mask is not None and mask.meta.get(PACKED_MASK):
                pass  # packed sequences' mask: packed_attention.py decided and reported it
            elif mask is not None:  # no mask: the call is the one eager makes, nothing to decide
                kind, reason = check_site(node, mask, operand_source(gm, module, mask))
                if reason is not None:
                    report.add(Site(path, PATTERN, "kept", reason))
                else:
                    report.add(Site(path, PATTERN, "rewritten", replace_site(module, node, mask, kind)))
                    report.counters[f"attention.mask_{kind}"] += 1
                    if not mask.users:
                        erase_dead_chain(module, mask)
            if cfg is not None and cfg.attention_gqa:
                kv, reason = check_gqa(node)
                if reason is not None:
                    report.add(Site(path, PATTERN, "kept", reason))
                elif kv is not None:
                    report.add(Site(path, PATTERN, "rewritten", replace_gqa(module, node, *kv)))
                    report.counters["attention.gqa"] += 1
    recompile(modules)
    return gm


def erase_dead_chain(gm: GraphModule, node: Node) -> None:
    """The mask's producers that nothing else reads go with it (no side effects in them)."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method"):
            continue  # erased already: a producer read twice by the chain (a diamond) is pushed twice
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
