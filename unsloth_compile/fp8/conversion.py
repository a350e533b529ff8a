"""Frozen base weights stored in float8 e4m3: the conversion, separate from the runtime rewrite.

    report = unsloth_compile.fp8.convert(model)   # each LoRA layer's frozen base -> Fp8Linear
    print(report)                                 # per layer: converted, or why not; bytes saved
    model = torch.compile(model, backend="unsloth")   # fuses each into torch.ops.unsloth.lora_linear_fp8
    unsloth_compile.fp8.revert(model)             # back to nn.Linear / Conv1D, dequantised (lossy)

`Fp8Linear` holds the weight quantised once (kernels/fp8/fp8.py: e4m3 codes with one power-of-two
scale per output row, which serve both the forward X W^T and the backward dY W) as buffers,
and drops the dense weight: N K + 4 N bytes instead of 2 N K in bf16. Its forward is one
`torch.ops.unsloth.fp8_linear` call, so the model still runs eagerly (in fp8) and the LoRA
pass sees an fp8 base in the graph. Layers whose shapes the fp8 GEMM cannot take (K or N not a
multiple of 16), whose weight is trainable, or that are not a linear stay as they are and are
listed in the report with the reason.

Convert before building the optimizer, and drop other references to the dense weights: the
memory is freed only when nothing else holds them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  registers torch.ops.unsloth.fp8_linear
from ..dense_linear import (SwappedLayer, apply_keeping_stored, conversion_problem, count_converted, dense_weight,
                            frozen_dense, is_conv1d, revert_layers, swap_layers)
from ..dense_linear import lora_base_layers  # noqa: F401  part of this module's API
from ..kernels.fp8 import fp8 as fp8_kernels
from ..errors import UnslothCompileError


def unsupported(module: nn.Module) -> Optional[str]:
    """Why `module` cannot become an Fp8Linear, or None."""
    return conversion_problem(module, "fp8 storage", lambda dtype: dtype != fp8_kernels.E4M3,
                              fp8_kernels.gemm_shape_problem)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W stored in float8 e4m3 (codes `weight_fp8` (N, K), dequantisation
    scales `weight_scale` (N,) fp32) and no dense copy. The bias, if any, stays a parameter."""

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, bias: Optional[nn.Parameter],
                 dense_dtype: torch.dtype, conv1d: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = bias
        self.dense_dtype = dense_dtype  # what to_dense restores
        self.conv1d = conv1d

    @classmethod
    def from_dense(cls, module: nn.Module) -> "Fp8Linear":
        """Quantise an nn.Linear (or Conv1D) once; ValueError with the reason when it cannot."""
        reason = unsupported(module)
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.fp8: cannot store {type(module).__name__} in fp8: {reason}")
        weight = dense_weight(module)
        with torch.no_grad():
            codes, scales = fp8_kernels.quantize_weight(weight.detach())
        return cls(codes, scales, module.bias, weight.dtype, conv1d=is_conv1d(module))

    def dequantized_weight(self) -> Tensor:
        """(N, K) in the dense dtype: what the fp8 codes stand for."""
        return fp8_kernels.dequantize_rowwise(self.weight_fp8, self.weight_scale).to(self.dense_dtype)

    def to_dense(self) -> nn.Module:
        """An nn.Linear (or Conv1D) with the dequantised weight, frozen, sharing the bias."""
        return frozen_dense(self.dequantized_weight(), self.bias, self.conv1d)

    def forward(self, x: Tensor) -> Tensor:
        device_type = x.device.type
        bias = self.bias
        if torch.is_autocast_enabled(device_type):  # as nn.Linear under autocast: x and b in its dtype
            dtype = torch.get_autocast_dtype(device_type)
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        return torch.ops.unsloth.fp8_linear(x, self.weight_fp8, self.weight_scale, bias, "auto")

    def _apply(self, fn, recurse=True):
        return apply_keeping_stored(self, fn, recurse, ("weight_fp8", "weight_scale"), "dense_dtype")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8=e4m3 rowwise, dense_dtype={self.dense_dtype}")


@dataclasses.dataclass
class ConversionReport:
    converted: list[str] = dataclasses.field(default_factory=list)  # module paths
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # module path -> reason
    # converted, but the dense weight stays: module path -> the other holder (tied embeddings)
    shared: dict[str, str] = dataclasses.field(default_factory=dict)
    dense_bytes: int = 0  # the converted weights before, those freed by the conversion only
    fp8_bytes: int = 0  # after: codes and scales (of every converted layer, shared ones too)

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.fp8_bytes

    def __str__(self) -> str:
        lines = [f"unsloth_compile.fp8: {len(self.converted)} linear(s) stored in fp8, "
                 f"{len(self.refused)} left as they are; weights {self.dense_bytes / 2**20:.1f} MiB -> "
                 f"{self.fp8_bytes / 2**20:.1f} MiB ({self.saved_bytes / 2**20:.1f} MiB saved)"]
        lines += [f"  {path}: in fp8, but its dense weight stays: it is also {other} (tied); the fp8 copy "
                  f"adds its bytes, for speed" for path, other in self.shared.items()]
        lines += [f"  {path}: not converted: {reason}" for path, reason in self.refused.items()]
        return "\n".join(lines)


def frozen_linears(path: str, module: nn.Module) -> bool:
    """convert's `select` for every frozen linear (precision="fp8", fp8_layers="all"): each
    nn.Linear / Conv1D whose weight takes no gradient, LoRA bases and others (a causal LM's
    lm_head), not the adapters' own linears (trainable) nor PEFT's LoRA wrappers (not linears)."""
    weight = dense_weight(module)
    return weight is not None and not weight.requires_grad


def convert(model: nn.Module, select: Optional[Callable[[str, nn.Module], bool]] = None,
            allow_emulation: bool = False) -> ConversionReport:
    """Store frozen base linears of `model` in fp8, in place; returns what was done.

    `select(path, module)` picks the modules to convert (default: the `base_layer` of every
    LoRA layer; `frozen_linears`: every frozen linear). A weight that another module shares
    (tied embeddings) is converted for speed but not freed: the report lists it as shared and
    counts no bytes saved for it. On a CUDA device below capability 8.9 it raises (the fp8
    GEMMs cannot run there) unless `allow_emulation` (kernels="reference": the slow emulation,
    for accuracy checks)."""
    report = ConversionReport()

    def to_fp8(module: nn.Module) -> Fp8Linear:
        weight = dense_weight(module)
        if weight.device.type == "cuda" and not allow_emulation:
            fp8_kernels.require_scaled_mm(weight.device)
        return Fp8Linear.from_dense(module)

    def record(layer: SwappedLayer) -> None:
        count_converted(report, layer)
        report.fp8_bytes += layer.stored.weight_fp8.numel() + 4 * layer.stored.weight_scale.numel()

    swap_layers(model, select, Fp8Linear, unsupported, to_fp8, report.refused, record)
    return report


def revert(model: nn.Module) -> int:
    """Every Fp8Linear back to a dense layer with its dequantised weight; returns how many."""
    return revert_layers(model, Fp8Linear)
