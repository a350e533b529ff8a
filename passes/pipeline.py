"""The pass pipeline: every enabled FX pass over one Dynamo graph, in order.

The passes find LoRA-fine-tuning patterns and rewrite them into `torch.ops.unsloth.*` calls;
README.md in this folder gives their invariants. This folder has no `__init__.py` on purpose:
a checkout on `sys.path` must never hide an installed distribution named `passes`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import Config, PackedAttention
from ..report import Report
from .attention import keep_attention_fused
from .attention_bias import align_attention_masks
from .broadcast_embedding import lookup_broadcast_rows_once
from .linear_cross_entropy import fuse_linear_cross_entropy
from .lora.lora_linear import fuse_lora_linears
from .packed_attention import mask_packed_sequences

__all__ = ["run_passes"]


def run_passes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], cfg: Config) -> tuple[torch.fx.GraphModule, Report]:
    """Every enabled pass, in order; returns the rewritten graph and the graph's report."""
    report = Report(graphs=1)
    # value-preserving normalisation: a batch spelled without token_type_ids runs as one with them
    gm = lookup_broadcast_rows_once(gm, cfg, report)
    if cfg.fuse_lora:
        gm = fuse_lora_linears(gm, cfg, report)
    # after the LoRA pass: a LoRA head is then seen as one op, and refused
    if cfg.fuse_cross_entropy or cfg.cross_entropy_on_logits:
        gm = fuse_linear_cross_entropy(gm, cfg, report)
    # before the attention pass: causal calls of packed rows get their mask, and the attention
    # pass then leaves them (no enable_gqa on a call with a mask: no fused CUDA kernel takes both)
    if cfg.attention_packed is not PackedAttention.OFF:
        gm = mask_packed_sequences(gm, cfg, report)
    if cfg.attention:
        gm = keep_attention_fused(gm, cfg, report)
        # last: the masks that remain, as the kernels will take them
        gm = align_attention_masks(gm, cfg, report)
    return gm, report
