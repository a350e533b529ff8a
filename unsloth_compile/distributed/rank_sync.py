"""Dynamic rank (unsloth_compile.rank) under DDP: `DistributedRankController` averages the window
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

import logging
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UnslothCompileError
from ..rank import RankController
from .ddp import rebuild_ddp
from .fsdp import is_fsdp, shard_lora_model
from .process_group import collective_device, require_process_group

log = logging.getLogger("unsloth_compile")



def has_sharded_params(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class _AgreedRankController(RankController):
    """What every multi-process controller shares: the policy sees the window's loss averaged
    over all ranks (one all-reduce per window), and a change takes rank 0's ranks and reason on
    every rank (`_agreed`), so all ranks resize at the same steps to the same ranks."""

    def advance(self) -> list:
        if (self.steps + 1) % self.window == 0 and self.policy is not None:
            total = torch.tensor([sum(self._losses), len(self._losses)], dtype=torch.float64,
                                 device=collective_device())
            dist.all_reduce(total)
            self._losses = [float(total[0] / total[1])] if total[1] > 0 else []
        return super().advance()

    @staticmethod
    def _agreed(ranks: list[int], reason: str) -> tuple[list[int], str]:
        box = [list(ranks), reason]
        dist.broadcast_object_list(box, src=0, device=collective_device())
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
            if is_fsdp(ddp) or has_sharded_params(ddp):
                raise UnslothCompileError(_FSDP_RESIZE)
            raise UnslothCompileError("unsloth_compile.distributed.DistributedRankController: expected the DDP "
                                      f"wrapper (compile_ddp's result), got {type(ddp).__name__}; a model without DDP "
                                      "takes unsloth_compile.rank.RankController")
        require_process_group("DistributedRankController")
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
        require_process_group("ShardedRankController")
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
        if is_fsdp(model) or has_sharded_params(model):
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
