"""The optimizer state of a resized adapter (Adam/AdamW exp_avg, exp_avg_sq, max_exp_avg_sq,
step; SGD momentum_buffer; other per-element tensors alike) follows its parameters:
- grow: old slots kept, new slots zero, `step` kept; B's moments divided by the same factor as
  B (gradients w.r.t. the rescaled B are divided by it; second moments by its square).
- shrink: the parameter's moments are reset to zero and `step` to 0. The SVD re-bases the
  factors (each new row of A mixes all old rows with weights S^-1/2), so per-coordinate second
  moments have no meaning in the new basis; the first moment could be projected exactly, but an
  exp_avg that does not match its exp_avg_sq gives oversized updates. A reset with step 0 lets
  Adam's bias correction restart cleanly; SGD with a zero buffer and dampening 0 takes exactly
  the step of a fresh buffer.
The new Parameters replace the old ones at the same index of the same param_group, so hyper-
parameters and any LR scheduler (which edits the group dicts) keep working.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError

QUADRATIC_STATE = ("exp_avg_sq", "max_exp_avg_sq")  # moments of g**2: scale with the factor squared


def torch_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """Unwrap accelerate's AcceleratedOptimizer and similar wrappers."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_state(optimizer: torch.optim.Optimizer, param: Tensor, name: str) -> None:
    for key, value in optimizer.state.get(param, {}).items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
            raise UnslothCompileError(f"unsloth_compile.rank: {name}: optimizer state {key!r} has shape "
                                      f"{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}; "
                                      f"{type(optimizer).__name__} state cannot be migrated")


def migrate_param_state(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor, grew: bool, dim: int,
                        factor: float) -> None:
    """Move `old`'s state to `new` and swap it in its param_group: after a grow along `dim` the
    old moments, divided by `factor`, fill the first slots; after a shrink they are reset."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if not state:
        return
    migrated = {}
    for key, value in state.items():
        if key == "step":
            migrated[key] = value if grew else (
                torch.zeros_like(value) if isinstance(value, Tensor) else 0)
        elif isinstance(value, Tensor) and value.shape == old.shape:
            fresh = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
            if grew:
                power = 2 if key in QUADRATIC_STATE else 1
                keep = fresh.narrow(dim, 0, old.shape[dim])
                keep.copy_(value / factor ** power)
            migrated[key] = fresh
        else:
            migrated[key] = value
    optimizer.state[new] = migrated
