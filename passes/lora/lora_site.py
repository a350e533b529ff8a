"""What the LoRA linear pass matches: the base linear, each adapter, and the site they make.

Shared by the pass (lora_linear.py) and the base strategies it hands a site to (fp8_linear.py,
sparse24_linear.py, nf4_linear.py, lora_adapter_groups.py), which import these types from here rather than
from the pass that uses them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.fx import Node

from . import lora_autocast


@dataclasses.dataclass
class BaseLinear:
    x: Node
    weight: Node
    bias: Optional[Node]
    weight_transposed: bool
    nodes: list[Node]  # matched nodes, erased after the rewrite if unused
    weight_scale: Optional[Node] = None  # set: an Fp8Linear, `weight` its e4m3 codes (fp8_linear.py)
    sparse24: Optional[tuple] = None  # set: a Sparse24Linear's (compressed, layout) (sparse24_linear.py)
    # set: an Nf4Linear, `weight` its packed codes; (absmax codes, absmax scale, absmax offset, N, K,
    # weight dtype) (nf4_linear.py)
    nf4: Optional[tuple] = None


@dataclasses.dataclass
class Adapter:
    source: Node  # the tensor the adapter reads, before dropout (a cast of the layer input, or it)
    lora_x: Optional[Node]  # dropout output, when there is one
    A: Node  # parameter, (r, K), or (K, r) when A_in_out
    A_in_out: bool
    B: Node  # parameter, (N, r), or (r, N) when B_in_out
    B_in_out: bool
    B_bias: Optional[Node]
    scale: float
    scale_tensor: Optional[Node]
    dropout_p: float
    nodes: list[Node]
    term: Node  # the adapter's summand: [scale *] B(A(h))
    a_output: Node  # A's projection, whose dtype is the one the adapter computes in
    b_output: Node  # B's projection

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return lora_autocast.output_dtype(self.a_output)


@dataclasses.dataclass
class LoraSite:
    base: BaseLinear
    adapters: list[Adapter]
    sum_node: Node  # the outermost add of base + adapters
    last: Node  # the node whose value the op replaces (sum, its cast, or the residual add)
    out_dtype: torch.dtype
    residual: Optional[Node]
    chain: list[Node]  # the adds (and cast/residual add) that the op replaces
    # Adapters whose summands stay graph nodes (they read another tensor than `adapters`)
    # and reach the op as its residual; the op then returns the sum before any cast.
    extras: list[Adapter] = dataclasses.field(default_factory=list)
    dropout_scale: Optional[float] = None  # set: the single adapter's dropout goes in as its mask
    fp8: Optional[str] = None  # set: the base runs in fp8 (fp8_linear.STORED or PER_CALL)
    sparse24: Optional[str] = None  # set: the base runs on its compressed 2:4 weight
    nf4: Optional[str] = None  # set: the base runs on its 4-bit NF4 weight
