"""Frozen base weights stored in 4-bit NF4: the conversion, separate from the runtime rewrite.

    report = unsloth_compile.nf4.convert(model)   # each LoRA layer's frozen base -> Nf4Linear
    print(report)                                 # per layer: converted, or why not; bytes freed
    model = torch.compile(model, backend="unsloth")   # fuses each into torch.ops.unsloth.lora_linear_nf4
    unsloth_compile.nf4.revert(model)             # back to nn.Linear / Conv1D, dequantised (lossy)

Dense layers are quantised once (N K / 2 + N K / 64 + ... bytes instead of 2 N K in bf16) and
their dense weights dropped. bitsandbytes `Linear4bit` layers in the same format (a model loaded
with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`) are taken over as they
are: their codes and statistics are shared, nothing is quantised again and no bytes are freed.
nn.Linear layers whose weight is a torchao `NF4Tensor` (torchao's nf4 weight-only quantisation,
torchtune's QLoRA bases) are taken over too: their 4-bit codes are shared and their block absmax
values coded again in this format (torchao double-quantises them another way).
Layers that cannot be 4-bit (K not a multiple of 64, a trainable weight, another bitsandbytes
format) stay as they are and are listed in the report with the reason.

Convert before building the optimizer, and drop other references to the dense weights: the
memory is freed only when nothing else holds them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from torch import nn

from ..dense_linear import SwappedLayer, count_converted, dense_weight, lora_base_layers, revert_layers, swap_layers
from .linear import Nf4Linear, is_bnb_linear4bit, is_torchao_linear, unsupported


@dataclasses.dataclass
class ConversionReport:
    converted: list[str] = dataclasses.field(default_factory=list)  # module paths quantised from dense
    # module paths of bitsandbytes Linear4bit layers taken over with their own codes (not quantised again)
    from_bnb: list[str] = dataclasses.field(default_factory=list)
    # module paths of linears over torchao NF4Tensors: codes shared, absmax coded again
    from_torchao: list[str] = dataclasses.field(default_factory=list)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # module path -> reason
    # converted, but the dense weight stays: module path -> the other holder (tied embeddings)
    shared: dict[str, str] = dataclasses.field(default_factory=dict)
    dense_bytes: int = 0  # the quantised weights before, those freed by the conversion only
    nf4_bytes: int = 0  # after: codes and statistics of every layer quantised here (shared ones too)

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.nf4_bytes

    def __str__(self) -> str:
        torchao = (f"{len(self.from_torchao)} torchao NF4Tensor linear(s) taken over (4-bit codes shared), "
                   if self.from_torchao else "")
        lines = [f"unsloth_compile.nf4: {len(self.converted)} linear(s) stored in NF4, {len(self.from_bnb)} "
                 f"bitsandbytes Linear4bit taken over as stored, {torchao}{len(self.refused)} left as they are; "
                 f"weights {self.dense_bytes / 2**20:.1f} MiB -> {self.nf4_bytes / 2**20:.1f} MiB "
                 f"({self.saved_bytes / 2**20:.1f} MiB freed)"]
        lines += [f"  {path}: in NF4, but its dense weight stays: it is also {other} (tied)"
                  for path, other in self.shared.items()]
        lines += [f"  {path}: not converted: {reason}" for path, reason in self.refused.items()]
        return "\n".join(lines)


def frozen_linears(path: str, module: nn.Module) -> bool:
    """convert's `select` for every frozen linear (precision="nf4", nf4_layers="all"): each
    nn.Linear / Conv1D whose weight takes no gradient and each bitsandbytes Linear4bit, LoRA bases
    and others, not the adapters' own linears (trainable) nor PEFT's LoRA wrappers."""
    weight = dense_weight(module)
    return weight is not None and not weight.requires_grad


def bnb_linears(path: str, module: nn.Module) -> bool:
    """convert's `select` for the bitsandbytes Linear4bit layers alone (a model loaded in 4 bits)."""
    return is_bnb_linear4bit(module)


def has_bnb_linears(model: nn.Module) -> bool:
    return any(is_bnb_linear4bit(m) for m in model.modules())


def stored_four_bit_linears(path: str, module: nn.Module) -> bool:
    """convert's `select` for the layers stored in 4 bits already: bitsandbytes Linear4bit and
    linears over a torchao NF4Tensor."""
    return is_bnb_linear4bit(module) or is_torchao_linear(module)


def has_stored_four_bit_linears(model: nn.Module) -> bool:
    return any(stored_four_bit_linears("", m) for m in model.modules())


def compile_select(model: nn.Module, precision_nf4: bool, all_layers: bool
                   ) -> Optional[Callable[[str, nn.Module], bool]]:
    """What unsloth_compile.compile converts, as convert's `select`: under precision="nf4" the LoRA
    bases (every frozen linear with `all_layers`), and in any case the bitsandbytes Linear4bit
    layers and the linears over torchao NF4Tensors, which are 4-bit already; None when there is
    nothing to convert."""
    if precision_nf4 and all_layers:
        return frozen_linears
    if precision_nf4:
        bases = {id(layer.base_layer) for _, layer in lora_base_layers(model)}
        return lambda path, module: id(module) in bases or stored_four_bit_linears(path, module)
    if has_stored_four_bit_linears(model):
        return stored_four_bit_linears
    return None


def to_nf4(module: nn.Module) -> Nf4Linear:
    """The Nf4Linear standing for a layer `unsupported` takes: a bitsandbytes Linear4bit and a
    linear over a torchao NF4Tensor taken over as stored, a dense layer quantised."""
    if is_bnb_linear4bit(module):
        return Nf4Linear.from_bnb(module)
    if is_torchao_linear(module):
        return Nf4Linear.from_torchao(module)
    return Nf4Linear.from_dense(module)


def convert(model: nn.Module, select: Optional[Callable[[str, nn.Module], bool]] = None) -> ConversionReport:
    """Store frozen base linears of `model` in NF4, in place; returns what was done.

    `select(path, module)` picks the modules to convert (default: the `base_layer` of every LoRA
    layer; `frozen_linears`: every frozen linear; `bnb_linears`: the bitsandbytes Linear4bit
    layers; `stored_four_bit_linears`: those and the linears over torchao NF4Tensors). A weight
    that another module shares (tied embeddings) is converted but not freed: the report lists it
    as shared and counts no bytes freed for it."""
    report = ConversionReport()

    def record(layer: SwappedLayer) -> None:
        if layer.stored.source == "bitsandbytes":
            report.from_bnb.append(layer.path)
        elif layer.stored.source == "torchao":
            report.from_torchao.append(layer.path)
        else:
            count_converted(report, layer)
            report.nf4_bytes += layer.stored.nbytes()

    swap_layers(model, select, Nf4Linear, unsupported, to_nf4, report.refused, record)
    return report


def revert(model: nn.Module) -> int:
    """Every Nf4Linear back to a dense layer with its dequantised weight; returns how many."""
    return revert_layers(model, Nf4Linear)
