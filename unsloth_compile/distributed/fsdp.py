"""FSDP2 (`torch.distributed.fsdp.fully_shard`, public since torch 2.6; `ignored_params` since 2.7).
`fully_shard` is applied to each transformer block (the classes in transformers'
`_no_split_modules`, or the `blocks` given), then to the root. Each block is compiled in place
after it is sharded: FSDP2's hooks run outside the compiled graph (they are
`torch._dynamo.disable`d), and inside it the block's parameters are the plain unsharded tensors,
so the LoRA pass sees the same graph as on one GPU. With `compile_head` (the default) the LM head
and loss after the blocks are compiled too (`_compile_after_blocks`); embeddings and final norm
run eagerly. `frozen` chooses what happens to the frozen base weights:
- "shard": every parameter is sharded; the frozen base is all-gathered before each block's
  forward and again in backward (communication: the whole base, twice per step). Pays when the
  base does not fit on one GPU.
- "replicate": the frozen parameters are `ignored_params` of fully_shard: every rank keeps the
  whole base, as under DDP, and only the trainable parameters, their gradients and their
  optimizer state are sharded (communication: the adapters only). `MixedPrecisionPolicy` then
  casts only the trainable parameters: store the base in the dtype it should compute in.
  The blocks keep the backend's CUDA-graph default (on for static shapes): only the small
  unsharded adapters are allocated anew each step, at the same addresses in steady state,
  so the recorded graphs replay. With "shard" the graphs are off (`block_cudagraphs`).
A 4-bit base (Nf4Linear, bitsandbytes Linear4bit) is replicated: its codes are buffers, which
fully_shard does not shard, so frozen="shard" refuses such a model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UnslothCompileError
from ..nf4.linear import is_four_bit
from .process_group import require_process_group

log = logging.getLogger("unsloth_compile")

FROZEN_CHOICES = ("replicate", "shard")



def block_cudagraphs(options: Optional[Mapping[str, Any]], default: Optional[bool]) -> dict:
    """`options` with cudagraphs=`default` unless the caller chose. FSDP2 all-gathers each
    sharded parameter into new storage at every unshard, and a recorded graph reads its
    parameters at the addresses it was recorded with: cudagraph trees notice a move and
    re-record (correct, but several times slower than no graphs at all), so blocks whose frozen
    base is sharded run without graphs. With the base replicated only the adapters move, and in
    steady state FSDP2's allocations repeat step after step, so the graphs replay and the step
    is faster than without them (docs/bench/design-choices.md#ddp-and-fsdp2)."""
    options = dict(options or {})
    if default is not None:
        options.setdefault("cudagraphs", default)
    return options


def fsdp_graphs_replay(frozen: str, reshard_after_forward: Optional[bool]) -> bool:
    """Whether the per-block CUDA graphs replay under shard_lora_model with these choices: only
    where the unsharded parameters come back at the addresses the graphs were recorded with.
    frozen="shard" re-records every step, and so does frozen="replicate" with
    reshard_after_forward=False, whose unshards fall elsewhere in the step's allocations;
    "replicate" with FSDP2's default replays (docs/bench/design-choices.md#ddp-and-fsdp2)."""
    return frozen == "replicate" and reshard_after_forward is not False


def find_blocks(model: nn.Module, blocks: Optional[Iterable[Union[str, nn.Module]]] = None) -> list[nn.Module]:
    """The modules FSDP2 shards (and compiles) one by one: `blocks` (modules or qualified names),
    or every module whose class is in a transformers `_no_split_modules` (the decoder layers)."""
    named = dict(model.named_modules())
    if blocks is not None:
        found = []
        for spec in blocks:
            if isinstance(spec, nn.Module):
                if not any(m is spec for m in named.values()):
                    raise UnslothCompileError(f"unsloth_compile.distributed: block {type(spec).__name__} is not part "
                                              "of the model")
                found.append(spec)
            elif spec in named:
                found.append(named[spec])
            else:
                raise UnslothCompileError(f"unsloth_compile.distributed: the model has no module named {spec!r}; pass "
                                          "blocks= as names from model.named_modules() or as modules")
        return found
    classes = set()
    for module in named.values():
        classes |= set(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in named.values() if type(m).__name__ in classes]
    if not found:
        raise UnslothCompileError("unsloth_compile.distributed: no transformer block found (no module class listed in "
                                  "a transformers `_no_split_modules`); pass blocks=[...] (e.g. model.model.layers)")
    return found


def compile_blocks(blocks: Sequence[nn.Module], options: Optional[Mapping[str, Any]] = None, *,
                   mode: Optional[str] = None, cudagraphs: Optional[bool] = False,
                   head_of: Optional[nn.Module] = None) -> None:
    """Compile each block in place with the unsloth backend; one summary line for all of them.
    `cudagraphs` is the CUDA-graph setting unless `options` has one: False (the default) for
    blocks whose parameters FSDP2 re-gathers into new storage each step, None for the backend's
    own default (on for static shapes), which pays where only small adapters move.
    `head_of`: the model the blocks belong to; what its forward runs after the blocks (the LM
    head and the loss of a transformers model) is compiled too (`_compile_after_blocks`)."""
    from ..backend import unsloth
    from ..config import Config
    from ..summary import SummaryLedger

    options = block_cudagraphs(options, cudagraphs)
    Config.from_options(options, mode)  # a bad option fails now, not at the first forward
    backend = functools.partial(unsloth, options=options, mode=mode, ledger=SummaryLedger())
    for block in blocks:
        block.compile(backend=backend)
    if head_of is not None:
        _compile_after_blocks(head_of, blocks, backend)


def _stack_and_owner(model: nn.Module, blocks: Sequence[nn.Module]) -> Optional[tuple[str, str]]:
    """(qualified name of the module whose forward runs the blocks, name of the module that calls
    it), e.g. ("base_model.model.model", "base_model.model") for a PEFT Llama: the blocks'
    common container, or the module holding their ModuleList; None when the blocks do not sit
    in one container or that container is the model itself (nothing runs around it)."""
    names = {id(m): n for n, m in model.named_modules()}
    parents = {names[id(b)].rpartition(".")[0] for b in blocks if id(b) in names}
    if len(parents) != 1:
        return None
    stack = parents.pop()
    modules = dict(model.named_modules())
    if isinstance(modules.get(stack), (nn.ModuleList, nn.Sequential)) and stack:
        stack = stack.rpartition(".")[0]
    if not stack:
        return None
    return stack, stack.rpartition(".")[0]


def _compile_after_blocks(model: nn.Module, blocks: Sequence[nn.Module], backend) -> bool:
    """Compile the forward of the module that calls the blocks' stack (a transformers
    `...ForCausalLM`), with the stack's own forward left to eager (`torch.compiler.disable`: the
    compiled blocks inside it keep their graphs, FSDP2's hooks stay outside every graph). Dynamo
    breaks the graph at the stack's call and compiles what follows it, the LM head and the loss,
    as on one GPU: Inductor's fused log-softmax instead of eager's fp32 copy of the logits and
    separate passes (faster with the base replicated or sharded: docs/bench/design-choices.md#ddp-and-fsdp2).
    Returns False, with a warning, where the model's
    layout is not recognised (then only the blocks are compiled)."""
    found = _stack_and_owner(model, blocks)
    if found is None:
        log.warning("unsloth_compile.distributed: the blocks do not sit in one container inside the model, so "
                    "what runs around them is not compiled (only the blocks are); pass compile_head=False to "
                    "silence this")
        return False
    modules = dict(model.named_modules())
    stack, owner = modules[found[0]], modules[found[1]]
    stack.forward = torch.compiler.disable(stack.forward)
    owner.forward = torch.compile(owner.forward, backend=backend)
    log.info("unsloth_compile.distributed: %s compiled around its eager %s (the head and loss after the blocks)",
             found[1] or type(model).__name__, found[0])
    return True


def _disable_kv_cache(model: nn.Module) -> None:
    """Set `use_cache=False` on the transformers configs inside `model`. With the cache on, a
    transformers model hands each block a cache object whose per-layer state Dynamo guards on,
    so every block of a per-block compile recompiles until the recompile limit (8) leaves the
    rest of the blocks eager (measured: 56 of 112 LoRA sites fused on llama-1b). Training does
    not read the cache."""
    changed = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True and id(config) not in changed:
            config.use_cache = False
            changed.add(id(config))
    if changed:
        log.warning("unsloth_compile.distributed: set config.use_cache=False (a KV cache makes every compiled block "
                    "recompile on its per-layer state; training does not use it)")


def _frozen_params(module: nn.Module) -> set[nn.Parameter]:
    return {p for p in module.parameters() if not p.requires_grad}


def shard_lora_model(model: nn.Module, mesh: Any = None, *, frozen: str = "replicate", compile: bool = True,
                     options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None,
                     blocks: Optional[Iterable[Union[str, nn.Module]]] = None, mp_policy: Any = None,
                     reshard_after_forward: Optional[bool] = None, compile_head: bool = True) -> nn.Module:
    """FSDP2 over a LoRA model, in place: `fully_shard` on each block, then on the root; each block
    compiled in place with the unsloth backend when `compile`, and with `compile_head` what runs
    after the blocks (LM head and loss; `_compile_after_blocks`). `frozen="replicate"` keeps the
    frozen base whole on every rank and shards only the trainable parameters (and so their
    gradients and optimizer state); `frozen="shard"` shards everything (see the module docstring).
    `mesh`, `mp_policy` (a MixedPrecisionPolicy) and `reshard_after_forward` go to fully_shard
    (None: its defaults). Call on every rank, with the model on its device, before building the
    optimizer (the optimizer must see the sharded parameters). Returns `model`."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if frozen not in FROZEN_CHOICES:
        raise UnslothCompileError(f"unsloth_compile.distributed: frozen={frozen!r}; choose 'replicate' (frozen base on "
                                  "every rank, adapters sharded) or 'shard' (everything sharded)")
    if frozen == "shard" and (four_bit := next((n for n, m in model.named_modules() if is_four_bit(m)), None)):
        raise UnslothCompileError(
            f"unsloth_compile.distributed: frozen='shard' cannot shard the 4-bit base ({four_bit}): its NF4 codes and "
            "statistics are buffers, which fully_shard leaves whole on every rank (sharding the packed weights, "
            "FSDP-QLoRA, is not supported); use frozen='replicate' (every rank keeps the whole 4-bit base, the "
            "adapters are sharded)")
    require_process_group("shard_lora_model")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise UnslothCompileError("unsloth_compile.distributed: the model is already sharded (fully_shard was "
                                  "applied); call shard_lora_model on an unsharded model")
    if not any(p.requires_grad for p in model.parameters()):
        raise UnslothCompileError("unsloth_compile.distributed: the model has no trainable parameter; add LoRA "
                                  "adapters (peft.get_peft_model) before shard_lora_model")
    found = find_blocks(model, blocks)
    kwargs: dict = {"mesh": mesh, "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    for block in found:
        fully_shard(block, ignored_params=_frozen_params(block) if frozen == "replicate" else None, **kwargs)
    fully_shard(model, ignored_params=_frozen_params(model) if frozen == "replicate" else None, **kwargs)
    if compile:
        _disable_kv_cache(model)
        graphs_replay = fsdp_graphs_replay(frozen, reshard_after_forward)
        if not graphs_replay and (options or {}).get("cudagraphs") is True:
            warnings.warn(f"unsloth_compile.distributed: cudagraphs=True with frozen={frozen!r}"
                          f"{', reshard_after_forward=False' if reshard_after_forward is False else ''}: FSDP2's "
                          "unsharded parameters move between steps, so every block's graph re-records at each "
                          "step (several times slower than without graphs); graphs replay with "
                          "frozen='replicate' and the default reshard_after_forward", stacklevel=2)
        compile_blocks(found, options, mode=mode, cudagraphs=None if graphs_replay else False,
                       head_of=model if compile_head else None)
    model._unsloth_fsdp_frozen = frozen  # for the report of a benchmark, and the rank check
    log.info("unsloth_compile.distributed: fully_shard on %d blocks and the root, frozen base %s%s", len(found),
             "replicated" if frozen == "replicate" else "sharded", ", blocks compiled" if compile else "")
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation: inside, backward accumulates local gradients without communication
    (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`); the first backward after it
    syncs the sum. Under FSDP2 the accumulated gradients are kept unsharded until then."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if not is_fsdp(model):
        raise UnslothCompileError("unsloth_compile.distributed.no_sync: expected a DDP or fully_shard model, got "
                                  f"{type(model).__name__}")
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters) as whole tensors on the CPU, keyed as the model
    names them (without DDP's `module.`): what `peft_model.save_pretrained(dir, state_dict=...)`
    takes on rank 0. Under FSDP2 it all-gathers the shards: call it on every rank."""
    from torch.distributed.tensor import DTensor

    module = model.module if isinstance(model, DistributedDataParallel) else model
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    return out
