"""The pass pipeline: every enabled FX pass over one Dynamo graph, in order.

The passes find LoRA-fine-tuning patterns and rewrite them into `torch.ops.unsloth.*` calls;
README.md in this folder gives their invariants. This folder has no `__init__.py` on purpose:
a checkout on `sys.path` must never hide an installed distribution named `passes`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import Config
from ..report import Report
from .attention import keep_attention_fused
from .linear_cross_entropy import fuse_linear_cross_entropy
from .lora_linear import fuse_lora_linears

__all__ = ["run_passes"]


def run_passes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config) -> tuple[torch.fx.GraphModule, Report]:
    """Every enabled pass, in order; returns the rewritten graph and the graph's report."""
    report = Report(graphs=1)
    if cfg.fuse_lora:
        gm = fuse_lora_linears(gm, cfg, report)
    # after the LoRA pass: a LoRA head is then seen as one op, and refused
    if cfg.fuse_cross_entropy or cfg.cross_entropy_on_logits:
        gm = fuse_linear_cross_entropy(gm, cfg, report)
    if cfg.attention:
        gm = keep_attention_fused(gm, cfg, report)
    return gm, report
