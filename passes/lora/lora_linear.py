"""LoRA linear: pattern, check, replacement.

Pattern (Dynamo graph, torch IR), as PEFT and hand-written LoRA modules produce it:

    base   = linear(x, W, b)                      | view(addmm(b, view(x), W))   (Conv1D, W is K x N)
                                                   | x @ W.T  | fp8_linear(x, W_q, w_s, b)   (Fp8Linear)
                                                   | sparse24_linear(x, W, W_c, layout, b)   (Sparse24Linear)
                                                   | nf4_linear(x, W_4bit, absmax..., N, K, dtype, b)   (Nf4Linear)
                                                   [then .clone(): PEFT's 4-bit LoRA layer]
    h_i    = [dropout_i]([cast](x))               adapter input, per adapter i
    lora_i = linear(linear(h_i, A_i), B_i, b_Bi)  | (h_i @ A_i^T) @ B_i^T  | h_i @ A_i @ B_i
    sum    = base + lora_1 * s_1 + ... + lora_k * s_k     (s: float, 0-d tensor, or absent;
                                                   each term maybe cast to the base's dtype first)
    out    = [cast to base dtype](sum)  [+ residual]

Replacement: one `torch.ops.unsloth.lora_linear` call (adapters that read the same tensor
concatenated along the rank; the residual add folded in). A single adapter's training-mode
dropout of x (or of x cast to the adapter dtype) becomes `native_dropout` at the same place,
whose boolean mask the op takes instead of the dropped tensor (dropout_as_mask). Active
adapters that read different tensors (different dropout draws, or x and a draw) are grouped
by what they read: the op computes the base and one group, the other groups' terms stay
graph nodes, each dropout where it was, and reach the op as its residual
(lora_adapter_groups.py). Under autocast the op's operands are cast to the dtypes the
projections computed in (lora_autocast.py). A base stored in fp8, or any base under
precision="fp8", makes the op `torch.ops.unsloth.lora_linear_fp8` (fp8_linear.py); a base pruned
2:4 (Sparse24Linear) under sparsity="2:4", `torch.ops.unsloth.lora_linear_sparse24` (sparse24_linear.py);
a base stored in 4-bit NF4 (Nf4Linear), `torch.ops.unsloth.lora_linear_nf4` (nf4_linear.py).

Check: the base weight is frozen, every adapter reads the base input, the scale is not
trainable. Anything else is refused and reported with the reason; LoRA layers left in the
graph that no site consumed (DoRA, Embedding/Conv LoRA, merged or disabled adapters) are
reported too.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ...config import Config
from ...report import Report, Site
from . import fp8_linear
from .. import fx_match as fm
from . import lora_adapter_groups, lora_autocast
from . import nf4_linear, sparse24_linear
from .. import subgraphs
from .lora_dtensor import dtensor_check
from .lora_leftovers import report_leftover_lora_layers
from .lora_site import Adapter, BaseLinear, LoraSite

PATTERN = "lora_linear"


# ----------------------------------------------------------------------------- pattern


def match_base_linear(node: Node) -> Optional[BaseLinear]:
    if node.op == "call_method" and node.target == "clone" and len(node.args) == 1 and not node.kwargs \
            and isinstance(node.args[0], Node) and len(node.args[0].users) == 1:
        # PEFT's 4-bit LoRA layer clones the base's output before adding the adapters: a copy
        base = match_base_linear(node.args[0])
        if base is not None:
            base.nodes.insert(0, node)
        return base
    if (nf4_base := nf4_linear.match_nf4_base(node)) is not None:
        x, packed, bias, nodes, stored = nf4_base
        return BaseLinear(x, packed, bias, False, nodes, nf4=stored)
    if (fp8_base := fp8_linear.match_fp8_base(node)) is not None:
        x, codes, scales, bias, nodes = fp8_base
        return BaseLinear(x, codes, bias, False, nodes, weight_scale=scales)
    if (sparse_base := sparse24_linear.match_sparse24_base(node)) is not None:
        x, weight, bias, nodes, stored = sparse_base
        return BaseLinear(x, weight, bias, False, nodes, sparse24=stored)
    if fm.is_linear(node):
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return BaseLinear(x, weight, bias, False, [node])
    if fm.is_matmul(node) and fm.is_transpose_2d(node.args[1]) and _is_2d(node.args[1].args[0]):
        return BaseLinear(node.args[0], node.args[1].args[0], None, False, [node, node.args[1]])
    # transformers' Conv1D: view(addmm(bias, x.view(-1, K), W), (*lead, N))
    if node.op == "call_method" and node.target == "view" and isinstance(node.args[0], Node):
        addmm = node.args[0]
        if addmm.op == "call_function" and addmm.target is torch.addmm and len(addmm.args) == 3 \
                and not addmm.kwargs and len(addmm.users) == 1:
            bias, flat_x, weight = addmm.args
            if isinstance(flat_x, Node) and flat_x.op == "call_method" and flat_x.target == "view" \
                    and len(flat_x.users) == 1:
                return BaseLinear(flat_x.args[0], weight, bias, True, [node, addmm, flat_x])
    return None


def _adapter_linear(node: Node) -> Optional[tuple[Node, Node, Optional[Node], list[Node], bool]]:
    """(input, weight parameter, bias, matched nodes, weight stored (in, out)) of one adapter
    projection: linear(h, P, b) | h @ P.T | h @ P (P stored (in, out), as in `x @ lora_A`)."""
    if fm.is_linear(node):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], bias, [node], False
    if fm.is_matmul(node) and len(node.args) == 2:
        rhs = node.args[1]
        if fm.is_transpose_2d(rhs) and _is_2d(rhs.args[0]):
            return node.args[0], rhs.args[0], None, [node, rhs], False
        if _is_2d(rhs):
            return node.args[0], rhs, None, [node], True
    return None


def _is_2d(node) -> bool:
    value = fm.example_value(node)
    return isinstance(value, torch.Tensor) and value.dim() == 2


def _is_0d(node) -> bool:
    value = fm.example_value(node)
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _scale_of(node: Node) -> tuple[Node, float, Optional[Node]]:
    """Peel `t * s` / `s * t`: (t, float scale, 0-d tensor scale)."""
    if fm.is_mul(node):
        lhs, rhs = node.args
        for t, s in ((lhs, rhs), (rhs, lhs)):
            if not isinstance(t, Node):
                continue
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                return t, float(s), None
            if isinstance(s, Node) and s.op == "call_method" and s.target == "item" and _is_0d(s.args[0]):
                # A float attribute that changed between calls (a LoRA rank change rescales
                # alpha/r): Dynamo passes it as a 0-d tensor input and multiplies by its item().
                return t, 1.0, s.args[0]
            tv = fm.example_value(t)
            if _is_0d(s) and isinstance(tv, torch.Tensor) and tv.dim() >= 1:
                return t, 1.0, s
    return node, 1.0, None


def match_adapter(node: Node) -> Optional[Adapter]:
    """[cast]([scale *] B(A([dropout]([cast](x))))) with A and B parameters of a low rank r < K, N.
    The outer cast (PEFT's 4-bit LoRA layer casts the term to the base's dtype before the add) is
    matched with the term: the op adds the term in the adapter's dtype and rounds the sum once."""
    term = node
    if fm.cast_dtype(node) is not None and isinstance(node.args[0], Node) and len(node.args[0].users) == 1:
        node = node.args[0]
    inner, scale, scale_tensor = _scale_of(node)
    b_proj = _adapter_linear(inner)
    if b_proj is None:
        return None
    hidden, b_weight, b_bias, b_nodes, b_in_out = b_proj
    a_proj = _adapter_linear(hidden) if isinstance(hidden, Node) else None
    if a_proj is None or len(hidden.users) != 1:
        return None
    adapter_in, a_weight, a_bias, a_nodes, a_in_out = a_proj
    if a_bias is not None or not isinstance(adapter_in, Node):
        return None
    if not (fm.is_param_like(a_weight) and fm.is_param_like(b_weight)):
        return None
    a_shape, b_shape = fm.example_value(a_weight).shape, fm.example_value(b_weight).shape
    rank, k = (a_shape[1], a_shape[0]) if a_in_out else (a_shape[0], a_shape[1])
    b_rank, n = (b_shape[0], b_shape[1]) if b_in_out else (b_shape[1], b_shape[0])
    if rank != b_rank or not rank < min(k, n):
        return None  # not low-rank: an ordinary two-layer block, not an adapter
    lora_x, dropout_p, source = None, 0.0, adapter_in
    if fm.is_dropout(adapter_in):
        lora_x = adapter_in
        dropout_p = float(adapter_in.args[1] if len(adapter_in.args) > 1 else adapter_in.kwargs.get("p", 0.5))
        source = adapter_in.args[0]
    nodes = ([term] if term is not node else []) + ([node] if node is not inner else []) + b_nodes + a_nodes
    return Adapter(source, lora_x, a_weight, a_in_out, b_weight, b_in_out, b_bias, scale, scale_tensor,
                   dropout_p, nodes, term, a_nodes[0], b_nodes[0])

def match_lora_sum(top: Node) -> Optional[tuple[BaseLinear, list[Adapter], list[Node]]]:
    """base + adapter_1 + ... + adapter_k, with `top` the outermost add."""
    adapters, adds, node = [], [], top
    while fm.is_add(node) and all(isinstance(a, Node) for a in node.args):
        if adds and len(node.users) != 1:
            break
        lhs, rhs = node.args
        if (adapter := match_adapter(rhs)) is not None:
            node_next = lhs
        elif (adapter := match_adapter(lhs)) is not None:
            node_next = rhs
        else:
            break
        adapters.append(adapter)
        adds.append(node)
        node = node_next
    if not adapters:
        return None
    base = match_base_linear(node)
    if base is None or len(node.users) != 1:
        return None
    for adapter in adapters:
        if adapter.lora_x is base.x:
            # The "dropout" is upstream of the layer (BERT's embedding dropout, say) and the
            # base reads it too: the adapter reads the layer input itself.
            adapter.lora_x, adapter.source, adapter.dropout_p = None, base.x, 0.0
    # The layer input may itself be a cast (`x = x.float()` before both): the adapter reads
    # it, or casts of it, not what it was cast from.
    if any(not fm.is_cast_of(a.source, base.x) for a in adapters):
        return None
    return base, adapters[::-1], adds


# ----------------------------------------------------------------------------- check


def check_site(base: BaseLinear, adapters: list[Adapter]) -> Optional[str]:
    """None when the site can be fused, else the reason it is refused."""
    if fm.requires_grad(base.weight):
        return "trainable base weight (the fused op never computes a gradient for W)"
    if base.nf4 is not None:
        reason = nf4_linear.check_site(base)
        if reason is not None:
            return reason
        return _check_adapters(adapters)
    if base.bias is not None and not isinstance(base.bias, Node):
        return "base bias is not a tensor"
    w = fm.example_value(base.weight)
    x = fm.example_value(base.x)
    if (reason := nf4_linear.check_dense_weight(w)) is not None:
        return reason
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(x, torch.Tensor):
        return "base weight is not a 2-D tensor"
    # x and W may differ in dtype under autocast; the op gets both in the dtype the base computed in.
    compute = lora_autocast.base_compute_dtype(base.nodes[0])
    if not (x.dtype.is_floating_point and w.dtype.is_floating_point and compute is not None
            and compute.is_floating_point):
        return f"base computes in {compute} from input {x.dtype} and weight {w.dtype}, not a float linear"
    return _check_adapters(adapters)


def _check_adapters(adapters: list[Adapter]) -> Optional[str]:
    for adapter in adapters:
        if adapter.scale_tensor is not None and fm.requires_grad(adapter.scale_tensor):
            return "trainable LoRA scale"
        if (reason := lora_autocast.adapter_dtype_mismatch(adapter.a_output, adapter.b_output)) is not None:
            return reason
    # Several adapters in different dtypes, or reading different dropout draws, are grouped
    # (plan_site): nothing to refuse.
    return None


def _match_tail(sum_node: Node, cfg: Config):
    """(last, out_dtype, residual, extra chain nodes): absorb a dtype cast of the sum (PEFT's
    cast back to the base dtype), then a residual add, when each is the single user of what
    precedes it."""
    last, chain = sum_node, []
    out_dtype = fm.example_value(sum_node).dtype
    user = fm.single_user(sum_node)
    if user is not None and fm.cast_dtype(user) is not None and user.args[0] is sum_node:
        last, out_dtype = user, fm.cast_dtype(user)
        chain.append(user)
    residual = None
    user = fm.single_user(last)
    if cfg.fold_residual and user is not None and fm.is_add(user) and user.target is not operator.iadd:
        other = user.args[1] if user.args[0] is last else user.args[0]
        ov, lv = fm.example_value(other), fm.example_value(last)
        if isinstance(other, Node) and other is not last and isinstance(ov, torch.Tensor) \
                and ov.shape == lv.shape and ov.dtype == lv.dtype:
            residual, last = other, user
            chain.append(user)
    return last, out_dtype, residual, chain


# ----------------------------------------------------------------------------- replacement


def dropout_as_mask(adapter: Adapter, base: BaseLinear) -> Optional[float]:
    """1 / (1 - p) when the adapter's dropout can reach the op as a boolean mask, else None.

    The op then rebuilds the dropped input as x.to(A's dtype) * mask * 1/(1-p), which is
    bitwise what the dropout produced, provided: a training-mode, out-of-place
    F.dropout with 0 < p < 1, read by the adapter alone, of the layer input itself or of one
    cast of it to the dtype the adapter computes in. Otherwise the dropout output goes in as
    lora_x (under autocast on an fp32 model: the dropout runs in fp32 and autocast rounds its
    output to bf16, which a rebuild from bf16 x would not reproduce).
    """
    node = adapter.lora_x
    if node is None or len(node.users) != 1:
        return None
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    inplace = node.args[3] if len(node.args) > 3 else node.kwargs.get("inplace", False)
    if training is not True or inplace is not False or not 0.0 < adapter.dropout_p < 1.0:
        return None
    dropped = node.args[0]
    if not (dropped is base.x or (fm.cast_dtype(dropped) is not None and dropped.args[0] is base.x)):
        return None
    # The op rebuilds from its x (base.x in the base's compute dtype) cast to its A's dtype (the
    # adapter's compute dtype): that must be the dropped tensor, bit for bit.
    adapter_dtype = adapter.compute_dtype
    base_dtype = lora_autocast.base_compute_dtype(base.nodes[0])
    if lora_autocast.output_dtype(dropped) != adapter_dtype:
        return None
    if base_dtype not in (lora_autocast.output_dtype(base.x), adapter_dtype):
        return None
    return 1.0 / (1.0 - adapter.dropout_p)


def plan_site(sum_node: Node, base: BaseLinear, adapters: list[Adapter], adds: list[Node],
              cfg: Config) -> LoraSite:
    """What the op will compute: the adapters it takes (lora_adapter_groups.split_by_input),
    the others left as graph terms, how its dropout goes in, and the tail it absorbs (PEFT's
    cast back, a residual add) when no terms are left outside it."""
    in_op, extras = lora_adapter_groups.split_by_input(adapters, lambda a: dropout_as_mask(a, base) is not None)
    if extras:
        # The extra terms are the op's residual, added to the sum before PEFT's cast: the op
        # returns the sum itself, and the cast and a residual add after it stay in the graph.
        last, out_dtype, residual, tail = sum_node, lora_autocast.output_dtype(sum_node), None, []
    else:
        last, out_dtype, residual, tail = _match_tail(sum_node, cfg)
    dropout_scale = dropout_as_mask(in_op[0], base) if len(in_op) == 1 else None
    return LoraSite(base, in_op, sum_node, last, out_dtype, residual, adds + tail, extras, dropout_scale)


def replace_site(gm: GraphModule, site: LoraSite, cfg: Config) -> Node:
    graph = gm.graph
    base, first = site.base, site.adapters[0]

    def emit(op: str, target, args) -> Node:
        node = graph.create_node(op, target, args)
        fm.set_fake_meta(node, site.sum_node)  # now: a cast emitted next reads this node's dtype
        return node

    base_dtype, adapter_dtype = lora_autocast.base_compute_dtype(base.nodes[0]), first.compute_dtype
    with graph.inserting_before(site.last):
        A, B, B_bias, scale, scale_tensor = lora_adapter_groups.op_operands(emit, site.adapters)
        # The dtypes each projection computed in (autocast's, when it is on): the op falls
        # through autocast and computes in its operands' dtypes (lora_autocast.py).
        x, bias = (lora_autocast.cast_to(emit, n, base_dtype) for n in (base.x, base.bias))
        weight = base.weight if site.fp8 or site.nf4 else lora_autocast.cast_to(emit, base.weight, base_dtype)
        A, B, B_bias = (lora_autocast.cast_to(emit, n, adapter_dtype) for n in (A, B, B_bias))
        residual = site.residual
        if site.extras:
            residual = lora_adapter_groups.summed_terms(emit, site.extras, site.out_dtype)
    lora_x, mask_args, dropout = first.lora_x, (), []
    if site.dropout_scale is not None:
        # The mask is drawn where the dropout was (the random stream keeps its order); the
        # dropout node goes, and with it the (M, K) dropped input saved for backward.
        dropout = [first.lora_x]
        with graph.inserting_before(first.lora_x):
            drawn = emit("call_function", torch.native_dropout, (first.lora_x.args[0], first.dropout_p, True))
            mask = emit("call_function", operator.getitem, (drawn, 1))
        lora_x, mask_args = None, (mask, site.dropout_scale)
    with graph.inserting_before(site.last):
        # The dropped input in the dtype the adapter reads it in: the op keeps it for backward.
        lora_x = lora_autocast.cast_to(emit, lora_x, adapter_dtype)
        if site.nf4:
            call = nf4_linear.replace_base(emit, site, x, bias, (A, B, B_bias, lora_x, residual, scale, scale_tensor),
                                           mask_args, cfg.kernels.value)
        elif site.fp8:
            call = fp8_linear.replace_base(emit, site, x, bias, (A, B, B_bias, lora_x, residual, scale, scale_tensor),
                                           mask_args, cfg.kernels.value)
        elif site.sparse24:
            call = sparse24_linear.replace_base(emit, site, x, bias, (A, B, B_bias, lora_x, residual, scale,
                                                scale_tensor), mask_args, cfg.kernels.value)
        else:
            call = emit("call_function", torch.ops.unsloth.lora_linear.default, (
                x, weight, bias, A, B, B_bias, lora_x, residual, scale, scale_tensor,
                base.weight_transposed, site.out_dtype, cfg.kernels.value) + mask_args)
        out = emit("call_function", operator.getitem, (call, 0))
    site.last.replace_all_uses_with(out)
    dead = site.chain + base.nodes + [n for a in site.adapters for n in a.nodes] + dropout
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(dead, key=position.__getitem__, reverse=True):  # users before their inputs
        if not node.users:
            graph.erase_node(node)
    return call


def describe_fused(site: LoraSite, details: dict, fp8_text: str = "") -> str:
    """The report's text for a fused site; records the decisions in `details`."""
    first, n_adapters = site.adapters[0], len(site.adapters) + len(site.extras)
    what = f"rank {details['rank']}" + (f", {n_adapters} adapters" if n_adapters > 1 else "")
    if site.extras:
        what += (f" ({len(site.adapters)} in the op; {len(site.extras)} reading another input, kept as "
                 f"graph terms added to the op's result)")
    if first.lora_x is not None:
        what += ", dropout as mask" if site.dropout_scale is not None else ", dropout"
        details["dropout_as_mask"] = site.dropout_scale is not None
    base_dtype = lora_autocast.base_compute_dtype(site.base.nodes[0])
    stored = site.base.weight_scale is not None or site.base.nf4 is not None
    weight_dtype_of = site.base.nodes[0] if stored else site.base.weight
    if lora_autocast.is_autocast_site(site.base.nodes[0], weight_dtype_of, first.a_output, first.A):
        what += f", autocast (computes in {str(base_dtype).replace('torch.', '')})"
    details.update(adapters_in_op=len(site.adapters), residual_folded=site.residual is not None,
                   compute_dtype=str(base_dtype).replace("torch.", ""),
                   adapter_compute_dtype=str(first.compute_dtype).replace("torch.", ""))
    what += ", residual folded" if site.residual is not None else ""
    return what + (", Conv1D" if site.base.weight_transposed else "") + fp8_text


# ----------------------------------------------------------------------------- the pass


def _site_path(adapter: Adapter, base: BaseLinear) -> str:
    """The module that owns both the base linear and the adapter (PEFT's LoRA layer, or a
    hand-written LoRA module): the longest common prefix of their module paths."""
    base_parts = fm.module_path(base.nodes[0]).split(".")
    adapter_parts = fm.module_path(adapter.nodes[-1]).split(".")
    common = []
    for a, b in zip(base_parts, adapter_parts):
        if a != b:
            break
        common.append(a)
    return ".".join(common) or "<root>"


def fuse_lora_linears(gm: GraphModule, cfg: Config | None = None, report: Report | None = None) -> GraphModule:
    """Rewrite every LoRA linear of a Dynamo-captured graph into `torch.ops.unsloth.lora_linear`,
    inside the bodies of checkpointed regions too (passes/subgraphs.py).

    Usable on its own inside a user's compile pipeline (a custom backend that receives the
    Dynamo graph): returns the same GraphModule, recompiled; decisions go to `report`.
    """
    cfg = cfg or Config()
    report = report if report is not None else Report()
    modules = subgraphs.graph_modules(gm)
    for module in modules:
        _fuse_in_graph(module, cfg, report)
    report_leftover_lora_layers(modules, report, PATTERN)
    subgraphs.recompile(modules)
    return gm


def _fuse_in_graph(gm: GraphModule, cfg: Config, report: Report) -> None:
    """One graph (the root or a HOP body): a body's placeholders are the HOP's operands, with
    the example values and module stacks of what they stand for, so matching and checking
    read them as they read the root's parameters."""
    consumed: set[Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in consumed or node.graph is not gm.graph or not fm.is_add(node):
            continue
        matched = match_lora_sum(node)
        if matched is None:
            continue
        base, adapters, adds = matched
        path = _site_path(adapters[0], base)
        for n in adds + base.nodes + [m for a in adapters for m in a.nodes]:
            consumed.add(n)
        layout, dtensor_reason = dtensor_check(base, adapters, cfg)  # tensor parallelism: DTensor operands
        reason = check_site(base, adapters) or dtensor_reason
        details = _details(base, adapters)
        if reason is not None:
            report.add(Site(path, PATTERN, "refused", reason, details))
            continue
        # Planned before the rewrite: replace_site erases the dropout it turns into a mask.
        site = plan_site(node, base, adapters, adds, cfg)
        site.nf4, nf4_note = nf4_linear.check_nf4(base, cfg)
        fp8_refusal = sparse_refusal = None
        if site.nf4 is None:
            site.fp8, fp8_refusal = fp8_linear.check_fp8(base, cfg)
            site.sparse24, sparse_refusal = sparse24_linear.check_sparse24(base, cfg)
        replace_site(gm, site, cfg)
        fp8_text = fp8_linear.record(report, details, site.fp8, fp8_refusal)
        fp8_text += sparse24_linear.record(report, details, base, site.sparse24, sparse_refusal)
        fp8_text += nf4_linear.record(report, details, site.nf4, nf4_note)
        if layout is not None:  # DTensor runs the op on each rank's shards (dtensor_sharding.py)
            details["dtensor_layout"] = layout
            fp8_text += f", DTensor {layout} (on local shards)"
            report.counters["lora_linear.dtensor"] += 1
        report.add(Site(path, PATTERN, "fused", describe_fused(site, details, fp8_text), details))
        report.counters["lora_linear.residual_folded"] += site.residual is not None
        report.counters["lora_linear.adapters"] += len(adapters)


def _details(base: BaseLinear, adapters: list[Adapter]) -> dict:
    w = fm.example_value(base.weight)
    if base.nf4 is not None:
        n, k = nf4_linear.shape(base)
    else:
        n, k = (w.shape[1], w.shape[0]) if base.weight_transposed else (w.shape[0], w.shape[1])
    ranks = [fm.example_value(a.A).shape[1 if a.A_in_out else 0] for a in adapters]
    return {"rank": sum(ranks), "in_features": int(k), "out_features": int(n),
            "adapters": len(adapters), "dropout": max(a.dropout_p for a in adapters),
            "base_dtype": str(w.dtype if base.nf4 is None else base.nf4[5]).replace("torch.", ""),
            "adapter_dtype": str(fm.example_value(adapters[0].A).dtype).replace("torch.", "")}
