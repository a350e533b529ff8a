"""Dynamic LoRA rank: resize adapters between optimizer steps; Dynamo recompiles per rank.

    controller = RankController(model, optimizer, policy="loss-decay", window=50)
    ...
    controller.step(loss)            # may grow or shrink adapters (and their optimizer state)

controller.py: `RankController`; adapters.py: the LoRA layers that can be resized; resize.py:
the resize and `set_rank`; optimizer_state.py: the optimizer state that follows it; policies.py:
the automatic policies; recompile_limit.py: Dynamo's graph limits sized for the ranks;
peft_config.py: PEFT's LoraConfig kept in step for `save_pretrained`; callback.py:
`RankCallback` for `transformers.Trainer`. Under DDP and FSDP2:
unsloth_compile.distributed. See docs/dynamic-rank.md.
"""

from typing import Any

from .adapters import LoraAdapter, find_lora_adapters, rank_limit
from .controller import RankController
from .peft_config import sync_peft_config
from .policies import ImportancePolicy, LossDecayPolicy, allocate_ranks
from .resize import Resize, plan_grow, plan_shrink, resize, set_rank

__all__ = ["LoraAdapter", "RankController", "RankCallback", "set_rank", "find_lora_adapters", "allocate_ranks",
           "rank_limit", "sync_peft_config", "LossDecayPolicy", "ImportancePolicy", "Resize", "plan_grow",
           "plan_shrink", "resize"]


def __getattr__(name: str) -> Any:
    # RankCallback subclasses transformers.TrainerCallback: built on first use (callback.py)
    if name == "RankCallback":
        from .callback import RankCallback

        return RankCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
