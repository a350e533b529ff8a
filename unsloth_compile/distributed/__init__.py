"""Multi-GPU LoRA training with the unsloth backend: DDP over a compiled model, FSDP2 with
per-block compilation, and dynamic rank under both.

    ddp = compile_ddp(model, device_ids=[local_rank])          # model compiled in place, then DDP
    model = shard_lora_model(model, frozen="replicate")         # FSDP2 on each block + root, blocks compiled
    with no_sync(ddp_or_fsdp_model): ...                        # gradient accumulation, either wrapper
    controller = DistributedRankController(ddp, optimizer, ...) # ranks change identically on every rank
    controller = ShardedRankController(model, optimizer, build=..., make_optimizer=...)  # the same under FSDP2

ddp.py: DDP over a compiled model; fsdp.py: FSDP2 with per-block compilation; rank_sync.py:
dynamic rank under both; tensor_parallel.py, dtensor_sharding.py: tensor parallelism (DTensor);
pipeline.py: pipeline stages and schedules; process_group.py: the process group. See
docs/multi-gpu.md.
"""

from ..ddp_split import warn_if_ddp_split
from .ddp import GRADIENT_COMPRESSION, LoraDDP, compile_ddp, rebuild_ddp
from .fsdp import (FROZEN_CHOICES, compile_blocks, find_blocks, fsdp_graphs_replay, is_fsdp, no_sync, shard_lora_model,
                   trainable_state_dict)
from .process_group import init_from_torchrun
from .rank_sync import DistributedRankController, ShardedRankController

__all__ = ["LoraDDP", "compile_ddp", "GRADIENT_COMPRESSION", "rebuild_ddp", "shard_lora_model", "find_blocks",
           "compile_blocks", "fsdp_graphs_replay", "no_sync", "is_fsdp", "DistributedRankController",
           "ShardedRankController", "FROZEN_CHOICES", "warn_if_ddp_split", "trainable_state_dict",
           "init_from_torchrun"]
