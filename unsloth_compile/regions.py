"""Regional compilation (option `compile_regions="layers"` of `unsloth_compile.compile`): each
repeated block of a model compiled once for all the blocks of its class, the rest compiled
around them.

Why: compiled as one graph, a model is traced, partitioned and lowered layer after layer, and the
first step's compile time grows with the depth. The decoder layers of a model are modules of one
class run one after the other; Dynamo hands their parameters to the graph as inputs
(`inline_inbuilt_nn_modules`), so one compiled graph can serve every layer of a class.

What it does, for `target` (the module `unsloth_compile.compile` compiles):
- `find_block_lists`: the outermost `nn.ModuleList`s holding two or more modules of one class with
  parameters (Llama/Qwen2/Mistral `model.layers`, BERT `encoder.layer`, GPT-2 `h`, through PEFT's
  wrappers), and the module holding each list (its "holder": `LlamaModel`, `BertEncoder`, ...).
- each block's call (`block._compiled_call_impl`, as `nn.Module.compile` sets it) goes through one
  `torch.compile`d function per block class, called with the block as an argument: Dynamo guards
  on what the blocks share, not on the block, and compiles one graph per class and kind of input
  (static, then dynamic shapes; the first block, whose input needs no gradient, gets its own).
  A function of its own code object per class keeps each class within Dynamo's recompile limit,
  which counts compiles per code object, and names the class in `TORCH_LOGS=recompiles`.
- the holder's `forward` is wrapped in `torch.compiler.disable`, and `target` is compiled with the
  unsloth backend as in `compile_regions="model"`: Dynamo stops at the holder's call and compiles
  what comes before and after it (an encoder's embeddings and a classifier head; a causal LM's
  head and loss, where the fused cross-entropy applies), without tracing the layers again. The
  holder's own code outside its blocks runs in eager: for a decoder-only transformers model that
  is the token embedding, the rotary table, the attention mask and the final norm. Where the
  holder is `target` itself (a TRL backbone, a base model compiled alone), that is all there is
  around the blocks, and `target` is not compiled whole.
- in training (`target.training`), a call that does not say `use_cache` gets `use_cache=False`
  where the model's forward takes it: transformers' key/value cache is indexed by layer
  (`cache.update(..., self.layer_idx)`), which would make every layer a graph of its own. A block
  called with a cache all the same (generation, an explicit `use_cache=True`) runs uncompiled,
  said once on the `unsloth_compile.summary` logger.

What is lost against one graph: passes that span a block's boundary see one side only (a mask
built outside the blocks reaches them as a tensor, as in eager); `fullgraph=True` applies to the
blocks (the rest is compiled around a graph break by construction).

Where no repeated block is found, `compile_layers` says why (the report, a `UserWarning`) and
returns None: the caller compiles the whole model.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import types
import warnings
from typing import Any, Callable, Optional

import torch

from .length_buckets import current_dynamic_length
from .report import Report, Site, publish

PATTERN = "compile_regions"
# Keyword arguments of a block call that carry a key/value cache (transformers' names across versions).
BLOCK_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")

log = logging.getLogger("unsloth_compile.summary")


@dataclasses.dataclass(frozen=True)
class BlockList:
    """A ModuleList of repeated blocks, the module holding it, and their paths in the model."""

    path: str
    holder_path: str
    holder: torch.nn.Module
    blocks: tuple[torch.nn.Module, ...]

    def classes(self) -> collections.Counter:
        return collections.Counter(type(b).__name__ for b in self.blocks)


def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_block_lists(model: torch.nn.Module) -> list[BlockList]:
    """The outermost ModuleLists of `model` with two or more children of one class that holds
    parameters (lists inside a block, such as a mixture of experts, belong to that block)."""
    found: list[BlockList] = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        if not isinstance(module, torch.nn.ModuleList) or not path:
            continue
        if any(path.startswith(f.path + ".") for f in found):
            continue
        children = list(module.children())
        counts = collections.Counter(type(c) for c in children if _has_parameters(c))
        if not counts or max(counts.values()) < 2:
            continue
        holder_path = path.rpartition(".")[0]
        found.append(BlockList(path, holder_path, modules[holder_path], tuple(children)))
    return found


def mark_token_axes(value: Any, length: int, depth: int = 0) -> None:
    """Mark as dynamic (`maybe_mark_dynamic`) the token axes of length `length` in the tensors of
    `value` (tensors, and tensors inside tuples, lists and dicts such as a ModelOutput), by the
    layouts transformers' blocks pass: axis 1 of (batch, tokens, ...) tensors (hidden states,
    rotary tables, position ids), axes 2 and 3 of a (batch, heads, tokens, tokens) mask, axis 0 of
    a (tokens,) cache position. The last axis of a 3-D tensor is a width, never marked, even when
    it equals the length. A mark that does not hold specialises the graph, it never fails."""
    if isinstance(value, torch.Tensor):
        axes = []
        if value.dim() == 1 and value.shape[0] == length:
            axes.append(0)
        if value.dim() >= 2 and value.shape[1] == length:
            axes.append(1)
        if value.dim() == 4:
            axes += [axis for axis in (2, 3) if value.shape[axis] == length]
        for axis in axes:
            torch._dynamo.maybe_mark_dynamic(value, axis)
    elif depth < 3 and isinstance(value, (tuple, list)):
        for item in value:
            mark_token_axes(item, length, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            mark_token_axes(item, length, depth + 1)


def _run_block(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # `self`, as in Module._call_impl: Dynamo names the block's submodules as in a compile of the
    # block itself (`self_attn.q_proj`), which the report and the summary match to the model's paths
    return self._call_impl(*args, **kwargs)


def region_function(cls: type) -> Callable:
    """`_run_block` under a code object of its own, named after the block class."""
    name = f"{cls.__name__}_region"
    code = _run_block.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python >= 3.11
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, _run_block.__globals__, name)


class BlockCall:
    """A block's compiled call: the compiled function of its class, with the block as argument;
    a call with a key/value cache runs the block uncompiled (said once per class)."""

    def __init__(self, block: torch.nn.Module, compiled: Callable, told: set):
        self.block = block
        self.compiled = compiled
        self._told = told  # shared by the blocks of one class

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any(kwargs.get(name) is not None for name in BLOCK_CACHE_ARGUMENTS):
            name = type(self.block).__name__
            if name not in self._told:
                self._told.add(name)
                log.info("unsloth_compile: compile_regions='layers': %s blocks called with a key/value cache "
                         "(generation, use_cache=True) run uncompiled: the cache is updated per layer, which would "
                         "compile one graph per layer", name)
            return self.block._call_impl(*args, **kwargs)
        length = current_dynamic_length()
        if length is not None:  # lengths vary: one graph for every length, compiled at the first
            mark_token_axes((args, kwargs), length)
        return self.compiled(self.block, *args, **kwargs)


def takes_use_cache(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward (or that of the model a PEFT wrapper holds) names `use_cache`."""
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        if candidate is None:
            continue
        try:
            if "use_cache" in inspect.signature(candidate.forward).parameters:
                return True
        except (TypeError, ValueError):  # a forward without a signature
            continue
    return False


def without_cache_in_training(model: torch.nn.Module, call: Callable) -> Callable:
    """`call` with `use_cache=False` added to training calls that do not pass `use_cache`."""
    if not takes_use_cache(model):
        return call

    def run(*args: Any, **kwargs: Any) -> Any:
        if model.training and "use_cache" not in kwargs:
            kwargs["use_cache"] = False
        return call(*args, **kwargs)

    return run


def _compile_blocks(block_list: BlockList, compiled_by_class: dict, backend: Callable, fullgraph: bool,
                    dynamic: Optional[bool]) -> None:
    told: set = set()
    for block in block_list.blocks:
        cls = type(block)
        if cls not in compiled_by_class:
            compiled_by_class[cls] = torch.compile(region_function(cls), backend=backend, fullgraph=fullgraph,
                                                   dynamic=dynamic)
        block._compiled_call_impl = BlockCall(block, compiled_by_class[cls], told)


def _holder_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    outputs = type(self).forward(self, *args, **kwargs)
    length = current_dynamic_length()
    if length is not None:  # the graph around the holder (head, loss) is dynamic at once too
        mark_token_axes(outputs, length)
    return outputs


_HOLDER_FORWARD = torch.compiler.disable(
    _holder_forward, reason="unsloth_compile compile_regions='layers': the blocks inside are compiled as regions")
_HOLDER_FORWARD._unsloth_region_holder = True


def _leave_out_of_graph(holder: torch.nn.Module) -> None:
    """The holder's forward run outside every graph (torch.compiler.disable): an outer compile
    stops at its call. A method bound to the holder, so that copy.deepcopy rebinds it to the copy;
    an instance-level forward set before (a hook's) is wrapped as it is."""
    own = holder.__dict__.get("forward")
    if getattr(own, "_unsloth_region_holder", False) or getattr(getattr(own, "__func__", None),
                                                                   "_unsloth_region_holder", False):
        return
    if own is not None:
        wrapped = torch.compiler.disable(own, reason="unsloth_compile compile_regions='layers'")
        wrapped._unsloth_region_holder = True
        holder.forward = wrapped
        return
    holder.forward = types.MethodType(_HOLDER_FORWARD, holder)


def _describe(block_lists: list[BlockList], target: torch.nn.Module, outer: bool) -> str:
    parts = []
    for bl in block_lists:
        classes = ", ".join(f"{n} {name}" for name, n in bl.classes().items())
        parts.append(f"{classes} blocks of {bl.path or '(model)'}")
    holders = ", ".join(sorted({type(bl.holder).__name__ for bl in block_lists}))
    rest = (f"the rest of {type(target).__name__} compiled around them; {holders} outside its blocks runs in eager"
            if outer else f"{holders} outside its blocks runs in eager")
    return f"{'; '.join(parts)} compiled once per block class; {rest}"


def compile_layers(target: torch.nn.Module, backend: Callable, *, fullgraph: bool = False,
                   dynamic: Optional[bool] = None, report_it: bool = True, summary: bool = True
                   ) -> Optional[Callable]:
    """Compile `target`'s repeated blocks as regions (see the module docstring) and return the
    call to install as `target`'s compiled call: `target` compiled around its blocks, or its own
    call where `target` holds the blocks directly. None, said in the report and a warning, where
    `target` has no repeated block."""
    report = Report()
    block_lists = find_block_lists(target)
    if not block_lists:
        why = (f"no repeated block in {type(target).__name__}: no nn.ModuleList holds two or more modules of one "
               f"class with parameters; the whole model is compiled as one graph (compile_regions='model')")
        report.add(Site(module="(model)", pattern=PATTERN, decision="refused", reason=why))
        publish(report, log_it=report_it)
        warnings.warn(f"unsloth_compile: compile_regions='layers' refused: {why}", UserWarning, stacklevel=3)
        return None
    compiled_by_class: dict = {}
    for bl in block_lists:
        _compile_blocks(bl, compiled_by_class, backend, fullgraph, dynamic)
    outer = all(bl.holder is not target for bl in block_lists)
    if outer:
        for bl in block_lists:
            _leave_out_of_graph(bl.holder)
        # fullgraph=False: Dynamo must stop at the holders' calls
        call = torch.compile(target._call_impl, backend=backend, fullgraph=False, dynamic=dynamic)
    else:
        call = target._call_impl
    said = _describe(block_lists, target, outer)
    for bl in block_lists:
        report.add(Site(module=bl.path, pattern=PATTERN, decision="compiled", reason=said,
                        details={"blocks": len(bl.blocks), "holder": bl.holder_path}))
    publish(report, log_it=report_it)
    if summary:
        log.info("unsloth_compile: compile_regions='layers': %s", said)
    return without_cache_in_training(target, call)
