"""The backend's warning for LoRA sites cut by Dynamo's DDP graph splitting.

Under `DistributedDataParallel` Dynamo splits each graph at the gradient buckets' boundaries
(`torch._dynamo.config.optimize_ddp`), and a cut through a LoRA linear leaves two halves that are
no LoRA pattern. The backend sees only the halves; this module tells the user why, once.
`unsloth_compile.distributed.compile_ddp` turns the split off for its wrapper.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

_warned_split = False


def warn_if_ddp_split(report: Any) -> None:
    """Called by the backend for a graph with refused LoRA sites: when Dynamo is splitting the
    graph at DDP's gradient buckets, a cut through a LoRA linear is the likely reason (the
    halves are reported as merged adapters or unrecognised forms). Warns once per process."""
    global _warned_split
    mode = getattr(torch._dynamo.utils, "get_optimize_ddp_mode", lambda: None)()
    active = getattr(DistributedDataParallel, "_get_active_ddp_module", lambda: None)()
    if _warned_split or mode != "ddp_optimizer" or active is None:
        return
    if not any(s.pattern == "lora_linear" for s in report.refused):
        return
    _warned_split = True
    warnings.warn("unsloth_compile: LoRA linears refused while Dynamo splits the graph at DDP's gradient buckets "
                  "(torch._dynamo.config.optimize_ddp): a bucket boundary through a LoRA linear leaves both halves "
                  "unfusable. Wrap the model with unsloth_compile.distributed.compile_ddp (no split), or set "
                  "torch._dynamo.config.optimize_ddp = False", stacklevel=2)
