"""The `torch.compile` backend registered as "unsloth".

    Dynamo FX graph -> passes.run (rewrite LoRA patterns into torch.ops.unsloth.*) -> inner compiler

Registered twice over: as the `torch_dynamo_backends` entry point `unsloth` (so
`backend="unsloth"` works after `pip install` without importing the package) and with
`register_backend` when `unsloth_compile` is imported.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch._dynamo.backends.registry import register_backend

from . import ops  # noqa: F401  registers torch.ops.unsloth.* before any graph is compiled
from .config import CompressMode, Config, Inner
from .report import publish
from .summary import SummaryLedger, summarize


def unsloth(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
            mode: str | None = None, ledger: SummaryLedger | None = None) -> Callable:
    """`ledger`: whose running totals the one-line summary adds to (one per model compiled by
    `unsloth_compile.compile`); None for the process-wide one."""
    cfg = Config.from_options(options, mode)
    from .passes import run_passes

    gm, report = run_passes(gm, example_inputs, cfg)
    if report.refused:  # under DDP's graph splitting a bucket boundary may have cut a LoRA site
        from .distributed import warn_if_ddp_split

        warn_if_ddp_split(report)
    try:  # published after the inner compile: AOTAutograd's partition adds compress_saved sites
        if cfg.compress_activations is not CompressMode.NONE:  # aot_eager / Inductor, our partitioner
            from .passes.compress_saved import compile_compressed

            return compile_compressed(gm, example_inputs, cfg, report, inductor_patches(cfg))
        return _inner_compile(gm, example_inputs, cfg)
    finally:
        publish(report, log_it=cfg.report)
        if cfg.summary:
            summarize(report, example_inputs, ledger)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config) -> Callable:
    if cfg.inner is Inner.EAGER:
        return gm.forward
    if cfg.inner is Inner.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=inductor_patches(cfg))


def inductor_patches(cfg: Config) -> dict:
    """Inductor config for this backend's mode and options. torch.compile's own mode is not
    seen by a custom backend with options, so the mode's settings (torch's own table,
    `list_mode_options`) are applied here."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(cfg.mode))
    if cfg.mode == "default" and cfg.cudagraphs:
        # Opt-in graphs where the shapes are static; a graph Dynamo made dynamic (a new
        # sequence length each step) runs without, rather than recording a graph per shape.
        patches["triton.cudagraphs"] = True
        patches["triton.cudagraph_skip_dynamic_graphs"] = True
    return patches


def _register_without_entry_point() -> None:
    """`backend="unsloth"` for a checkout on sys.path that was never pip-installed. When the
    entry point exists Dynamo loads it itself, and registering here too would make its
    lookup fail with "duplicate name"."""
    from importlib.metadata import entry_points

    if any(ep.name == "unsloth" for ep in entry_points(group="torch_dynamo_backends")):
        return
    try:
        register_backend(name="unsloth")(unsloth)
    except AssertionError:  # "duplicate name": already registered in this process
        pass


_register_without_entry_point()
