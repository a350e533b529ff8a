"""Dynamic LoRA rank: `RankController` resizes adapters between optimizer steps; Dynamo
recompiles per rank.

    controller = RankController(model, optimizer, policy="loss-decay", window=50)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        controller.step(loss)            # may grow or shrink adapters (and their optimizer state)
        optimizer.zero_grad()

    set_rank(model, 8, modules=["encoder.layer.0.attention.self.query"], optimizer=optimizer)
    Trainer(..., callbacks=[RankCallback(policy="loss-decay", window=50)])

The rank package knows nothing of the compiler. A resize puts new Parameters (and a new scale)
on the module; Dynamo's guards on parameter shapes and on the scale fail, so a compiled model
recompiles once for a rank configuration it has not seen and reuses the cached graph for one it
has (tests/rank/test_rank.py counts frames). Two Dynamo defaults would otherwise defeat this:
- `force_parameter_static_shapes=True` keeps parameter shapes static. When a user turns it
  off, automatic dynamic shapes compile a dynamic-rank graph after the first change; every new
  Parameter is therefore passed to `torch._dynamo.mark_static`, which restores one graph per rank.
- `specialize_float=False` (the default since torch 2.6): after the scale changes once, Dynamo
  passes it as a 0-d tensor input and the graph multiplies by its `.item()`; the LoRA pass
  fuses that form too (the tensor becomes the op's `scale_tensor`), so Dynamo's float
  settings are left as the user has them.
The controller keeps Dynamo's recompile limit large enough for every rank configuration
(recompile_limit.py).

adapters.py: the LoRA layers that can be resized and their bounds; resize.py: the resize itself
and `set_rank`; optimizer_state.py: the optimizer state that follows; policies.py: the automatic
policies; peft_config.py: PEFT's config kept in step for `save_pretrained`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .adapters import ModuleSpec, find_lora_adapters, mark_static_if_needed
from .optimizer_state import torch_optimizer
from .peft_config import sync_after_resize
from .policies import ImportancePolicy, LossDecayPolicy
from .recompile_limit import ensure_recompile_limit, limit_name
from .resize import Resize, resize
from ..errors import UnslothCompileError


class RankController:
    """Changes the rank of LoRA adapters between optimizer steps; see the module docstring.

    policy: "loss-decay" (every `window` steps, grow by 2 or shrink by 1 from init_rank),
    "importance" (per-layer ranks from `importance` scores under `budget`, default
    init_rank x number of adapters) or "manual" (only `set_rank` calls change anything).
    """

    # True in a subclass that resizes FSDP2-sharded adapters by rebuilding the model
    # (unsloth_compile.distributed.ShardedRankController)
    _sharded_ok = False

    def __init__(self, model: nn.Module, optimizer: Any = None, policy: str = "loss-decay",
                 modules: Optional[Iterable[ModuleSpec]] = None, init_rank: int = 4, min_rank: int = 4,
                 max_rank: int = 16, window: int = 50, threshold: float = 0.95, scheduler: Any = None, *,
                 budget: Optional[int] = None, importance: str = "sensitivity", ema: float = 0.85,
                 adapter_name: Optional[str] = None, raise_recompile_limit: bool = True):
        if policy not in ("loss-decay", "importance", "manual"):
            raise UnslothCompileError(f"unsloth_compile.rank: policy={policy!r}; choose 'loss-decay', 'importance' or "
                                      "'manual'")
        if not 1 <= min_rank <= init_rank <= max_rank:
            raise UnslothCompileError("unsloth_compile.rank: need 1 <= min_rank <= init_rank <= max_rank, got "
                                      f"{min_rank}, {init_rank}, {max_rank}")
        if window < 1 or threshold <= 0:
            raise UnslothCompileError(f"unsloth_compile.rank: window={window} must be >= 1 and threshold={threshold} > "
                                      "0")
        self.model, self.policy_name = model, policy
        self.adapters = find_lora_adapters(model, modules, adapter_name, self._sharded_ok)
        self.init_rank, self.min_rank, self.max_rank = init_rank, min_rank, max_rank
        self.window, self.raise_recompile_limit = window, raise_recompile_limit
        self.budget = budget if budget is not None else init_rank * len(self.adapters)
        self.optimizer, self.scheduler = None, None
        self.attach(optimizer, scheduler)
        self.policy = (LossDecayPolicy(threshold) if policy == "loss-decay"
                       else ImportancePolicy(importance, ema) if policy == "importance" else None)
        self.global_rank = init_rank
        self.steps, self.window_losses, self._losses = 0, [], []
        self.events: list[dict] = []  # {"step", "ranks", "reason"} for every change
        self._base_limit = getattr(torch._dynamo.config, limit_name())
        self._seen_limits: dict[str, int] = {}
        self._configs = {self._config()}
        if policy == "loss-decay":  # every configuration it can reach, known up front
            self._configs |= {tuple(min(r, a.limit) for a in self.adapters) for r in range(min_rank, max_rank + 1)}
        self._ensure_limit()
        for adapter in self.adapters:
            mark_static_if_needed(adapter.A)
            mark_static_if_needed(adapter.B)
        if policy != "manual":
            self._change([min(init_rank, a.limit) for a in self.adapters], "init_rank")

    def attach(self, optimizer: Any = None, scheduler: Any = None) -> None:
        """Bind the optimizer whose state follows the parameters (and the LR scheduler, which
        keeps working because param_groups are edited in place; it must drive that optimizer)."""
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        self.scheduler = scheduler if scheduler is not None else self.scheduler
        if self.scheduler is not None and self.optimizer is not None:
            sched_opt = getattr(getattr(self.scheduler, "scheduler", self.scheduler), "optimizer", None)
            if sched_opt is not None and torch_optimizer(sched_opt) is not torch_optimizer(self.optimizer):
                raise UnslothCompileError("unsloth_compile.rank: the scheduler drives another optimizer than the "
                                          "controller's; build the scheduler on the optimizer passed to the "
                                          "controller")

    @property
    def ranks(self) -> dict[str, int]:
        return {a.name: a.rank for a in self.adapters}

    def _config(self) -> tuple[int, ...]:
        return tuple(a.rank for a in self.adapters)

    def _ensure_limit(self) -> None:
        # each rank configuration needs its own graph, in train and in eval mode, on top of the
        # graphs the user's own code needed before (the limit they had). The controller raises
        # the limits only while they still hold the values it last saw: a value the user set
        # since wins, and is warned about if too low.
        config = torch._dynamo.config
        names = (limit_name(), limit_name("accumulated_"))
        untouched = all(getattr(config, n) == self._seen_limits.get(n, getattr(config, n)) for n in names)
        n = len(self._configs)
        ensure_recompile_limit(self._base_limit + 2 * n, 2 * n, self.raise_recompile_limit and untouched)
        self._seen_limits = {n: getattr(config, n) for n in names}

    def _change(self, ranks: list[int], reason: str) -> list[Resize]:
        config = tuple(ranks)
        if config == self._config():
            return []
        plans = resize(self.adapters, ranks, self.optimizer)  # a ValueError changes nothing
        sync_after_resize(self.model, plans)  # so that save_pretrained writes the new ranks
        self._configs.add(config)
        self._ensure_limit()  # before the next forward compiles; warns if the user lowered it
        self.events.append({"step": self.steps, "ranks": dict(self.ranks), "reason": reason})
        return plans

    def set_rank(self, r: int, modules: Optional[Iterable[ModuleSpec]] = None) -> list[Resize]:
        """Manual change through the controller (keeps its bookkeeping): rank r for `modules`
        (default: all of the controller's adapters)."""
        chosen = None
        if modules is not None:
            chosen = {(id(a.module), a.adapter) for a in find_lora_adapters(self.model, modules,
                                                                                sharded_ok=self._sharded_ok)}
            unknown = chosen - {(id(a.module), a.adapter) for a in self.adapters}
            if unknown:
                raise UnslothCompileError("unsloth_compile.rank: `modules` names LoRA layers this controller does not "
                                          "manage")
        ranks = [r if chosen is None or (id(a.module), a.adapter) in chosen else a.rank for a in self.adapters]
        return self._change(ranks, "manual")

    # --- the training-loop side

    def record_loss(self, loss: Union[float, Tensor, None]) -> None:
        if loss is not None:
            self._losses.append(float(loss.detach()) if isinstance(loss, Tensor) else float(loss))

    def observe_gradients(self) -> None:
        """Accumulate importance scores while gradients exist (after backward, before zero_grad)."""
        if isinstance(self.policy, ImportancePolicy):
            self.policy.observe(self.adapters)

    def advance(self) -> list[Resize]:
        """One optimizer step done; at the end of a window, let the policy decide."""
        self.steps += 1
        if self.steps % self.window or self.policy is None:
            return []
        fresh = bool(self._losses)
        if fresh:
            self.window_losses.append(sum(self._losses) / len(self._losses))
            self._losses = []
        if isinstance(self.policy, LossDecayPolicy):
            if not fresh:  # no loss recorded in this window (e.g. Trainer logging_steps > window)
                return []
            r = self.policy.decide(self)
            if r is None:
                return []
            self.global_rank = r
            return self._change([min(r, a.limit) for a in self.adapters], "loss-decay")
        return self._change(self.policy.decide(self), f"importance ({self.policy.importance})")

    def step(self, loss: Union[float, Tensor, None] = None) -> list[Resize]:
        """Call after optimizer.step() (before zero_grad for the sensitivity score)."""
        self.record_loss(loss)
        self.observe_gradients()
        return self.advance()
