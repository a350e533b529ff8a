"""DDP over a compiled model (`compile_ddp`). Every rank holds the whole model; the trainable (LoRA) gradients are all-reduced. The model
is compiled in place (`unsloth_compile.compile`) before DDP wraps it, so `state_dict` keys and
`save_pretrained` stay as they were. Dynamo's DDP graph splitting (`optimize_ddp`) is turned off
for this wrapper's forward: it cuts the graph at gradient-bucket boundaries (measured by the
trainable parameters' bytes in reverse graph order), and a cut through a LoRA linear leaves both
halves unfusable (tests/distributed/test_distributed.py forces small buckets: 4 of 14 sites fused with the
split, 14 without). Without the split the whole backward runs as one graph and the all-reduce
of the LoRA gradients (tens of MB for a 1B model) follows it instead of overlapping it.
`split_graphs=True` restores Dynamo's default. CUDA graphs keep the backend's default (on for
static shapes): issued op by op, two processes on one host fell far behind one. `broadcast_buffers`
defaults to False unless a module keeps running statistics: DDP's init already copies rank 0's
buffers, and re-broadcasting constant ones at each forward made every forward wait for the other
rank. `gradient_compression="bf16"` (or "fp16") all-reduces the gradients in half precision (torch's `bf16_compress_hook`): half the bytes of
PEFT's fp32 LoRA gradients, each bucket's mean rounded to bf16 once. That pays where the
all-reduce is slow, as between two GPUs without NVLink peer access. Figures for each choice:
docs/bench/design-choices.md#ddp-and-fsdp2.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UnslothCompileError
from .process_group import require_process_group

log = logging.getLogger("unsloth_compile")

GRADIENT_COMPRESSION = ("none", "bf16", "fp16")



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
    require_process_group("compile_ddp")
    if "broadcast_buffers" not in ddp_kwargs:
        ddp_kwargs["broadcast_buffers"] = _buffers_change_in_forward(model)
    # fixed per-step shapes, which DDP's graph splitting and CUDA graphs are set up for: no length buckets
    compile_in_place(model, {"bucket_lengths": False, **dict(options or {})}, mode=mode)
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
