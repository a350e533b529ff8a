"""Dynamic LoRA rank: resize adapters between optimizer steps; Dynamo recompiles per rank.

    controller = RankController(model, optimizer, policy="loss-decay", window=50)
    ...
    controller.step(loss)            # may grow or shrink adapters (and their optimizer state)

controller.py: the adapters, their resize with the optimizer state, the policies and
`RankController`; peft_config.py: PEFT's LoraConfig kept in step for `save_pretrained`;
callback.py: `RankCallback` for `transformers.Trainer`. Under DDP and FSDP2:
unsloth_compile.distributed. See docs/dynamic-rank.md.
"""

from typing import Any

from .controller import (ImportancePolicy, LoraAdapter, LossDecayPolicy, RankController, Resize, allocate_ranks,
                         find_lora_adapters, plan_grow, plan_shrink, rank_limit, resize, set_rank, sync_peft_config)

__all__ = ["LoraAdapter", "RankController", "RankCallback", "set_rank", "find_lora_adapters", "allocate_ranks",
           "rank_limit", "sync_peft_config", "LossDecayPolicy", "ImportancePolicy", "Resize", "plan_grow",
           "plan_shrink", "resize"]


def __getattr__(name: str) -> Any:
    # RankCallback subclasses transformers.TrainerCallback: built on first use (callback.py)
    if name == "RankCallback":
        from .callback import RankCallback

        return RankCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
