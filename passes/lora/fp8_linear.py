"""The frozen base of a fused LoRA linear in float8 e4m3: pattern, check, replacement.
passes/lora/lora_linear.py calls these for each LoRA site it matches and fuses.

Pattern: the site's base is
  - `torch.ops.unsloth.fp8_linear(x, W_q, w_scale, b, impl)`, an `Fp8Linear` made by
    `unsloth_compile.fp8.convert`: the weight is stored in fp8 ("stored"). Such a site is
    fused in fp8 whatever the options: there is no dense weight left. Under autocast the
    Fp8Linear casts x itself; the cast is peeled so that the adapters, which read the
    uncast x, match;
  - a dense frozen linear when options precision="fp8" ("per call"): the op quantises the
    weight on each call (forward, and again in backward, so nothing more is saved); the GEMMs
    run in fp8, no memory is saved (convert the model for that).
Check: K and N non-zero multiples of 16 (torch._scaled_mm). A "per call" site that fails it
  keeps its dense base (the bf16 op) and is reported refused with the reason; `convert`
  refuses such layers the same way, so a stored base always passes. On a CUDA device below
  capability 8.9 the backend raises (kernels="reference" emulates instead).
Replacement: `torch.ops.unsloth.lora_linear_fp8` in place of `lora_linear`: the same operands,
  the weight as it is (codes and scales, or the dense weight uncast: quantised from its own
  dtype rather than from an autocast copy; a Conv1D weight as its (N, K) transposed view).
Report: in the lora_linear site's text and details (record), counters fp8_linear.stored /
  .per_call / .refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.fx import Node

from ...config import KernelChoice, Precision
from ...kernels.fp8 import fp8
from ...report import Report
from .. import fx_match as fm

if TYPE_CHECKING:
    from .lora_site import BaseLinear, LoraSite

PATTERN = "fp8_linear"
STORED, PER_CALL = "stored", "per call"


# ----------------------------------------------------------------------------- pattern


def match_fp8_base(node: Node) -> Optional[tuple[Node, Node, Node, Optional[Node], list[Node]]]:
    """(x, codes, scales, bias, matched nodes) of an fp8_linear call; x before Fp8Linear's
    autocast cast, when there is one (used by nothing else)."""
    # Dynamo records the call as Fp8Linear makes it: the overload packet
    if node.op != "call_function" or node.target not in (torch.ops.unsloth.fp8_linear,
                                                         torch.ops.unsloth.fp8_linear.default):
        return None
    x, codes, scales, bias = node.args[:4]
    nodes = [node]
    if fm.cast_dtype(x) is not None and len(x.users) == 1:
        nodes.append(x)
        x = x.args[0]
    return x, codes, scales, bias, nodes


# ----------------------------------------------------------------------------- check


def _problem_shape(base: "BaseLinear") -> tuple[int, int]:
    w = fm.example_value(base.weight)
    return (int(w.shape[1]), int(w.shape[0])) if base.weight_transposed else (int(w.shape[0]), int(w.shape[1]))


def check_fp8(base: "BaseLinear", cfg) -> tuple[Optional[str], Optional[str]]:
    """(mode, refusal): mode STORED / PER_CALL for a site fused in fp8, None for the dense op;
    refusal: why precision="fp8" leaves this site dense. Raises on a GPU without fp8 GEMMs."""
    if base.weight_scale is not None:
        mode = STORED
    elif cfg.precision is Precision.FP8:
        n, k = _problem_shape(base)
        reason = fp8.gemm_shape_problem(n, k)
        if reason is not None:
            dtype = str(fm.example_value(base.weight).dtype).removeprefix("torch.")
            return None, f"the base stays {dtype}: {reason}"
        mode = PER_CALL
    else:
        return None, None
    x = fm.example_value(base.x)
    if isinstance(x, torch.Tensor) and x.device.type == "cuda" and cfg.kernels is not KernelChoice.REFERENCE:
        fp8.require_scaled_mm(x.device)
    return mode, None


# ----------------------------------------------------------------------------- replacement


def replace_base(emit: Callable[..., Node], site: "LoraSite", x: Node, bias: Optional[Node], adapter_args: tuple,
                 mask_args: tuple, impl: str) -> Node:
    """The lora_linear_fp8 call; adapter_args = (A, B, B_bias, lora_x, residual, scale,
    scale_tensor) as lora_linear takes them."""
    base = site.base
    weight = base.weight
    if base.weight_transposed:  # Conv1D keeps W as (K, N): the op quantises the rows of W^T
        weight = emit("call_method", "t", (weight,))
    return emit("call_function", torch.ops.unsloth.lora_linear_fp8.default,
                (x, weight, base.weight_scale, bias, *adapter_args, site.out_dtype, impl) + tuple(mask_args))


def record(report: Report, details: dict, mode: Optional[str], refusal: Optional[str]) -> str:
    """The fp8 part of a fused site's report text; its details and counters. Kept inside the
    lora_linear site (a second Site per layer would count each layer twice in the report's
    fused/refused totals): details["precision"], details["fp8_refused"], counters
    fp8_linear.stored / .per_call / .refused."""
    details["precision"] = "fp8" if mode is not None else "default"
    if mode is not None:
        details["fp8"] = mode
        report.counters[f"{PATTERN}.{mode.replace(' ', '_')}"] += 1
        return ", base in fp8 (stored)" if mode == STORED else ", base in fp8 (quantised per call)"
    if refusal is not None:
        details["fp8_refused"] = refusal
        report.counters[f"{PATTERN}.refused"] += 1
        return f", fp8 refused: {refusal}"
    return ""
