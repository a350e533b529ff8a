"""The frozen base of a fused LoRA linear stored in 4-bit NF4 (QLoRA): pattern, check,
replacement. passes/lora/lora_linear.py calls these for each LoRA site it matches and fuses.

Pattern: the site's base is `torch.ops.unsloth.nf4_linear(x, packed, absmax_codes, absmax_scale,
  absmax_offset, N, K, weight_dtype, b, impl)`, an `Nf4Linear` made by `unsloth_compile.nf4.convert`
  (from a dense layer, or taken over from a bitsandbytes Linear4bit). Under autocast the
  Nf4Linear casts x itself; the cast is peeled so that the adapters, which read the uncast x,
  match. Such a site is fused over its 4-bit base whatever the options: there is no dense weight
  left.
Check: none beyond the LoRA site's own: `convert` stores only what the kernels take (K a multiple
  of 64), so a stored base always passes. A dense-looking base whose weight is a torchao
  NF4Tensor (not taken over before compiling) is refused with the way out (check_dense_weight).
  A dense base under precision="nf4" is reported (the
  backend cannot quantise a module: unsloth_compile.compile or nf4.convert does it beforehand),
  and a 4-bit base under precision="fp8" or sparsity="2:4" keeps its 4-bit op with the reason.
Replacement: `torch.ops.unsloth.lora_linear_nf4` in place of `lora_linear`: the same adapter
  operands, the base's tensors as the module holds them (never cast: they are codes).
Report: in the lora_linear site's text and details (record), counters nf4_linear.fused /
  .refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.fx import Node

from ...config import Precision, Sparsity
from ...nf4.format import is_torchao_nf4
from ...report import Report
from .. import fx_match as fm

if TYPE_CHECKING:
    from .lora_site import BaseLinear, LoraSite

PATTERN = "nf4_linear"
NF4 = "nf4"


def _is_nf4_call(node: Node) -> bool:
    # Dynamo records the call as Nf4Linear makes it: the overload packet
    return node.op == "call_function" and node.target in (torch.ops.unsloth.nf4_linear,
                                                          torch.ops.unsloth.nf4_linear.default)


# ----------------------------------------------------------------------------- pattern


def match_nf4_base(node: Node) -> Optional[tuple[Node, Node, Optional[Node], list[Node], tuple]]:
    """(x, packed codes, bias, matched nodes, the other base operands (absmax codes, absmax scale,
    absmax offset, N, K, weight dtype)) of an nf4_linear call; x before Nf4Linear's autocast cast,
    when there is one (used by nothing else)."""
    if not _is_nf4_call(node):
        return None
    x, packed, absmax_codes, absmax_scale, absmax_offset, n, k, weight_dtype, bias = node.args[:9]
    nodes = [node]
    if fm.cast_dtype(x) is not None and len(x.users) == 1:
        nodes.append(x)
        x = x.args[0]
    return x, packed, bias, nodes, (absmax_codes, absmax_scale, absmax_offset, int(n), int(k), weight_dtype)


def shape(base: "BaseLinear") -> tuple[int, int]:
    """(N, K) of a 4-bit base."""
    return base.nf4[3], base.nf4[4]


# ----------------------------------------------------------------------------- check


def check_site(base: "BaseLinear") -> Optional[str]:
    """What lora_linear's check_site asks of a base, for a 4-bit one (its weight is packed codes,
    1-D uint8, not a 2-D float tensor): the reason it cannot be fused, or None."""
    if base.bias is not None and not isinstance(base.bias, Node):
        return "base bias is not a tensor"
    x = fm.example_value(base.x)
    compute = fm.example_value(base.nodes[0])
    if not (isinstance(x, torch.Tensor) and x.dtype.is_floating_point and isinstance(compute, torch.Tensor)
            and compute.dtype.is_floating_point):
        return "the 4-bit base's input is not a float tensor"
    return None


def check_dense_weight(weight) -> Optional[str]:
    """Why a linear's weight, though not stored by this project, cannot be read as a dense one:
    a torchao NF4Tensor answers no op but its own (the fused op would fail inside it), or None."""
    if is_torchao_nf4(weight):
        return ("the base weight is a torchao NF4Tensor, which the fused op cannot read; take it over before "
                "compiling: unsloth_compile.compile(model) does, or unsloth_compile.nf4.convert(model, "
                "select=unsloth_compile.nf4.stored_four_bit_linears)")
    return None


def check_nf4(base: "BaseLinear", cfg) -> tuple[Optional[str], Optional[str]]:
    """(mode, note): mode NF4 for a site fused over its 4-bit base, None for a dense base; note:
    why the options' precision or sparsity does not apply to this site (reported, the site is
    fused anyway)."""
    if base.nf4 is not None:
        if cfg.precision is Precision.FP8:
            return NF4, "the base is stored in 4 bits (NF4): precision='fp8' leaves it so"
        if cfg.sparsity is Sparsity.SEMI_2_4:
            return NF4, "the base is stored in 4 bits (NF4): sparsity='2:4' leaves it so"
        return NF4, None
    if cfg.precision is Precision.NF4:
        return None, ("the base is dense: the backend does not quantise modules (unsloth_compile.compile("
                      "model, precision='nf4') or unsloth_compile.nf4.convert(model) stores it in NF4 first, "
                      "and its report says why it left a layer dense)")
    return None, None


# ----------------------------------------------------------------------------- replacement


def replace_base(emit: Callable[..., Node], site: "LoraSite", x: Node, bias: Optional[Node], adapter_args: tuple,
                 mask_args: tuple, impl: str) -> Node:
    """The lora_linear_nf4 call; adapter_args = (A, B, B_bias, lora_x, residual, scale,
    scale_tensor) as lora_linear takes them."""
    base = site.base
    return emit("call_function", torch.ops.unsloth.lora_linear_nf4.default,
                (x, base.weight, *base.nf4, bias, *adapter_args, site.out_dtype, impl) + tuple(mask_args))


def record(report: Report, details: dict, mode: Optional[str], note: Optional[str]) -> str:
    """The 4-bit part of a fused site's report text; its details and counters (inside the
    lora_linear site, as fp8_linear.record does): details["precision"] "nf4", details["nf4_note"],
    counters nf4_linear.fused / .refused (a dense base under precision="nf4")."""
    text = ""
    if mode is not None:
        details["precision"] = NF4
        report.counters[f"{PATTERN}.fused"] += 1
        text = ", base in 4 bits (NF4)"
        if note is not None:
            details["nf4_note"] = note
            text += f" ({note})"
    elif note is not None:
        details["nf4_refused"] = note
        report.counters[f"{PATTERN}.refused"] += 1
        text = f", nf4 refused: {note}"
    return text
