"""The `torch.compile` backend registered as "unsloth".

    Dynamo FX graph -> passes.run (rewrite LoRA patterns into torch.ops.unsloth.*) -> inner compiler

Registered twice over: as the `torch_dynamo_backends` entry point `unsloth` (so
`backend="unsloth"` works after `pip install` without importing the package) and with
`register_backend` when `unsloth_compile` is imported.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch._dynamo.backends.registry import register_backend

from . import ops  # noqa: F401  registers torch.ops.unsloth.* before any graph is compiled
from .config import CompileRegions, CompressMode, Config, Fp8Layers, Inner
from .checkpoint_tracing import configure as configure_checkpoint_tracing
from .checkpoint_tracing import ignore_transformers_warning_once, log_settings_once
from .errors import UnslothCompileError
from .graph_breaks import running_model
from .report import Report, publish
from .summary import SummaryLedger, begin, ledger_or_process, summarize


def unsloth(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
            mode: str | None = None, ledger: SummaryLedger | None = None) -> Callable:
    """`ledger`: whose running totals the one-line summary adds to (one per model compiled by
    `unsloth_compile.compile`); None for the process-wide one."""
    cfg = Config.from_options(options, mode)
    if cfg.compile_regions is CompileRegions.LAYERS:  # the backend is handed graphs, not the model's layers
        raise UnslothCompileError(
            "unsloth_compile: compile_regions='layers' is an option of unsloth_compile.compile(model, ...) and the "
            "Trainer callback, which compile each repeated block once; torch.compile(model, backend='unsloth') "
            "compiles the model it is given as a whole: drop the option, or use unsloth_compile.compile")
    ignore_transformers_warning_once()  # for the traces after this one, when transformers came later
    log_settings_once()
    if cfg.summary:
        begin(running_model(), ledger)
    from .passes.pipeline import run_passes

    gm, report = run_passes(gm, example_inputs, cfg)
    if cfg.fp8_layers is Fp8Layers.ALL:
        _warn_if_nothing_converted(gm)
    if report.refused:  # under DDP's graph splitting a bucket boundary may have cut a LoRA site
        from .ddp_split import warn_if_ddp_split

        warn_if_ddp_split(report)
    try:  # published after the inner compile: AOTAutograd's partition adds compress_saved sites
        compiled = _inner_compile(gm, example_inputs, cfg, report)
        return ledger_or_process(ledger).watch(compiled) if cfg.summary else compiled  # ends the warm-up
    finally:
        publish(report, log_it=cfg.report)
        if cfg.summary:
            summarize(report, example_inputs, ledger)


def _warn_if_nothing_converted(gm: torch.fx.GraphModule) -> None:
    """fp8_layers="all" acts where modules are converted (unsloth_compile.compile,
    unsloth_compile.fp8.convert), not in the backend: say so when this graph still multiplies
    by dense weights outside LoRA sites and runs no converted (fp8) linear of its own."""
    fp8_linear = (torch.ops.unsloth.fp8_linear, torch.ops.unsloth.fp8_linear.default)
    dense = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
    targets = {node.target for node in gm.graph.nodes if node.op == "call_function"}
    if any(t in targets for t in dense) and not any(t in targets for t in fp8_linear):
        warnings.warn(
            "unsloth_compile: fp8_layers='all' but this graph's linears outside LoRA layers are not in fp8: "
            "the backend does not convert modules. Use unsloth_compile.compile(model, precision='fp8', "
            "fp8_layers='all'), or unsloth_compile.fp8.convert(model, select=unsloth_compile.fp8.frozen_linears) "
            "before torch.compile", stacklevel=2)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config,
                   report: Report | None = None) -> Callable:
    if cfg.inner is Inner.EAGER:
        return gm.forward
    if cfg.compress_activations is not CompressMode.NONE or cfg.recomputes_ffn_products:  # our partitioner
        from .compressed_compile import compile_compressed

        report = report if report is not None else Report()
        patches = inductor_patches(cfg, example_inputs, report, gm)
        compiled = compile_compressed(gm, example_inputs, cfg, report, patches)
        graphed = cfg.inner is Inner.INDUCTOR and patches.get("triton.cudagraphs")
        return keep_outputs_across_replays(compiled) if graphed else compiled
    if cfg.inner is Inner.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_patches(cfg, example_inputs, report, gm)
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return keep_outputs_across_replays(compiled) if patches.get("triton.cudagraphs") else compiled


# Ops that read device values on the host while they run: a CUDA graph cannot capture them.
_HOST_SYNCING_OPS = ("packed_attention",)


def host_syncing_op(gm: torch.fx.GraphModule | None) -> str | None:
    """The name of an op of the graph that syncs with the host, if any."""
    if gm is None:
        return None
    for node in gm.graph.nodes:
        # an OpOverload prints as unsloth.packed_attention.default, its packet without .default
        if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            name = str(node.target)
            if any(name.split(".")[:2] == ["unsloth", op] for op in _HOST_SYNCING_OPS):
                return f"torch.ops.{name}"
    return None


def cudagraphs_decision(cfg: Config, example_inputs: Sequence[Any] | None,
                        gm: torch.fx.GraphModule | None = None) -> tuple[bool, str]:
    """(run this graph as CUDA graphs, why) for the default mode; other modes bring their own
    setting (torch's table). See Config.cudagraphs and Config.bucket_lengths."""
    if cfg.cudagraphs is False:
        return False, "cudagraphs=False"
    syncing = host_syncing_op(gm)
    if syncing is not None:
        # even when asked for: capturing a host sync fails, and the backend never lets it
        return False, f"{syncing} reads sequence boundaries on the host"
    if cfg.cudagraphs is True:
        return True, "cudagraphs=True"
    if cfg.compress_activations is CompressMode.LOWRANK:
        return False, "compress_activations='lowrank' draws its projection on the host each step"
    if example_inputs is None:
        return False, "graph inputs unknown"
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if not any(x.device.type == "cuda" for x in tensors):
        return False, "no CUDA inputs"
    if any(isinstance(x, torch.SymInt) for x in example_inputs) or any(
            isinstance(d, torch.SymInt) for x in tensors for d in (*x.shape, *x.stride())):
        # One recording per shape: padding-free or variable-length batches would record without
        # end, and even a run's bounded set of length buckets records each bucket it meets (a
        # step several times a replay's cost) for as long as new buckets come, which outweighs
        # what the replays save (docs/real-data.md). Such graphs run as plain Inductor code;
        # cudagraphs=True still records them.
        return False, "dynamic shapes"
    return True, "static shapes on CUDA"


def inductor_patches(cfg: Config, example_inputs: Sequence[Any] | None = None,
                     report: Report | None = None, gm: torch.fx.GraphModule | None = None) -> dict:
    """Inductor config for this backend's mode and options. torch.compile's own mode is not
    seen by a custom backend with options, so the mode's settings (torch's own table,
    `list_mode_options`) are applied here; in the default mode, CUDA graphs per
    `cudagraphs_decision` (counted in the report as cudagraphs.on / cudagraphs.off: why)."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(cfg.mode))
    if cfg.mode == "default":
        use, why = cudagraphs_decision(cfg, example_inputs, gm)
        if use:
            # Plain cudagraph trees, as mode="reduce-overhead" has them. Not
            # cudagraph_skip_dynamic_graphs: with graph partitioning (torch >= 2.9) it cut
            # a LoRA model's graph into partitions around the LoRA ops, which then ran from
            # Python between replays, far slower (docs/bench/design-choices.md#cuda-graphs).
            patches["triton.cudagraphs"] = True
        if report is not None:
            report.counters["cudagraphs.on" if use else f"cudagraphs.off ({why})"] += 1
    elif patches.get("triton.cudagraphs") and (syncing := host_syncing_op(gm)) is not None:
        patches["triton.cudagraphs"] = False  # the mode's CUDA graphs cannot capture a host sync
        if report is not None:
            report.counters[f"cudagraphs.off ({syncing} reads sequence boundaries on the host)"] += 1
    return patches


# Leaf tensors (trainable parameters) that are inputs of graphs run as CUDA graphs, by id:
# weak references, so that a model that is deleted takes its parameters with it.
_GRAPH_LEAVES: dict[int, weakref.ref] = {}


def _register_graph_leaves(inputs) -> None:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad:
            _GRAPH_LEAVES[id(t)] = weakref.ref(t, lambda _, key=id(t): _GRAPH_LEAVES.pop(key, None))


def _move_kept_grads() -> None:
    """Replace each registered leaf's `.grad` by a copy outside the CUDA-graph pool, unless it
    is already the copy made here (a weak reference on the tensor remembers it)."""
    for ref in list(_GRAPH_LEAVES.values()):
        t = ref()
        if t is None or t.grad is None:
            continue
        copy = getattr(t, "_unsloth_grad_copy", None)  # weak: no gradient kept alive by it
        if copy is None or copy() is not t.grad:
            with torch.no_grad():
                grad = t.grad.clone()
            t.grad = grad
            t._unsloth_grad_copy = weakref.ref(grad)


def keep_outputs_across_replays(compiled: Callable) -> Callable:
    """`compiled` (CUDA graphs on) made safe for what training loops keep across steps.

    A replay overwrites the graph pool that held the previous step's outputs, and cudagraph
    trees raise when such an overwritten tensor is read. Two things a loop keeps are moved out
    of the pool:
    - 0-d outputs (a loss): copied at each call, one tiny kernel, so that `loss.detach()`
      kept to average or log later stays valid. Large outputs (logits) stay in the pool, as
      Inductor leaves them.
    - gradients kept across a forward (gradient accumulation): the first backward's gradients
      are pool outputs that AccumulateGrad stored as `.grad`, and the next forward would
      overwrite them (the gradient-accumulation test fails with cudagraph trees' error).
      Before a call, every leaf tensor that is an input of any graph run so (not only of
      this one: the first graph of a step starts a new generation of the trees, which makes
      every earlier output stale) and whose `.grad` was not yet copied gets a copy outside the
      pool, once per accumulation window (later backwards add into it).
    """
    def copy_scalars(outputs):
        if not isinstance(outputs, (list, tuple)):
            return outputs
        copied = [o.clone() if isinstance(o, torch.Tensor) and o.dim() == 0 and o.is_cuda else o
                  for o in outputs]
        return type(outputs)(copied) if isinstance(outputs, tuple) else copied

    registered = False

    def run(*args):  # the caller's convention, boxed (one list) or not, passed through as is
        nonlocal registered
        if not registered:
            _register_graph_leaves(args[0] if len(args) == 1 and isinstance(args[0], list) else args)
            registered = True
        _move_kept_grads()
        return copy_scalars(compiled(*args))

    if hasattr(compiled, "_boxed_call"):
        run._boxed_call = compiled._boxed_call
    return run


def _register_without_entry_point() -> None:
    """`backend="unsloth"` for a checkout on sys.path that was never pip-installed. When the
    entry point exists Dynamo loads it itself, and registering here too would make its
    lookup fail with "duplicate name"."""
    from importlib.metadata import entry_points

    if any(ep.name == "unsloth" for ep in entry_points(group="torch_dynamo_backends")):
        return
    try:
        register_backend(name="unsloth")(unsloth)
    except AssertionError:  # "duplicate name": already registered in this process
        pass


_register_without_entry_point()
configure_checkpoint_tracing()  # before anything is traced: torch.compile(backend="unsloth") imports this module
