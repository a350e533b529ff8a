"""Compress what LoRA ops and FFN blocks save for backward (option `compress_activations`).

This pass runs on the two graphs AOTAutograd's partitioner makes of the joint
forward/backward graph, not on the Dynamo graph: only there is it known which tensors the
forward saves for backward. The forward graph returns its real outputs, then the saved
tensors (then saved SymInts); the backward graph takes the saved tensors as placeholders of
the same names. A saved tensor t chosen here becomes

    forward:   ..., q, scale = compress_rowwise(t, "fp8")        outputs: ..., q, scale, ...
    backward:  q, scale (placeholders) -> t~ = decompress_rowwise(q, scale, t.dtype) -> t's uses
               (placed right before t's first reader: one decompressed tensor alive at a time;
               both written as their aten ops, which Inductor fuses: compress_rewrite.py)

so the forward computes exactly what it computed before (t itself is untouched and freed
after its last forward use) and only what backward reads is approximated. With "lowrank",
the LoRA op's input x becomes Z = x' P and P (x' = what the adapter read: x, cast, times the
dropout mask; P from x by the range finder, or random: `compress_lowrank_projection`), and each `lora_linear_backward` reading it becomes
`lora_linear_backward_projected`, whose dA = s (G^T Z) P^T (kernels/compress.py).

Which saved tensors (pattern, then check, as in every pass here):
- **LoRA input**: every backward use is a `lora_linear_backward` reading it as x or lora_x,
  i.e. it is kept only for dA (the base is frozen: dX needs no x).
- **FFN activation**: a node of an FFN block's activation region in the forward graph (a
  projection's output -> pointwise ops through an activation function (silu, gelu, relu,
  ... or the exp / erf / tanh they decompose into) -> pointwise ops -> a projection's input;
  a `mul` on the way adds its other projection operand: gate and up), read in backward only
  by pointwise ops (the activation's and the gate product's derivatives) or as a LoRA input.
  Not lowrank: an elementwise derivative needs every element, a projection has none.
  The projections' outputs are found through casts and views (Inductor's decomposition of
  silu reads convert_element_type(gate), while the partitioner saves gate in bf16).
- **FFN product** (`act(gate) * up`, or `act(h)`: the next projection's input): where the
  partition saves it beside what it is computed from, the joint graph is partitioned again
  with the region marked MUST_RECOMPUTE, so backward recomputes it from the decompressed
  gate and up (site "recomputed", counter `recompute_bytes_saved`, the two partitions'
  saved bytes compared).
Refused and reported: a forward input or a real forward output (compressing would free
nothing), storage shared with a saved tensor kept exact, integer/bool/fp8 tensors, a last
dimension under 16 (per-row scales would eat the saving) or, for lowrank, not above k.
Everything else saved (attention's q/k/v/out/logsumexp, norms' inputs and rstd, masks,
indices, the loss's log-probabilities) is left exact and not reported.

torch internals relied on (torch 2.11-2.13), all in one place, `_partitioner` below:
`torch._functorch.partitioners.min_cut_rematerialization_partition` (the partitioner
Inductor and aot_eager use), `torch._inductor.config.custom_partitioner_fn` with
`torch._inductor.custom_graph_pass.CustomPartitionerFn` (how compile_fx takes a partitioner,
torch >= 2.9; the backend hands it over, with aot_eager's own parts
`torch._dynamo.backends.common.aot_autograd` and `torch._dynamo.backends.debugging.boxed_nop`,
in unsloth_compile/compressed_compile.py: this pass never compiles), and the partitioned
graphs' layout described above, which AOTAutograd reads back from the graphs (the number
of saved tensors is counted from the forward's output node, as torch's own fp8 activation
quantization pass, partitioners.enable_activation_quantization, relies on). The FFN-product
recompute (`partition_recomputing_ffn_products`, in the recompute section) also relies on the
min-cut partitioner honouring `node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE` (what
selective activation checkpointing sets) and on it replacing `joint.graph` with a CSE'd copy
(nodes keep their names), so the region is found again after the first partition.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ...config import CompressMode, Config
from ...report import Report, Site
from ... import ops  # noqa: F401  torch.ops.unsloth.* (and ops/compress.py's) registered
from ...ops import lora as lora_ops
from . import compress_rewrite as rewrite
from .. import fx_match as fm

PATTERN = "compress_saved"
MIN_COLUMNS = 16  # per-row fp32 scales cost 4 bytes a row: below 16 columns they eat the saving
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

aten = torch.ops.aten
_LORA_BACKWARD = torch.ops.unsloth.lora_linear_backward.default
_LORA_FORWARD = torch.ops.unsloth.lora_linear.default
# Every LoRA op family's forward (one per frozen base: dense, fp8, 2:4, NF4) -> the position of
# its lora_x argument. The FFN region (what recompute_ffn_products and the activation compression
# act on) is bounded by their outputs whatever the base's storage; only the dense op's backward
# is rewritten by the LoRA-input compression.
_LORA_FORWARDS = {op.forward_op: op.forward_names.index("lora_x")
                  for name, op in lora_ops.REGISTERED.items() if name.startswith("unsloth::")}
# Activation functions as they appear in aten graphs, and what Inductor's decompositions
# turn them into (silu -> x / (1 + exp(-x)), gelu -> erf or tanh).
_ACTIVATIONS = {aten.silu, aten.gelu, aten.relu, aten.sigmoid, aten.tanh, aten.erf, aten.exp,
                aten.mish, aten.hardswish, aten.hardsigmoid, aten.elu, aten.leaky_relu, aten.softplus,
                aten.celu, aten.selu, aten.hardtanh}
_PROJECTIONS = {aten.mm, aten.addmm}  # what linears become in aten graphs (bmm is attention's)
_REGION_DEPTH = 8  # pointwise hops from an activation back to its projection / on to the next


@dataclasses.dataclass
class SavedTensor:
    fw: Node  # the forward graph's node, one of its saved outputs
    bw: Node  # the backward graph's placeholder for it
    kind: str  # "lora_input" or "ffn_activation"
    path: str  # module path for the report


# ----------------------------------------------------------------------------- pattern


def _is_op(node: Any, packets: set) -> bool:
    return (isinstance(node, Node) and node.op == "call_function"
            and getattr(node.target, "overloadpacket", None) in packets)


def _is_pointwise(node: Node) -> bool:
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def _is_view(node: Node) -> bool:
    """An aten view (its output aliases its first input): reshape, transpose, slice, ..."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.arguments or not schema.returns:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and not alias.is_write and schema.returns[0].alias_info is not None


def _passes_values(node: Node) -> bool:
    """Ops an activation region is made of: elementwise math, views, casts."""
    return _is_pointwise(node) or _is_view(node) or _is_op(node, {aten._to_copy, aten.clone})


def projection_chain(node: Any) -> list[Node]:
    """[node, ..., a linear's output (LoRA op, mm, addmm)]: the views and casts from `node`
    back to the projection that produced it; [] when `node` is no projection output."""
    chain = []
    for _ in range(_REGION_DEPTH):
        if not isinstance(node, Node):
            return []
        chain.append(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return chain if node.args[0].target in _LORA_FORWARDS and node.args[1] == 0 else []
        if _is_op(node, _PROJECTIONS):
            return chain
        if not (_is_view(node) or _is_op(node, {aten._to_copy, aten.clone})
                or node.target is torch.ops.prims.convert_element_type.default):
            return []
        node = node.args[0]
    return []


def _feeds_projection(node: Node) -> bool:
    """Read by a linear as its input: a LoRA op's x / lora_x, or an operand of mm / addmm."""
    for user in node.users:
        lora_x = _LORA_FORWARDS.get(user.target) if user.op == "call_function" else None
        if lora_x is not None and node in (user.args[0], user.args[lora_x] if len(user.args) > lora_x else None):
            return True
        if _is_op(user, _PROJECTIONS) and node in user.args[-2:]:
            return True
        if _is_view(user) and _feeds_projection(user):
            return True
    return False


def _walk_back(start: Node, depth: int) -> tuple[set[Node], set[Node]]:
    """(pointwise/view nodes reached from `start` back through its inputs, projection
    outputs among them or at their edge). A projection output reached through a cast or a
    view brings the whole chain: under Inductor's decompositions silu reads
    `convert_element_type(gate)`, and the partitioner may save `gate` itself, in bf16."""
    seen, sources, frontier = set(), set(), [start]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for arg in node.all_input_nodes:
                if arg in seen:
                    continue
                chain = projection_chain(arg)
                if chain:
                    sources.update(chain)
                elif _passes_values(arg):
                    seen.add(arg)
                    nxt.append(arg)
        frontier = nxt
    return seen, sources


def ffn_activation_region(fw: GraphModule, within: Optional[set[Node]] = None) -> set[Node]:
    """Nodes of the forward graph between FFN projections: for each activation function fed
    (through pointwise ops) by a projection's output and feeding (through pointwise ops)
    a projection's input, the projections' outputs and the pointwise nodes in between.
    `within`: on a joint graph, its forward nodes (the walk does not follow users outside)."""
    region: set[Node] = set()
    for act in fw.graph.nodes:
        if not _is_op(act, _ACTIVATIONS) or (within is not None and act not in within):
            continue
        back, sources = _walk_back(act, _REGION_DEPTH)
        if not sources:
            continue
        forward, frontier, reaches = {act}, [act], False
        for _ in range(_REGION_DEPTH):
            nxt = []
            for node in frontier:
                reaches = reaches or _feeds_projection(node)
                for user in node.users:
                    if user not in forward and _passes_values(user) and (within is None or user in within):
                        forward.add(user)
                        nxt.append(user)
                        if _is_op(user, {aten.mul}):  # the gate product: its other operand is "up"
                            sources |= _walk_back(user, 3)[1]
            frontier = nxt
        if reaches:
            region |= back | forward | sources
    return region


def lora_backward_uses(placeholder: Node) -> tuple[list[tuple[Node, int]], list[Node]]:
    """([(lora_linear_backward node, argument index 1 or 5)] for the LoRA backwards reading
    the backward placeholder as x or lora_x, [every other reader])."""
    uses, others = [], []
    for user in placeholder.users:
        positions = [i for i, a in enumerate(user.args) if a is placeholder]
        if user.target is _LORA_BACKWARD and len(positions) == 1 and positions[0] in (1, 5):
            uses.append((user, positions[0]))
        else:
            others.append(user)
    return uses, others


def _backward_readers_ok(node: Node, depth: int = 0) -> Optional[str]:
    """None when backward reads `node` only elementwise (or as a LoRA input), through views;
    otherwise the name of the op that needs it exact."""
    for user in node.users:
        if user.target is _LORA_BACKWARD and [i for i, a in enumerate(user.args) if a is node] in ([1], [5]):
            continue
        if _is_pointwise(user):
            continue
        if _is_view(user) and depth < 4 and _backward_readers_ok(user, depth + 1) is None:
            continue
        return str(user.target)
    return None


# ----------------------------------------------------------------------------- check


def _hint(size: Any) -> Optional[int]:
    """An int for a size that may be symbolic (its value at the shapes compiled for)."""
    if isinstance(size, torch.SymInt):
        return size.node.hint
    return int(size)


def nbytes(value: torch.Tensor) -> int:
    numel = 1
    for size in value.shape:
        numel *= _hint(size) or 0
    return numel * value.element_size()


def storage_root(node: Node) -> Node:
    """The node whose output `node` is a view of (itself when it is no view)."""
    while _is_view(node) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def check_saved(saved: SavedTensor, cfg: Config, output_roots: set[Node]) -> Optional[str]:
    """Why this saved tensor is left exact, or None."""
    value = saved.fw.meta.get("val")
    lowrank = cfg.compress_activations is CompressMode.LOWRANK
    if saved.fw.op == "placeholder":
        return "a forward input: the caller keeps it alive, compressing it would free nothing"
    if not isinstance(value, torch.Tensor) or value.dtype not in _FLOATS or value.dim() == 0:
        return f"not a float16/bfloat16/float32 tensor ({getattr(value, 'dtype', type(value).__name__)})"
    columns = _hint(value.shape[-1])
    if columns is None or columns < MIN_COLUMNS:
        return f"last dimension {value.shape[-1]} < {MIN_COLUMNS}: per-row scales would eat the saving"
    if (cfg.compress_activations is CompressMode.FP8 and cfg.inner.value == "inductor"
            and value.device.type == "cuda" and torch.cuda.get_device_capability(value.device) < (8, 9)):
        return (f"Inductor's Triton code casts to float8 only on CUDA capability >= 8.9 (this GPU: "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(value.device)))}); use "
                "compress_activations='int8'")
    if storage_root(saved.fw) in output_roots:
        return "also a forward output (or a view of one): compressing it would free nothing"
    if saved.kind == "lora_input":
        others = sorted({str(n.target) for n in lora_backward_uses(saved.bw)[1]})
        if others:
            return f"backward also reads it with {', '.join(others)}, which needs it exact"
    if saved.kind == "ffn_activation":
        if lowrank:
            return ("lowrank compresses LoRA inputs only: backward reads an FFN activation "
                    "elementwise, which needs every element")
        op = _backward_readers_ok(saved.bw)
        if op is not None:
            return f"backward reads it with {op}, which needs it exact"
    return _check_lowrank(saved, cfg.compress_lowrank_k, columns) if lowrank else None


def _check_lowrank(saved: SavedTensor, k: int, columns: int) -> Optional[str]:
    """A LoRA input is projected only where Z and P take less memory than it."""
    if columns <= k:
        return f"its {columns} columns are not more than compress_lowrank_k={k}: a projection would not be smaller"
    groups = set()
    for node, _ in lora_backward_uses(saved.bw)[0]:
        args = rewrite._lora_backward_args(node)
        if args[12] is not None and args[12].op != "placeholder":
            return "the LoRA dropout mask is recomputed in backward, not saved: cannot project x' = x * mask"
        groups.add((args[12], args[13]))
    # one Z (rows x k) per dropout mask among the readers, plus P (K x k) in the adapter dtype
    value, lora_dtype = saved.fw.meta["val"], args[3].meta["val"].dtype
    rows = nbytes(value) // (columns * value.element_size())
    after = k * (len(groups) * rows * rewrite.projected_dtype(saved.fw, lora_dtype).itemsize
                 + columns * lora_dtype.itemsize)
    if after >= nbytes(value):
        return (f"would store more than it frees ({after} >= {nbytes(value)} bytes: "
                f"{len(groups)} projection(s), one per dropout mask, of {k} columns)")
    return None


def _saved_tensors(fw: GraphModule, bw: GraphModule, num_fwd_outputs: int, region: set[Node]
                   ) -> tuple[list[SavedTensor], list[Node], set[Node]]:
    """(the candidates, every saved tensor node, the storage roots of the real outputs)."""
    outputs = list(next(iter(fw.graph.find_nodes(op="output"))).args[0])
    placeholders = {p.name: p for p in bw.graph.find_nodes(op="placeholder")}
    saved = [n for n in outputs[num_fwd_outputs:]
             if isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor) and n.name in placeholders]
    output_roots = {storage_root(n) for n in outputs[:num_fwd_outputs] if isinstance(n, Node)}
    candidates = []
    for node in dict.fromkeys(saved):  # a tensor saved twice is one candidate
        placeholder = placeholders[node.name]
        lora_uses, others = lora_backward_uses(placeholder)
        # kept only for dA: a LoRA input (lowrank applies); read elementwise in an FFN too: an
        # activation; a LoRA input that something else also reads is reported (and refused)
        if lora_uses and (not others or node not in region):
            paths = sorted({fm.module_path(u) for u in node.users if u.target is _LORA_FORWARD})
            candidates.append(SavedTensor(node, placeholder, "lora_input", _join_paths(paths)))
        elif node in region:
            candidates.append(SavedTensor(node, placeholder, "ffn_activation", fm.module_path(node)))
    return candidates, saved, output_roots


def _join_paths(paths: list[str]) -> str:
    """'a.b.q_proj', 'a.b.k_proj' -> 'a.b.{k_proj,q_proj}' (the LoRA layers reading one input)."""
    if len(paths) <= 1:
        return paths[0] if paths else "<root>"
    parts = [p.split(".") for p in paths]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    tails = ",".join(".".join(p[common:]) for p in parts)
    return ".".join(parts[0][:common] + ["{" + tails + "}"])


def bw_readers(bw: GraphModule, fw_node: Node) -> list[Node]:
    placeholder = next((p for p in bw.graph.find_nodes(op="placeholder") if p.name == fw_node.name), None)
    return list(placeholder.users) if placeholder is not None else []


def select(fw: GraphModule, bw: GraphModule, num_fwd_outputs: int, cfg: Config
           ) -> tuple[list[SavedTensor], list[tuple[SavedTensor, str]]]:
    """(to compress, refused with reasons). A candidate sharing storage with a saved tensor
    kept exact is refused too (its memory would stay): repeated until nothing changes."""
    candidates, saved, output_roots = _saved_tensors(fw, bw, num_fwd_outputs, ffn_activation_region(fw))
    refused = [(c, r) for c in candidates if (r := check_saved(c, cfg, output_roots)) is not None]
    chosen = [c for c in candidates if all(c is not r[0] for r in refused)]
    while True:
        kept = {c.fw for c in chosen}
        exact_roots = {storage_root(n): n for n in saved if n not in kept}
        shared = [c for c in chosen if storage_root(c.fw) in exact_roots]
        if not shared:
            return chosen, refused
        for c in shared:
            keeper = exact_roots[storage_root(c.fw)]
            readers = sorted({str(u.target) for u in bw_readers(bw, keeper)})
            refused.append((c, f"shares storage with {keeper.name}, which is kept exact"
                            + (f" for {', '.join(readers)}" if readers else "")))
        chosen = [c for c in chosen if c not in shared]


# ----------------------------------------------------------------------------- the pass


def compress_saved_activations(fw: GraphModule, bw: GraphModule, num_fwd_outputs: int, cfg: Config,
                               report: Report) -> None:
    """Rewrite the partitioned graphs in place (see the module docstring); one Site per
    candidate, counters of bytes saved for backward per call of the graph."""
    if cfg.compress_activations is CompressMode.NONE:
        return
    chosen, refused = select(fw, bw, num_fwd_outputs, cfg)
    mode = cfg.compress_activations.value
    for saved, reason in refused:
        report.add(Site(saved.path, PATTERN, "refused", reason, _details(saved, mode)))
    for saved in chosen:
        details = _details(saved, mode)
        value = saved.fw.meta["val"]
        if cfg.compress_activations is CompressMode.LOWRANK:
            uses = lora_backward_uses(saved.bw)[0]
            new = rewrite.lowrank(fw, bw, saved.fw, saved.bw, uses, cfg.compress_lowrank_k,
                                  cfg.compress_lowrank_projection.value, num_fwd_outputs)
        else:
            new = rewrite.rowwise(fw, bw, saved.fw, saved.bw, mode, num_fwd_outputs)
        stored = [n.meta["val"] for n in new]
        details.update(stored=[_describe(v) for v in stored], bytes_before=nbytes(value),
                       bytes_after=sum(nbytes(v) for v in stored))
        report.add(Site(saved.path, PATTERN, "compressed",
                        f"{saved.kind} {_describe(value)} -> {mode} "
                        f"{' + '.join(_describe(v) for v in stored)}", details))
        report.counters[f"{PATTERN}.bytes_before"] += details["bytes_before"]
        report.counters[f"{PATTERN}.bytes_after"] += details["bytes_after"]
        report.counters[f"{PATTERN}.bytes_saved"] += details["bytes_before"] - details["bytes_after"]
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()


def _describe(value: torch.Tensor) -> str:
    return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"


def _details(saved: SavedTensor, mode: str) -> dict:
    return {"kind": saved.kind, "tensor": saved.fw.name, "mode": mode,
            "saved": _describe(saved.fw.meta["val"]) if "val" in saved.fw.meta else None}


# ----------------------------------------------------------------------------- recompute


def _ancestors(nodes: list[Node]) -> set[Node]:
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def ffn_products(joint: GraphModule, num_fwd_outputs: int) -> tuple[list[Node], dict[str, Node]]:
    """([the pointwise nodes of each FFN activation region of the joint graph: the
    activation, the gate product, their casts and views; not the projections' outputs],
    {name: node} of the products among them, the region's nodes a projection reads)."""
    output = next(iter(joint.graph.find_nodes(op="output")))
    forward_nodes = _ancestors([n for n in output.args[0][:num_fwd_outputs] if isinstance(n, Node)])
    nodes = [n for n in ffn_activation_region(joint, within=forward_nodes)
             if n in forward_nodes and n.op == "call_function" and _passes_values(n)]
    products = {storage_root(n).name: storage_root(n) for n in nodes if _feeds_projection(n)}
    return nodes, products


def _saved_names_and_bytes(fw: GraphModule, num_fwd_outputs: int) -> tuple[set[str], int]:
    """(names of the forward graph's saved tensors, their bytes, each storage once)."""
    outputs = list(next(iter(fw.graph.find_nodes(op="output"))).args[0])
    saved = [n for n in outputs[num_fwd_outputs:] if isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor)]
    roots = {storage_root(n): n for n in saved}
    return {n.name for n in saved}, sum(nbytes(n.meta["val"]) for n in roots.values())


def partition_recomputing_ffn_products(joint: GraphModule, joint_inputs, report: Report, **kwargs
                                       ) -> tuple[GraphModule, GraphModule]:
    """AOTAutograd's min-cut partition, made to recompute the FFN products it saves.
    Where the partition saves `act(gate) * up` (the down projection's input) beside gate and
    up (which the activation's derivative reads anyway, and which this pass compresses), the
    region's pointwise nodes are marked MUST_RECOMPUTE and the joint graph partitioned again:
    backward then recomputes the product from the decompressed gate and up, and a SwiGLU MLP
    keeps two M x F tensors, not three. Kept only where it saves bytes; the bytes it frees
    (the two partitions' saved bytes compared) are reported."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.utils.checkpoint import CheckpointPolicy

    n = kwargs["num_fwd_outputs"]
    fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
    names, before = _saved_names_and_bytes(fw, n)
    # found after the first partition: it replaces joint.graph with a CSE'd copy
    region_nodes, products = ffn_products(joint, n)
    saved_products = [p for name, p in products.items() if name in names]
    if not saved_products:
        return fw, bw
    for node in region_nodes:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    fw2, bw2 = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
    names2, after = _saved_names_and_bytes(fw2, n)
    if after >= before:
        return fw, bw
    for product in saved_products:
        if product.name not in names2:
            report.add(Site(fm.module_path(product), PATTERN, "recomputed",
                            f"ffn_product {_describe(product.meta['val'])}: recomputed in backward from "
                            "the saved gate and up (compressed, where compress_activations is on) instead of saved",
                            {"kind": "ffn_product", "tensor": product.name}))
    report.counters[f"{PATTERN}.recompute_bytes_saved"] += before - after
    report.counters[f"{PATTERN}.bytes_saved"] += before - after
    return fw2, bw2


# ----------------------------------------------------------------------------- the partitioner


def _partitioner_base():
    """CustomPartitionerFn where Inductor has it (torch >= 2.9: compile_fx takes a custom
    partitioner only as an instance of it, through config.custom_partitioner_fn)."""
    try:
        from torch._inductor.custom_graph_pass import CustomPartitionerFn
        return CustomPartitionerFn
    except ImportError:  # pragma: no cover - torch < 2.9, outside the supported range
        return object


class CompressSavedPartitioner(_partitioner_base()):
    """AOTAutograd's min-cut partition (made to recompute the FFN products it would save:
    partition_recomputing_ffn_products), then compress_saved_activations on its two graphs.
    One per compiled graph: it writes that graph's report. `ran` says whether AOTAutograd
    partitioned at all (not for a graph without backward, nor when Inductor's cache
    returned compiled code without partitioning)."""

    def __init__(self, cfg: Config, report: Report):
        self.cfg, self.report, self.ran = cfg, report, False

    def __call__(self, joint: GraphModule, joint_inputs, **kwargs) -> tuple[GraphModule, GraphModule]:
        if self.cfg.compress_activations is CompressMode.NONE and not self.cfg.recomputes_ffn_products:
            from torch._functorch.partitioners import min_cut_rematerialization_partition

            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        else:
            fw, bw = partition_recomputing_ffn_products(joint, joint_inputs, self.report, **kwargs)
        self.ran = True
        compress_saved_activations(fw, bw, kwargs["num_fwd_outputs"], self.cfg, self.report)
        return fw, bw

    def __reduce__(self):
        # Inductor pickles its config into cache keys: what identifies this partitioner is
        # its mode, k, projection and recomputation (uuid adds the code), not the report it writes.
        return (_restored_partitioner, (self.cfg.compress_activations.value, self.cfg.compress_lowrank_k,
                                        self.cfg.compress_lowrank_projection.value, self.cfg.recomputes_ffn_products))

    def uuid(self) -> Any:
        """Inductor's cache key part: the mode, k, projection and the code that rewrites and computes."""
        from torch._inductor.custom_graph_pass import get_hash_for_files

        from ...ops import compress as ops_compress
        from ...kernels import compress

        files = tuple(m.__file__ for m in (compress, ops_compress, rewrite)) + (__file__,)
        return (PATTERN, self.cfg.compress_activations.value, self.cfg.compress_lowrank_k,
                self.cfg.compress_lowrank_projection.value, self.cfg.recomputes_ffn_products,
                get_hash_for_files(files))


def _restored_partitioner(mode: str, k: int, projection: str, recompute: bool = False) -> CompressSavedPartitioner:
    return CompressSavedPartitioner(Config(compress_activations=mode, compress_lowrank_k=k,
                                           compress_lowrank_projection=projection, recompute_ffn_products=recompute,
                                           inner="aot_eager"), Report())
