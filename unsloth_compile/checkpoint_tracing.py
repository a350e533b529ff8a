"""Dynamo settings that keep checkpointed transformer layers inside the compiled graph.

Dynamo traces a checkpointed region (`torch.utils.checkpoint`, which transformers'
`gradient_checkpointing_enable()` puts around each decoder layer) as one higher-order op. Two
things found in transformers' layers make it give that op up and run the whole layer eagerly,
so that none of its LoRA linears reaches the backend:

- A Python side effect inside the region. The `kernels` package's `use_kernelized_func`
  wrapper (transformers puts it on attention classes when `kernels` is installed) sets and
  resets a module-level routing variable around every attention forward; under compile that
  is a mutation of an object from outside the region, which Dynamo refuses by default because
  eager checkpointing would run it again while recomputing the layer in backward.
  `skip_fwd_side_effects_in_bwd_under_checkpoint` lets Dynamo trace it and apply the
  mutation once. Under compile the backward recomputation is the graph's (AOTAutograd
  recomputes tensors, never Python code), so what is given up is only the second run of a
  Python side effect; the kernels wrapper's is a set followed by its reset.
- transformers' `logger.warning_once` (`logging.Logger.warning_once`, patched in by
  transformers), which Dynamo cannot trace. Added to Dynamo's `ignore_logging_functions`:
  inside compiled code the call is dropped (the message is not printed), as Dynamo's own
  hint suggests.

Both are process-wide Dynamo settings, set when `unsloth_compile` is imported (which
`torch.compile(..., backend="unsloth")` does before tracing) and listed by `settings()`; the
first compile logs them on the `unsloth_compile` logger and docs/trainer.md lists them. A user who
wants Dynamo's default back sets
`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = False` after the import.
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger("unsloth_compile")

SIDE_EFFECTS_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
# transformers.utils.logging patches this onto Logger. One function only: torch 2.11 logs its
# config with `sorted()` over this set, which fails once the set holds two functions, which do
# not order.
_ONCE_FUNCTIONS = ("warning_once",)

_applied: dict[str, str] = {}
_refused: set[str] = set()  # functions this torch cannot take into the set (see below)
_logged = False


def ignored_logging_functions():
    """Dynamo's set of ignored logging functions (renamed in torch 2.13; the old name aliases it)."""
    config = torch._dynamo.config
    for name in ("ignore_logging_functions", "ignore_logger_methods"):
        if hasattr(config, name):
            return getattr(config, name)
    return None


def ignore_transformers_warning_once() -> None:
    """Add transformers' `Logger.warning_once` to Dynamo's ignored logging functions,
    once transformers' logging module is loaded (importing transformers for it would cost
    seconds at `import unsloth_compile`). Called at import and by the backend for every graph:
    when transformers is imported after unsloth_compile, the traces after the first graph
    benefit."""
    if "transformers.utils.logging" not in sys.modules:
        return
    ignored = ignored_logging_functions()
    if ignored is None:
        return
    for name in _ONCE_FUNCTIONS:
        function = getattr(logging.Logger, name, None)
        if function is None or function in ignored or name in _refused:
            continue
        ignored.add(function)
        if config_logging_works():
            _applied[f"torch._dynamo.config.ignore_logging_functions += Logger.{name}"] = (
                "transformers' once-only logging is not traceable: a graph break")
        else:
            # torch 2.11 writes this set into its compile metrics as JSON, which a function
            # (transformers' lru_cache-wrapped warning_once) is not: every compile would log a
            # traceback. Left out there, at the cost of a graph break where a layer calls it.
            ignored.discard(function)
            _refused.add(name)
            log.info("unsloth_compile: Logger.%s is not added to Dynamo's ignored logging functions on torch %s "
                     "(its compile metrics cannot record it); a layer that calls it breaks the graph there",
                     name, torch.__version__)


def config_logging_works() -> bool:
    """Whether Dynamo can still write its config into its compile metrics (JSON)."""
    dump = getattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", None)
    if dump is None:
        return True
    try:
        dump()
    except TypeError:
        return False
    return True


def configure() -> None:
    """Apply the settings (at `import unsloth_compile`)."""
    config = torch._dynamo.config
    if hasattr(config, SIDE_EFFECTS_FLAG) and not getattr(config, SIDE_EFFECTS_FLAG):
        setattr(config, SIDE_EFFECTS_FLAG, True)
        _applied[f"torch._dynamo.config.{SIDE_EFFECTS_FLAG} = True"] = (
            "Python side effects inside checkpointed layers (the kernels package's attention wrapper) "
            "would make Dynamo run those layers eagerly")
    ignore_transformers_warning_once()


def settings() -> dict[str, str]:
    """The Dynamo settings this package changed, each with why."""
    return dict(_applied)


def log_settings_once() -> None:
    """Log the changed settings at INFO on the first compile."""
    global _logged
    if _logged or not _applied:
        return
    _logged = True
    log.info("unsloth_compile: Dynamo settings changed so that checkpointed layers compile: %s",
             "; ".join(f"{setting} ({why})" for setting, why in _applied.items()))
