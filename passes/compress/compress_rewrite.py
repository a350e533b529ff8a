"""The replacements of passes/compress/compress_saved.py: graph surgery on AOTAutograd's partitioned
forward and backward graphs.

A saved tensor is one output of the forward graph (after its real outputs) and one
placeholder of the backward graph, in the same order among the saved tensors. A
replacement swaps it for one or more new saved tensors at the same position in both lists,
so the order that pairs them stays true and AOTAutograd, which counts the saved tensors
from the forward's output node after partitioning, sees a consistent pair of graphs.
Every new node gets `meta["val"]` (and `tensor_meta`) from its op's fake impl.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

unsloth = torch.ops.unsloth

try:  # what partitioners put in meta["tensor_meta"]; some of Inductor's passes read it
    from torch.fx.passes.shape_prop import _extract_tensor_metadata
except ImportError:  # pragma: no cover - present in every torch this project supports
    _extract_tensor_metadata = None

# Meta keys a new forward node takes from the saved tensor it stands in for.
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "saved_tensor_with_no_vc_check")


def _fake(node: Node) -> Any:
    return node.meta["val"] if isinstance(node, Node) else node


def _set_val(node: Node, value: Any) -> None:
    node.meta["val"] = value
    if _extract_tensor_metadata is not None and isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def call(graph: torch.fx.Graph, target, args: tuple, like: Node, name: Optional[str] = None) -> Node:
    """graph.call_function with meta: the value from the op's fake impl on the inputs'
    fake values (under their fake mode), module stack and source from `like`."""
    node = graph.create_node("call_function", target, args, {}, name=name)
    fake_args = torch.fx.node.map_arg(args, _fake)
    fake_mode = like.meta["val"].fake_mode if hasattr(like.meta.get("val"), "fake_mode") else None
    if fake_mode is None:
        vals = [v for v in map(_fake, node.all_input_nodes) if hasattr(v, "fake_mode")]
        fake_mode = vals[0].fake_mode if vals else None
    if fake_mode is not None:
        with fake_mode:
            _set_val(node, target(*fake_args))
    else:  # a graph without fake values (never from AOTAutograd): evaluate on the values given
        _set_val(node, target(*fake_args))
    for key in _INHERITED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def replace_saved_output(fw: GraphModule, old: Node, new: list[Node], num_fwd_outputs: int) -> None:
    """In the forward's output tuple, the saved `old` becomes `new` (same position)."""
    output = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(output.args[0])
    position = next(i for i in range(num_fwd_outputs, len(outs)) if outs[i] is old)
    outs[position:position + 1] = new
    descs = output.meta.get("desc")
    if isinstance(descs, (list, tuple)) and len(descs) == len(outs) - len(new) + 1:
        # AOTAutograd's description of each output (debugging and tooling only): the new
        # saved tensors take the description of the one they replace.
        descs = list(descs)
        descs[position:position + 1] = [descs[position]] * len(new)
        output.meta["desc"] = descs
    output.args = (tuple(outs),) + tuple(output.args[1:])


def replace_placeholder(bw: GraphModule, old: Node, like: list[Node]) -> list[Node]:
    """New backward placeholders in place of `old`, one per forward node of `like` (same
    names, same values); `old` stays until its uses are moved."""
    new = []
    with bw.graph.inserting_before(old):
        for fw_node in like:
            placeholder = bw.graph.placeholder(fw_node.name)
            placeholder.meta.update({k: v for k, v in old.meta.items() if k not in ("val", "tensor_meta")})
            _set_val(placeholder, fw_node.meta["val"])
            new.append(placeholder)
    return new


def first_user(node: Node) -> Node:
    """Where a decompress goes: right before the first node that reads the tensor, so that
    backward holds one decompressed tensor at a time, not all of them from its start."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


# The row-wise compress and decompress go into the graphs as the aten ops of
# kernels/compress.py's rowwise_compress / rowwise_decompress, one for one (same ops, same
# order: on CPU bitwise the reference, tests/passes/test_compress_saved.py), rather than as the opaque
# torch.ops.unsloth.compress_rowwise call: Inductor then fuses the compress (a row amax, a
# divide, a cast) into one kernel, often with the one that produced the tensor, and the
# decompress (cast, multiply) into the backward kernel that reads it, so the decompressed
# tensor is never written out. As opaque calls they would cost several full passes over
# each tensor per step.
aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default


def emit_rowwise_compress(graph: torch.fx.Graph, x: Node, fmt: str, like: Node) -> tuple[Node, Node]:
    """(q, scale) nodes computing kernels/compress.rowwise_compress(x, fmt)."""
    from ...kernels.compress import CODE_MAX, ROWWISE_FORMATS

    code_max = CODE_MAX[fmt]
    xf = x if x.meta["val"].dtype == torch.float32 else call(graph, _convert, (x, torch.float32), like)
    amax = call(graph, aten.amax.default, (call(graph, aten.abs.default, (xf,), like), [-1], True), like)
    scale = call(graph, aten.where.ScalarOther, (call(graph, aten.gt.Scalar, (amax, 0), like),
                                                  call(graph, aten.div.Tensor, (amax, code_max), like), 1.0),
                 like, name=f"{like.name}_scale")
    # clamp as clamp_min then clamp_max: the nodes go in after Inductor's decompositions ran,
    # so they must be ops Inductor lowers as they are (it has no lowering for aten.clamp)
    scaled = call(graph, aten.div.Tensor, (xf, scale), like)
    scaled = call(graph, aten.clamp_max.default, (call(graph, aten.clamp_min.default, (scaled, -code_max), like),
                                                  code_max), like)
    if fmt == "int8":
        scaled = call(graph, aten.round.default, (scaled,), like)
    q = call(graph, _convert, (scaled, ROWWISE_FORMATS[fmt]), like, name=f"{like.name}_{fmt}")
    return q, scale


def emit_rowwise_decompress(graph: torch.fx.Graph, q: Node, scale: Node, dtype: torch.dtype, like: Node) -> Node:
    """The node computing kernels/compress.rowwise_decompress(q, scale, dtype)."""
    restored = call(graph, aten.mul.Tensor, (call(graph, _convert, (q, torch.float32), like), scale), like)
    return restored if dtype == torch.float32 else call(graph, _convert, (restored, dtype), like)


def rowwise(fw: GraphModule, bw: GraphModule, saved: Node, placeholder: Node, fmt: str,
            num_fwd_outputs: int) -> list[Node]:
    """t -> (q, scale) in the forward's saved outputs, computed right after t; decompressed
    in backward right before its first reader."""
    with fw.graph.inserting_before(saved.next):  # in creation order, right after t
        q, scale = emit_rowwise_compress(fw.graph, saved, fmt, saved)
    replace_saved_output(fw, saved, [q, scale], num_fwd_outputs)
    q_in, scale_in = replace_placeholder(bw, placeholder, [q, scale])
    with bw.graph.inserting_before(first_user(placeholder)):
        restored = emit_rowwise_decompress(bw.graph, q_in, scale_in, saved.meta["val"].dtype, placeholder)
    placeholder.replace_all_uses_with(restored)
    bw.graph.erase_node(placeholder)
    return [q, scale]


def _lora_backward_args(node: Node) -> list:
    """lora_linear_backward's 14 arguments, the optional dropout tail filled in."""
    args = list(node.args) + [None, 1.0][max(0, len(node.args) - 12):]
    for i, name in ((12, "dropout_mask"), (13, "dropout_scale")):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    return args


# compress_lowrank_projection -> the op computing P from x (kernels/compress.py)
_PROJECTIONS = {"range": unsloth.range_projection.default, "random": unsloth.random_projection.default}


def lowrank(fw: GraphModule, bw: GraphModule, saved: Node, placeholder: Node, uses: list[tuple[Node, int]],
            k: int, projection_kind: str, num_fwd_outputs: int) -> list[Node]:
    """x -> P (from x itself for "range", the range finder on x without any dropout mask),
    and Z = x' P per distinct adapter input x' (one per dropout mask); each LoRA backward
    reading x becomes lora_linear_backward_projected on its Z and P."""
    lora_dtype = _lora_backward_args(uses[0][0])[3].meta["val"].dtype
    with fw.graph.inserting_after(saved):
        projection = call(fw.graph, _PROJECTIONS[projection_kind], (saved, k, lora_dtype), saved,
                          name=f"{saved.name}_projection")
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    groups: dict[tuple, Node] = {}  # (mask name, dropout scale) -> Z in the forward
    for node, _ in uses:
        args = _lora_backward_args(node)
        mask = args[12]
        key = (mask.name if mask is not None else None, args[13])
        if key in groups:
            continue
        fw_mask = fw_nodes[mask.name] if mask is not None else None
        # after x's projection and the mask, whichever comes later
        after = max([projection] + ([fw_mask] if fw_mask is not None else []), key=order.__getitem__)
        with fw.graph.inserting_after(after):
            groups[key] = call(fw.graph, unsloth.project_rows.default,
                               (saved, projection, fw_mask, args[13], projected_dtype(saved, lora_dtype)),
                               saved, name=f"{saved.name}_projected")
    new_outputs = list(groups.values()) + [projection]
    replace_saved_output(fw, saved, new_outputs, num_fwd_outputs)
    bw_inputs = dict(zip([id(n) for n in new_outputs], replace_placeholder(bw, placeholder, new_outputs)))
    for node, position in uses:
        args = _lora_backward_args(node)
        mask = args[12]
        z = bw_inputs[id(groups[(mask.name if mask is not None else None, args[13])])]
        x, lora_x = args[1], args[5]
        lora_x_dtype = lora_x.meta["val"].dtype if position == 5 else None
        new_args = (args[0], z, bw_inputs[id(projection)], x.meta["val"].dtype, args[2], args[3], args[4],
                    lora_x_dtype, args[6], args[7], args[8], args[9], args[10], mask, args[13])
        with bw.graph.inserting_before(node):
            projected = call(bw.graph, unsloth.lora_linear_backward_projected.default, new_args, node)
        node.replace_all_uses_with(projected)
        bw.graph.erase_node(node)
        erase_if_dead(bw, x)
    bw.graph.erase_node(placeholder)
    return new_outputs


def projected_dtype(saved: Node, lora_dtype: torch.dtype) -> torch.dtype:
    """Z is stored in the smaller of x's dtype and the adapter dtype (it is computed in the
    adapter dtype either way)."""
    x_dtype = saved.meta["val"].dtype
    return x_dtype if x_dtype.itemsize < lora_dtype.itemsize else lora_dtype


def erase_if_dead(gm: GraphModule, node: Any) -> None:
    """Erase `node` and then its inputs while they are unused computations (the stand-in x
    that a projected LoRA backward no longer reads)."""
    if not isinstance(node, Node) or node.op != "call_function" or node.users or node.is_impure():
        return
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for arg in inputs:
        erase_if_dead(gm, arg)
