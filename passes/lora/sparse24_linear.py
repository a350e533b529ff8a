"""The frozen base of a fused LoRA linear pruned 2:4: pattern, check, replacement.
passes/lora/lora_linear.py calls these for each LoRA site it matches and fuses.

Pattern: the site's base is `torch.ops.unsloth.sparse24_linear(x, W, compressed, layout, b,
  impl)`, a `Sparse24Linear` made by `unsloth_compile.sparsity.prune` (or `convert`). Its dense
  weight was checked 2:4 in both orientations when the module was built, from the real values;
  the pass sees fake tensors and trusts the module. Under autocast the Sparse24Linear casts x
  itself; the cast is peeled so that the adapters, which read the uncast x, match.
Check (options sparsity="2:4"): the base is such a module; N and K multiples of 64; the base
  computes in fp16/bf16 (fp32 too off CUDA, where the dense reference runs); on CUDA, the
  weight has compressed copies in that dtype (a weight that could not be compressed, on a GPU
  without sparse tensor cores say, has none). A site that fails keeps the dense op on the
  masked weight and is reported with the reason. Without the option a pruned base also runs
  the dense op (same values: the zeros are in W), which is how the bench compares the two.
Replacement: `torch.ops.unsloth.lora_linear_sparse24` in place of `lora_linear`: the same
  adapter operands, the base as the module holds it (dense masked weight uncast, compressed
  copies, layout).
Report: in the lora_linear site's text and details (record), counters
  sparse24_linear.fused / .dense (pruned, option off) / .refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.fx import Node

from ...config import KernelChoice, Sparsity
from ...kernels import sparse24
from ...report import Report
from .. import fx_match as fm
from . import lora_autocast

if TYPE_CHECKING:
    from .lora_site import BaseLinear, LoraSite

PATTERN = "sparse24_linear"
SPARSE = "2:4"


# ----------------------------------------------------------------------------- pattern


def match_sparse24_base(node: Node) -> Optional[tuple[Node, Node, Optional[Node], list[Node], tuple]]:
    """(x, dense weight, bias, matched nodes, (compressed, layout)) of a sparse24_linear call;
    x before Sparse24Linear's autocast cast, when there is one (used by nothing else)."""
    # Dynamo records the call as Sparse24Linear makes it: the overload packet
    if node.op != "call_function" or node.target not in (torch.ops.unsloth.sparse24_linear,
                                                         torch.ops.unsloth.sparse24_linear.default):
        return None
    x, weight, compressed, layout, bias = node.args[:5]
    nodes = [node]
    if fm.cast_dtype(x) is not None and len(x.users) == 1:
        nodes.append(x)
        x = x.args[0]
    return x, weight, bias, nodes, (list(compressed), layout)


# ----------------------------------------------------------------------------- check


def check_sparse24(base: "BaseLinear", cfg) -> tuple[Optional[str], Optional[str]]:
    """(mode, refusal): mode SPARSE for a site fused on the compressed weight, None for the
    dense op; refusal: why sparsity="2:4" leaves this site dense."""
    if cfg.sparsity is not Sparsity.SEMI_2_4:
        return None, None
    if getattr(base, "weight_scale", None) is not None:
        return None, "the base is stored in fp8 (unsloth_compile.fp8.convert): a 2:4 base is a Sparse24Linear"
    if base.sparse24 is None:
        return None, ("the base is a dense linear, not 2:4-pruned (unsloth_compile.sparsity.prune converts "
                      "LoRA bases; its report says why it left a layer dense)")
    compressed, layout = base.sparse24
    w = fm.example_value(base.weight)
    x = fm.example_value(base.x)
    on_cuda = x.device.type == "cuda" and cfg.kernels is not KernelChoice.REFERENCE
    compute = lora_autocast.base_compute_dtype(base.nodes[0])
    reason = sparse24.shape_problem(w.shape[0], w.shape[1]) or sparse24.dtype_problem(compute, on_cuda)
    if reason is None and on_cuda:
        if layout == sparse24.DENSE or not compressed:
            reason = ("the weight has no compressed copy on this device (Sparse24Linear.dense_reason says why: "
                      "a GPU without sparse tensor cores, or a dtype the 2:4 GEMMs do not take)")
        elif (stored := fm.example_value(compressed[0]).dtype) != compute:
            reason = (f"the weight is compressed in {str(stored).removeprefix('torch.')} but the base computes in "
                      f"{str(compute).removeprefix('torch.')} (cast the model before compiling)")
    return (None, reason) if reason is not None else (SPARSE, None)


# ----------------------------------------------------------------------------- replacement


def replace_base(emit: Callable[..., Node], site: "LoraSite", x: Node, bias: Optional[Node], adapter_args: tuple,
                 mask_args: tuple, impl: str) -> Node:
    """The lora_linear_sparse24 call; adapter_args = (A, B, B_bias, lora_x, residual, scale,
    scale_tensor) as lora_linear takes them."""
    compressed, layout = site.base.sparse24
    return emit("call_function", torch.ops.unsloth.lora_linear_sparse24.default,
                (x, site.base.weight, compressed, layout, bias, *adapter_args, site.out_dtype, impl)
                + tuple(mask_args))


def record(report: Report, details: dict, base: "BaseLinear", mode: Optional[str], refusal: Optional[str]) -> str:
    """The sparsity part of a fused site's report text; its details and counters (inside the
    lora_linear site, as fp8_linear.record does): details["sparsity"], details["sparsity_refused"],
    counters sparse24_linear.fused / .dense / .refused."""
    if mode is not None:
        details["sparsity"] = SPARSE
        report.counters[f"{PATTERN}.fused"] += 1
        return ", base 2:4 sparse"
    if refusal is not None:
        details["sparsity_refused"] = refusal
        report.counters[f"{PATTERN}.refused"] += 1
        return f", 2:4 refused: {refusal}"
    if base.sparse24 is not None:
        details["sparsity"] = "2:4 pruned, dense GEMM"
        report.counters[f"{PATTERN}.dense"] += 1
        return ", base 2:4-pruned (dense GEMM: options sparsity='2:4' runs it sparse)"
    return ""
