"""Multi-GPU LoRA training with the unsloth backend: DDP over a compiled model, FSDP2 with
per-block compilation, and dynamic rank under both.

    ddp = compile_ddp(model, device_ids=[local_rank])          # model compiled in place, then DDP
    model = shard_lora_model(model, frozen="replicate")         # FSDP2 on each block + root, blocks compiled
    with no_sync(ddp_or_fsdp_model): ...                        # gradient accumulation, either wrapper
    controller = DistributedRankController(ddp, optimizer, ...) # ranks change identically on every rank
    controller = ShardedRankController(model, optimizer, build=..., make_optimizer=...)  # the same under FSDP2

DDP. Every rank holds the whole model; the trainable (LoRA) gradients are all-reduced. The model
is compiled in place (`unsloth_compile.compile`) before DDP wraps it, so `state_dict` keys and
`save_pretrained` stay as they were. Dynamo's DDP graph splitting (`optimize_ddp`) is turned off
for this wrapper's forward: it cuts the graph at gradient-bucket boundaries (measured by the
trainable parameters' bytes in reverse graph order), and a cut through a LoRA linear leaves both
halves unfusable (tests/test_distributed.py forces small buckets: 4 of 14 sites fused with the
split, 14 without). Without the split the whole backward runs as one graph and the all-reduce
of the LoRA gradients (tens of MB for a 1B model) follows it instead of overlapping it.
`split_graphs=True` restores Dynamo's default. CUDA graphs keep the backend's default (on for
static shapes): issued op by op, two processes on one host fell far behind one. `broadcast_buffers`
defaults to False unless a module keeps running statistics: DDP's init already copies rank 0's
buffers, and re-broadcasting constant ones at each forward made every forward wait for the other
rank. `gradient_compression="bf16"` (or "fp16")
all-reduces the gradients in half precision (torch's `bf16_compress_hook`): half the bytes of
PEFT's fp32 LoRA gradients, each bucket's mean rounded to bf16 once. That pays where the
all-reduce is slow, as between two GPUs without NVLink peer access. Figures for each choice:
docs/bench/design-choices.md#ddp-and-fsdp2.

FSDP2 (`torch.distributed.fsdp.fully_shard`, public since torch 2.6; `ignored_params` since 2.7).
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
  so the recorded graphs replay. With "shard" the graphs are off (`_block_cudagraphs`).

Dynamic rank (unsloth_compile.rank) under DDP: `DistributedRankController` averages the window
loss over ranks, takes rank 0's decision everywhere, and after a resize rebuilds the DDP wrapper
(DDP's reducer holds the old Parameters and cannot take new shapes), whose init broadcasts rank
0's parameters (a grow draws random rows from each rank's own RNG) and checks that every rank
has the same shapes. Under FSDP2 the adapters are DTensor shards owned by fully_shard's parameter
groups, which cannot take new shapes in place (`set_rank` on the sharded model refuses), so
`ShardedRankController` rebuilds: whole state gathered, a fresh model from the caller's `build`
loaded, resized as on one process, rank 0's values taken, sharded and compiled again, the
optimizer state carried to a new optimizer through torch.distributed.checkpoint's full state
dicts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..ddp_split import warn_if_ddp_split  # noqa: F401  part of this module's API
from ..rank import RankController
from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile")

__all__ = ["LoraDDP", "compile_ddp", "GRADIENT_COMPRESSION", "rebuild_ddp", "shard_lora_model", "find_blocks",
           "compile_blocks", "fsdp_graphs_replay", "no_sync", "is_fsdp", "DistributedRankController",
           "ShardedRankController", "FROZEN_CHOICES", "warn_if_ddp_split", "trainable_state_dict",
           "init_from_torchrun"]

FROZEN_CHOICES = ("replicate", "shard")
GRADIENT_COMPRESSION = ("none", "bf16", "fp16")

# ----------------------------------------------------------------------------- DDP


def _check_gradient_compression(gradient_compression: str) -> None:
    if gradient_compression not in GRADIENT_COMPRESSION:
        raise UnslothCompileError(f"unsloth_compile.distributed: gradient_compression={gradient_compression!r}; one of "
                                  f"{', '.join(map(repr, GRADIENT_COMPRESSION))}")


class LoraDDP(DistributedDataParallel):
    """`DistributedDataParallel` whose forward compiles without Dynamo's DDP graph splitting
    (unless `split_graphs=True`; see the module docstring). Built by `compile_ddp`; after a rank
    change `rebuild_ddp` replaces it, and the replaced wrapper refuses to run."""

    def __init__(self, module: nn.Module, *args: Any, split_graphs: bool = False, gradient_compression: str = "none",
                 **kwargs: Any):
        _check_gradient_compression(gradient_compression)
        super().__init__(module, *args, **kwargs)
        self._unsloth_split_graphs = split_graphs
        self._unsloth_gradient_compression = gradient_compression
        self._unsloth_init = (args, dict(kwargs))
        self._unsloth_replaced = False
        if gradient_compression != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
            try:
                self.register_comm_hook(self.process_group, hook[gradient_compression])
            except TypeError as error:  # torch's bf16 hook needs a CUDA build with NCCL >= 2.10
                raise UnslothCompileError(f"unsloth_compile.distributed: gradient_compression={gradient_compression!r} "
                                          f"cannot run here ({error}); use 'fp16' or 'none'") from error

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self._unsloth_replaced:
            # a stale object, not a bad input: RuntimeError, as for any use of an object past its life
            raise RuntimeError("unsloth_compile.distributed: this DDP wrapper was replaced after a LoRA rank change "
                               "(its reducer holds the old parameters); use the new one (rebuild_ddp's result, or "
                               "DistributedRankController.ddp)")
        if self._unsloth_split_graphs:
            return super().forward(*inputs, **kwargs)
        # read when Dynamo converts a frame, i.e. at each (re)compilation inside this call
        with torch._dynamo.config.patch(optimize_ddp=False):
            return super().forward(*inputs, **kwargs)


def _block_cudagraphs(options: Optional[Mapping[str, Any]], default: Optional[bool]) -> dict:
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


def _buffers_change_in_forward(model: nn.Module) -> bool:
    """Whether a module updates buffers in its forward in training: normalisations that keep
    running statistics (BatchNorm, InstanceNorm with track_running_stats). Transformer buffers
    (rotary frequencies, position ids) are constants."""
    from torch.nn.modules.batchnorm import _NormBase

    return any(isinstance(m, _NormBase) and m.track_running_stats for m in model.modules())


def compile_ddp(model: nn.Module, options: Optional[Mapping[str, Any]] = None, *, mode: Optional[str] = None,
                split_graphs: bool = False, gradient_compression: str = "none", **ddp_kwargs: Any) -> LoraDDP:
    """Compile `model` in place with the unsloth backend (`unsloth_compile.compile`), then wrap it
    in DDP (`ddp_kwargs`: DistributedDataParallel's, e.g. device_ids=[local_rank]).
    CUDA graphs follow the backend's default (on for static shapes on CUDA; `cudagraphs=False`
    in `options` turns them off). `broadcast_buffers` defaults to False unless a module keeps
    running statistics (BatchNorm): DDP's init already copies rank 0's buffers to every rank,
    and re-broadcasting constant buffers at each forward makes the ranks wait for each other
    there (see the module docstring).
    `gradient_compression`: "none", or "bf16"/"fp16" to all-reduce the gradients in half
    precision (see the module docstring). Call on every rank with the model already on its device."""
    from ..integration import compile as compile_in_place

    _check_gradient_compression(gradient_compression)  # refused before the model is compiled in place
    _require_process_group("compile_ddp")
    if "broadcast_buffers" not in ddp_kwargs:
        ddp_kwargs["broadcast_buffers"] = _buffers_change_in_forward(model)
    compile_in_place(model, options, mode=mode)
    return LoraDDP(model, split_graphs=split_graphs, gradient_compression=gradient_compression, **ddp_kwargs)


def rebuild_ddp(ddp: DistributedDataParallel) -> LoraDDP:
    """A new wrapper over the same module after its parameters changed shape (a LoRA rank change).
    DDP's init checks that every rank has the same shapes and broadcasts rank 0's parameters and
    buffers. The old wrapper must not be used again (a LoraDDP refuses to)."""
    if isinstance(ddp, LoraDDP):
        args, kwargs = ddp._unsloth_init
        new = LoraDDP(ddp.module, *args, split_graphs=ddp._unsloth_split_graphs,
                      gradient_compression=ddp._unsloth_gradient_compression, **kwargs)
        ddp._unsloth_replaced = True
        return new
    return LoraDDP(ddp.module, device_ids=ddp.device_ids, process_group=ddp.process_group)


# ----------------------------------------------------------------------------- FSDP2


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

    options = _block_cudagraphs(options, cudagraphs)
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
    _require_process_group("shard_lora_model")
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


# ----------------------------------------------------------------------------- dynamic rank


def init_from_torchrun(device: str = "auto") -> tuple[torch.device, bool]:
    """This rank's device and, unless the caller made one, the process group: CUDA device
    LOCAL_RANK (as torchrun sets it) with nccl, or the CPU with gloo ("auto": CUDA when
    available). Returns (device, whether the group was created here, for the caller to destroy)."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return where, created


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise UnslothCompileError(f"unsloth_compile.distributed.{what}: torch.distributed is not initialised; call "
                                  "torch.distributed.init_process_group (torchrun sets the environment it reads)")


def _has_sharded_params(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class _AgreedRankController(RankController):
    """What every multi-process controller shares: the policy sees the window's loss averaged
    over all ranks (one all-reduce per window), and a change takes rank 0's ranks and reason on
    every rank (`_agreed`), so all ranks resize at the same steps to the same ranks."""

    def advance(self) -> list:
        if (self.steps + 1) % self.window == 0 and self.policy is not None:
            total = torch.tensor([sum(self._losses), len(self._losses)], dtype=torch.float64,
                                 device=_collective_device())
            dist.all_reduce(total)
            self._losses = [float(total[0] / total[1])] if total[1] > 0 else []
        return super().advance()

    @staticmethod
    def _agreed(ranks: list[int], reason: str) -> tuple[list[int], str]:
        box = [list(ranks), reason]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0], box[1]


class DistributedRankController(_AgreedRankController):
    """A RankController for a model under DDP (see `unsloth_compile.rank`): create it on every rank
    with the DDP wrapper, call `step(loss)` on every rank at the same points, and run the model
    through `controller.ddp`, which is rebuilt after each resize.

    Every rank computes the policy on the loss averaged over ranks (one all-reduce per window),
    then rank 0's decision is broadcast, so all ranks resize at the same steps to the same ranks;
    the rebuilt wrapper broadcasts rank 0's parameters, so the new rows of a grow (drawn from
    each rank's RNG) agree too. Optimizer state migrates identically on each rank: the old
    state was identical (DDP's all-reduced gradients), and new slots are zero."""

    def __init__(self, ddp: DistributedDataParallel, optimizer: Any = None, policy: str = "loss-decay",
                 **kwargs: Any):
        if not isinstance(ddp, DistributedDataParallel):
            if is_fsdp(ddp) or _has_sharded_params(ddp):
                raise UnslothCompileError(_FSDP_RESIZE)
            raise UnslothCompileError("unsloth_compile.distributed.DistributedRankController: expected the DDP "
                                      f"wrapper (compile_ddp's result), got {type(ddp).__name__}; a model without DDP "
                                      "takes unsloth_compile.rank.RankController")
        _require_process_group("DistributedRankController")
        self.ddp = ddp
        super().__init__(ddp.module, optimizer, policy, **kwargs)

    def _change(self, ranks: list[int], reason: str) -> list:
        plans = super()._change(*self._agreed(ranks, reason))
        if plans:
            self.ddp = rebuild_ddp(self.ddp)
        return plans


_FSDP_RESIZE = (
    "unsloth_compile.distributed: DistributedRankController is for DDP; under FSDP2 the adapters are DTensor "
    "shards owned by fully_shard's parameter groups, fixed when it was applied, so LoRA ranks change through "
    "ShardedRankController(model, optimizer, build=..., make_optimizer=...), which rebuilds the sharded model "
    "at the new ranks")


class ShardedRankController(_AgreedRankController):
    """A RankController for a model under `shard_lora_model` (FSDP2). fully_shard fixes each
    block's parameter group when it is applied, so a resize rebuilds the model: every rank
    gathers the whole model and optimizer state (torch.distributed.checkpoint's full state
    dicts), builds a fresh unsharded model with `build()`, loads that state into it, resizes
    it as one process would (`unsloth_compile.rank`, optimizer state migrated), takes rank
    0's values of every trainable parameter (a grow draws new rows from each rank's RNG),
    shards and compiles it again with `shard_lora_model(**shard)`, and gives the migrated
    optimizer state to a new optimizer from `make_optimizer(trainable parameters)`.

    So after a change train through `controller.model` and `controller.optimizer` (new objects;
    the old ones are dropped). Create it on every rank with the same arguments and call
    `step(loss)` on every rank at the same points: decisions are taken on the loss averaged
    over ranks and broadcast from rank 0, as in DistributedRankController.

    build: a callable returning the model as it was before `shard_lora_model` (same
        architecture and LoRA configuration, on this rank's device); its weights are replaced
        by the gathered ones, so how it initialises them does not matter. The RNG state is
        restored after it runs.
    shard: the keyword arguments of the `shard_lora_model` call that sharded `model`
        (frozen=, options=, mp_policy=, ...); `frozen` defaults to the model's.
    Costs of a change: the whole model gathered on every rank next to the sharded one (with
    frozen="shard", the full base in memory for the duration of the change), and the blocks
    compiled again. The "importance" policy reads per-parameter gradient statistics, which
    are shards here: it is refused; "loss-decay" and "manual" are supported. An LR scheduler
    would keep driving the old optimizer: refused too."""

    _sharded_ok = True

    def __init__(self, model: nn.Module, optimizer: Any = None, policy: str = "loss-decay", *,
                 build: Any, make_optimizer: Any, shard: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        if not is_fsdp(model):
            raise UnslothCompileError("unsloth_compile.distributed.ShardedRankController: expected a model sharded by "
                                      f"shard_lora_model, got {type(model).__name__}; under DDP use "
                                      "DistributedRankController")
        if policy == "importance":
            raise UnslothCompileError("unsloth_compile.distributed.ShardedRankController: policy='importance' scores "
                                      "each layer from its gradients, which FSDP2 holds as shards; use 'loss-decay' "
                                      "or 'manual'")
        if kwargs.get("scheduler") is not None:
            raise UnslothCompileError("unsloth_compile.distributed.ShardedRankController: a rank change replaces the "
                                      "optimizer, so an LR scheduler would keep driving the old one; set the learning "
                                      "rate on controller.optimizer yourself")
        if not callable(build) or not callable(make_optimizer):
            raise UnslothCompileError("unsloth_compile.distributed.ShardedRankController: build and make_optimizer "
                                      "must be callables (build() -> the unsharded model, make_optimizer(params) -> "
                                      "optimizer)")
        _require_process_group("ShardedRankController")
        self.build, self.make_optimizer = build, make_optimizer
        self.shard = {"frozen": getattr(model, "_unsloth_fsdp_frozen", "replicate"), **dict(shard or {})}
        super().__init__(model, optimizer, policy, **kwargs)

    def _change(self, ranks: list[int], reason: str) -> list:
        ranks, reason = self._agreed(ranks, reason)
        if tuple(ranks) == self._config():
            return []
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        from ..rank import LoraAdapter

        full = StateDictOptions(full_state_dict=True)
        names = {id(m): n for n, m in self.model.named_modules()}
        slots = [(a.name, names[id(a.module)], a.adapter) for a in self.adapters]
        state = get_model_state_dict(self.model, options=full)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=full) \
            if self.optimizer is not None else None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # a grow's new rows come from the RNG as the caller left it
            model = self.build()
        if is_fsdp(model) or _has_sharded_params(model):
            raise UnslothCompileError("unsloth_compile.distributed.ShardedRankController: build() returned a sharded "
                                      "model; it must return the model as it was before shard_lora_model")
        model.load_state_dict(state)
        del state
        optimizer = None
        if optimizer_state is not None:
            optimizer = self.make_optimizer([p for p in model.parameters() if p.requires_grad])
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)
        modules = dict(model.named_modules())
        self.model, self.optimizer = model, optimizer
        self.adapters = [LoraAdapter(name, modules[path], adapter) for name, path, adapter in slots]
        plans = super()._change(ranks, reason)
        with torch.no_grad():  # rank 0's new rows everywhere (old rows are equal already)
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        if optimizer is not None:
            optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
        shard_lora_model(model, **self.shard)
        if optimizer is not None:
            self.optimizer = self.make_optimizer([p for p in model.parameters() if p.requires_grad])
            set_optimizer_state_dict(model, self.optimizer, optimizer_state, options=full)
        log.info("unsloth_compile.distributed: rebuilt the sharded model at the new LoRA ranks (%s); train through "
                 "controller.model and controller.optimizer", reason)
        return plans


def _collective_device() -> torch.device:
    """Where a small tensor for a collective lives: NCCL needs the current CUDA device."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
