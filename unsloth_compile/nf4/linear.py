"""`Nf4Linear`: a frozen linear whose weight is stored in 4-bit NF4 (nf4/format.py), and why a
layer cannot become one.

It holds the format's tensors as buffers (packed codes N K / 2 bytes, one absmax code per 64
values, one fp32 scale per 256 absmax codes, one fp32 offset) and no dense copy. Its forward is
one `torch.ops.unsloth.nf4_linear` call, so the model still runs eagerly and the LoRA pass sees
a 4-bit base in the graph. It is built from a dense nn.Linear / Conv1D (`from_dense`: quantised
once), from a bitsandbytes `Linear4bit` in the same format (`from_bnb`: the storage is shared,
nothing is quantised again) or from an nn.Linear whose weight is a torchao `NF4Tensor`
(`from_torchao`: the 4-bit codes are shared, the block absmax values coded again).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..dense_linear import apply_keeping_stored, conversion_problem, dense_weight, frozen_dense, is_conv1d
from ..errors import UnslothCompileError
from . import format as nf4_format

_BUFFERS = ("packed", "absmax_codes", "absmax_scale", "absmax_offset")


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (and its subclasses), recognised without importing bitsandbytes."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


def is_torchao_linear(module: nn.Module) -> bool:
    """An nn.Linear whose weight is a torchao NF4Tensor (torchao's nf4 weight-only quantisation,
    torchtune's FrozenNF4Linear)."""
    return isinstance(module, nn.Linear) and nf4_format.is_torchao_nf4(module.weight)


def is_four_bit(module: nn.Module) -> bool:
    """An Nf4Linear or a bitsandbytes Linear4bit: 4-bit codes held as buffers (a torchao
    NF4Tensor is a parameter, which FSDP2 shards through torchao's own hooks)."""
    return isinstance(module, Nf4Linear) or is_bnb_linear4bit(module)


def bnb_problem(module: nn.Module) -> Optional[str]:
    """Why a bitsandbytes Linear4bit cannot be taken over as it is stored, or None."""
    weight = module.weight
    if not getattr(weight, "bnb_quantized", False):
        return None  # still dense: quantised like any dense layer
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        return "the weight was repacked for bitsandbytes' CPU inference kernels, which the NF4 format is not"
    try:
        nf4_format.from_bnb(weight)
    except UnslothCompileError as error:
        return str(error).removeprefix("unsloth_compile.nf4.from_bnb: ")
    return None


def torchao_problem(module: nn.Module) -> Optional[str]:
    """Why an nn.Linear over a torchao NF4Tensor cannot be taken over, or None."""
    if module.weight.requires_grad:
        return "the NF4Tensor weight is trainable (NF4 storage is for frozen bases)"
    try:
        nf4_format.check_torchao(module.weight)
    except UnslothCompileError as error:
        return str(error).removeprefix("unsloth_compile.nf4.from_torchao: ")
    return None


def dense_problem(module: nn.Module) -> Optional[str]:
    """Why a dense layer cannot be stored in NF4, or None."""
    return conversion_problem(module, "NF4 storage", lambda dtype: dtype.itemsize >= 2, _shape_problem)


def _shape_problem(out_features: int, in_features: int) -> Optional[str]:
    if in_features % nf4_format.BLOCK:
        return (f"K (in_features)={in_features} is not a multiple of {nf4_format.BLOCK}, the NF4 block: each block "
                f"of a row shares one absmax")
    return None


def unsupported(module: nn.Module) -> Optional[str]:
    """Why `module` cannot become an Nf4Linear, or None."""
    if is_bnb_linear4bit(module):
        return bnb_problem(module)
    if is_torchao_linear(module):
        return torchao_problem(module)
    return dense_problem(module)


class Nf4Linear(nn.Module):
    """y = x dequant(W)^T + b with W (N, K) stored in NF4 and no dense copy; computes in x's dtype
    (autocast's under autocast), as an nn.Linear holding the dequantised weight would. The bias,
    if any, stays a parameter. `source` says where the codes came from ("quantised",
    "bitsandbytes" or "torchao")."""

    def __init__(self, weight: "nf4_format.NF4Weight", bias: Optional[nn.Parameter], conv1d: bool = False,
                 source: str = "quantised"):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        for name in _BUFFERS:
            self.register_buffer(name, getattr(weight, name))
        self.bias = bias
        self.weight_dtype = weight.dtype  # what the codes dequantise to, and what to_dense restores
        self.conv1d = conv1d
        self.source = source

    @classmethod
    def from_dense(cls, module: nn.Module) -> "Nf4Linear":
        """Quantise an nn.Linear (or Conv1D) once; UnslothCompileError with the reason when it cannot."""
        reason = dense_problem(module)
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.nf4: cannot store {type(module).__name__} in NF4: {reason}")
        with torch.no_grad():
            weight = nf4_format.quantize_nf4(dense_weight(module).detach().contiguous())
        return cls(weight, module.bias, conv1d=is_conv1d(module))

    @classmethod
    def from_bnb(cls, module: nn.Module) -> "Nf4Linear":
        """Take over a bitsandbytes Linear4bit (nf4, blocks of 64, double-quantised absmax): the
        codes and statistics are shared, not quantised again. A Linear4bit whose weight is still
        dense (not yet moved to its device) is quantised as a dense layer would be."""
        reason = bnb_problem(module)
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.nf4: cannot take over {type(module).__name__}: {reason}")
        bias = module.bias
        if not getattr(module.weight, "bnb_quantized", False):
            with torch.no_grad():
                weight = nf4_format.quantize_nf4(module.weight.data.detach().contiguous())
            return cls(weight, bias)
        return cls(nf4_format.from_bnb(module.weight), bias, source="bitsandbytes")

    @classmethod
    def from_torchao(cls, module: nn.Module) -> "Nf4Linear":
        """Take over an nn.Linear whose frozen weight is a torchao NF4Tensor (blocks of 64): its
        4-bit codes are shared, its block absmax values (as torchao decodes them) are coded
        again in this format's double quantisation."""
        reason = torchao_problem(module) if is_torchao_linear(module) else "its weight is not a torchao NF4Tensor"
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.nf4: cannot take over {type(module).__name__}: {reason}")
        return cls(nf4_format.from_torchao(module.weight), module.bias, source="torchao")

    def nf4_weight(self) -> "nf4_format.NF4Weight":
        return nf4_format.NF4Weight(packed=self.packed, absmax_codes=self.absmax_codes,
                                    absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset,
                                    shape=(self.out_features, self.in_features), dtype=self.weight_dtype)

    def dequantized_weight(self) -> Tensor:
        """(N, K) in weight_dtype: what the codes stand for."""
        return nf4_format.dequantize_nf4(self.nf4_weight())

    def to_dense(self) -> nn.Module:
        """An nn.Linear (or Conv1D) with the dequantised weight, frozen, sharing the bias."""
        return frozen_dense(self.dequantized_weight(), self.bias, self.conv1d)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_codes, self.absmax_scale,
                                                           self.absmax_offset))

    def forward(self, x: Tensor) -> Tensor:
        device_type = x.device.type
        bias = self.bias
        if torch.is_autocast_enabled(device_type):  # as nn.Linear under autocast: x and b in its dtype
            dtype = torch.get_autocast_dtype(device_type)
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        elif bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return torch.ops.unsloth.nf4_linear(x, self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset,
                                            self.out_features, self.in_features, self.weight_dtype, bias, "auto")

    def _apply(self, fn, recurse=True):
        return apply_keeping_stored(self, fn, recurse, _BUFFERS, "weight_dtype")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 (blocks of {nf4_format.BLOCK}, double-quantised absmax), weight_dtype={self.weight_dtype}, "
                f"source={self.source}")
