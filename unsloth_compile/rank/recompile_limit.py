"""Dynamo's per-frame graph limits, sized for the rank configurations a controller produces.

Each rank configuration needs its own graph (Dynamo's guards on parameter shapes and on the
scale fail after a resize), in train and in eval mode. The recompile limit (`recompile_limit`,
`cache_size_limit` before torch 2.6/2.7; both names are tried) is raised to what the controller
can produce; a setting too low to hold every rank's graph is reported with `warnings.warn`,
because Dynamo would silently run the model eagerly.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("unsloth_compile")


def limit_name(suffix: str = "") -> str:
    """`recompile_limit` (torch >= 2.6/2.7) or its former name `cache_size_limit`."""
    config = torch._dynamo.config
    new, old = f"{suffix}recompile_limit", f"{suffix}cache_size_limit"
    return new if hasattr(config, new) else old


def ensure_recompile_limit(target: int, minimum: int, raise_limit: bool) -> None:
    """Raise Dynamo's per-frame graph limits to `target` when allowed; otherwise warn when they
    are below `minimum`, where Dynamo would give up on the frame and run it eagerly."""
    config = torch._dynamo.config
    for name in (limit_name(), limit_name("accumulated_")):
        current = getattr(config, name)
        if raise_limit and current < target:
            setattr(config, name, target)
            log.info("unsloth_compile.rank: raised torch._dynamo.config.%s %d -> %d", name, current, target)
        elif current < minimum:
            hit = ("raise an error" if getattr(config, "fail_on_recompile_limit_hit", False)
                   else "stop compiling it and run it eagerly (no unsloth fusion)")
            warnings.warn(
                f"unsloth_compile.rank: torch._dynamo.config.{name}={current} is below the {minimum} graphs "
                f"per frame that these LoRA ranks need ({minimum // 2} rank configurations, train and eval); "
                f"once a frame holds {current} graphs Dynamo will {hit}. Fix: set "
                f"torch._dynamo.config.{name} = {target} (or leave it to "
                f"RankController(raise_recompile_limit=True), and do not lower it afterwards).", stacklevel=4)
