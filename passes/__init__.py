"""FX passes over Dynamo graphs: find LoRA-fine-tuning patterns, rewrite them into
`torch.ops.unsloth.*` calls. See README.md in this folder for the invariants."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import Config
from ..report import Report
from .attention import keep_attention_fused
from .linear_cross_entropy import fuse_linear_cross_entropy
from .lora_linear import fuse_lora_linears

__all__ = ["run_passes", "fuse_lora_linears", "keep_attention_fused", "fuse_linear_cross_entropy"]


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
