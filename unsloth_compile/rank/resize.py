"""Resizing LoRA adapters: `plan_grow` and `plan_shrink` compute the new factors, `resize` puts
them on the modules with the optimizer state along (optimizer_state.py), `set_rank` is the
manual policy.

What a resize preserves:
- grow r -> r': new rows of A are Kaiming-uniform (PEFT's init), new columns of B are zero and
  the old columns of B are multiplied by scale_old / scale_new: the function is unchanged.
- shrink r -> r': the top r' singular directions of scale_old * B A are kept, sqrt(S) split
  between B and A, so the output changes by at most the discarded singular-value energy.
  Directions with a zero singular value (B = 0 at init) are re-initialised like a grow.
After every resize of PEFT layers, `set_rank` (and the controller) write the ranks into PEFT's
LoraConfig (peft_config.py), so that `save_pretrained` + `PeftModel.from_pretrained` rebuild the
same model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .adapters import LoraAdapter, ModuleSpec, find_lora_adapters
from .optimizer_state import check_state, migrate_param_state, torch_optimizer
from .peft_config import sync_after_resize
from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile")


@dataclasses.dataclass
class Resize:
    """A planned resize of one adapter, computed before anything is changed."""

    adapter: LoraAdapter
    old_rank: int
    new_rank: int
    A: Tensor
    B: Tensor
    kind: str  # "grow" or "shrink"
    b_factor: float = 1.0  # grow: old columns of B were multiplied by this
    discarded: float = 0.0  # shrink: Frobenius norm of the dropped part of scale * B A


def _kaiming_rows(rows: int, in_features: int, like: Tensor) -> Tensor:
    """Rows of A as PEFT initialises them: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(in))."""
    out = torch.empty(rows, in_features, dtype=torch.float32, device=like.device)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5))
    return out


def plan_grow(adapter: LoraAdapter, r: int) -> Resize:
    A, B = adapter.A.detach().float(), adapter.B.detach().float()
    factor = adapter.scale / adapter.scale_for(r)  # keeps scale * B A unchanged
    A_new = torch.cat([A, _kaiming_rows(r - A.shape[0], A.shape[1], A)], 0)
    B_new = torch.cat([B * factor, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
    return Resize(adapter, adapter.rank, r, A_new, B_new, "grow", b_factor=factor)


def plan_shrink(adapter: LoraAdapter, r: int) -> Resize:
    """Top-r SVD of B A through two thin QRs (cost O((in + out) r^2), never an out x in SVD)."""
    work = torch.float64 if adapter.A.device.type == "cpu" else torch.float32
    A, B = adapter.A.detach().to(work), adapter.B.detach().to(work)
    q_b, r_b = torch.linalg.qr(B)  # (out, r0), (r0, r0)
    q_a, r_a = torch.linalg.qr(A.T)  # (in, r0), (r0, r0)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    U, V = q_b @ u, q_a @ vh.T  # B A = U diag(s) V^T
    ratio = adapter.scale / adapter.scale_for(r)  # B'A' = ratio * top-r part, so scale' B'A' matches
    root = (ratio * s[:r]).sqrt()
    B_new = U[:, :r] * root
    A_new = root[:, None] * V[:, :r].T
    # a zero singular value carries nothing (B = 0 at init): re-initialise that direction as a
    # grow would, or A' = B' = 0 there and it could never learn again
    dead = s[:r] <= s[0] * 1e-6 if s[0] > 0 else torch.ones(r, dtype=torch.bool, device=s.device)
    if bool(dead.any()):
        A_new[dead] = _kaiming_rows(int(dead.sum()), A.shape[1], A).to(work)
        B_new[:, dead] = 0
    dropped = torch.cat([s[r:], s[:r][dead]])
    discarded = adapter.scale * float(dropped.square().sum().sqrt())
    return Resize(adapter, adapter.rank, r, A_new.float(), B_new.float(), "shrink", discarded=discarded)


def _apply(plans: Sequence[Resize], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    for plan in plans:
        old_A, old_B = plan.adapter.A, plan.adapter.B
        for opt in optimizers:  # validate every state before any parameter changes
            check_state(opt, old_A, plan.adapter.name)
            check_state(opt, old_B, plan.adapter.name)
    for plan in plans:
        old_A, old_B = plan.adapter.A, plan.adapter.B
        new_A, new_B = plan.adapter.replace(plan.A, plan.B)
        for opt in optimizers:
            migrate_param_state(opt, old_A, new_A, plan.kind == "grow", 0, 1.0)
            migrate_param_state(opt, old_B, new_B, plan.kind == "grow", 1, plan.b_factor)


def resize(adapters: Sequence[LoraAdapter], ranks: Sequence[int], optimizer: Any = None) -> list[Resize]:
    """Resize each adapter to its rank (all validated first: a ValueError changes nothing)."""
    for adapter, r in zip(adapters, ranks):
        # the policies clamp to adapter.limit themselves; this bound is the one a manual rank has
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= adapter.max_rank:
            raise UnslothCompileError(f"unsloth_compile.rank: rank {r!r} for {adapter.name} is outside [1, "
                                      f"{adapter.max_rank}] (in_features={adapter.in_features}, "
                                      f"out_features={adapter.out_features}: a rank above the smaller side adds "
                                      "nothing to B A); choose a rank in that range")
    opts = [o for o in (torch_optimizer(optimizer),) if o is not None]
    plans = []
    with torch.no_grad():
        for adapter, r in zip(adapters, ranks):
            if r > adapter.rank:
                plans.append(plan_grow(adapter, r))
            elif r < adapter.rank:
                plans.append(plan_shrink(adapter, r))
        _apply(plans, opts)
    for plan in plans:
        log.info("unsloth_compile.rank: %s rank %d -> %d (%s%s)", plan.adapter.name, plan.old_rank,
                 plan.new_rank, plan.kind, f", discarded {plan.discarded:.3g}" if plan.kind == "shrink" else "")
    return plans


def set_rank(model: nn.Module, r: int, modules: Optional[Iterable[ModuleSpec]] = None,
             optimizer: Any = None, adapter_name: Optional[str] = None) -> list[Resize]:
    """Manual policy: set every selected LoRA adapter to rank `r` (see the module docstring for
    what is preserved), moving `optimizer`'s state along. Returns the resizes performed. Sets
    nothing in Dynamo's config: the recompile limit is the caller's to size (a RankController
    with policy="manual" raises it)."""
    adapters = find_lora_adapters(model, modules, adapter_name)
    plans = resize(adapters, [r] * len(adapters), optimizer)
    sync_after_resize(model, plans)
    return plans
