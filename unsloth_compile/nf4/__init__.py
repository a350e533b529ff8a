"""nf4: frozen base weights in the QLoRA 4-bit format (NF4 codes in blocks of 64, double-quantised
absmax), bit-compatible with bitsandbytes' Linear4bit; torchao's NF4Tensor is read too.

    q = unsloth_compile.nf4.quantize_nf4(linear.weight)      # NF4Weight, about 4.13 bits a weight
    w = unsloth_compile.nf4.dequantize_nf4(q)                # the reference dequantisation
    q = unsloth_compile.nf4.from_bnb(bnb_linear4bit.weight)  # a bitsandbytes weight, storage shared
    q = unsloth_compile.nf4.from_torchao(nf4_tensor)         # a torchao NF4Tensor, 4-bit codes shared

    report = unsloth_compile.nf4.convert(model)              # each LoRA layer's frozen base -> Nf4Linear
    model = torch.compile(model, backend="unsloth")          # fuses each into torch.ops.unsloth.lora_linear_nf4

The format and its reference are in format.py; the module in linear.py, the conversion in
conversion.py; the ops in unsloth_compile/ops/base_nf4.py, the CUDA kernels in kernels/nf4/, the
pass in passes/lora/nf4_linear.py. See docs/nf4.md.
"""

from .format import (ABSMAX_BLOCK, ABSMAX_CODE, BLOCK, NF4_CODE, NF4Weight, absmax, dequantize_nf4, from_bnb,
                     from_torchao, is_torchao_nf4, quantize_nf4)
from .linear import Nf4Linear, is_bnb_linear4bit, is_torchao_linear, unsupported
from .conversion import (ConversionReport, bnb_linears, compile_select, convert, frozen_linears, has_bnb_linears,
                         has_stored_four_bit_linears, revert, stored_four_bit_linears)

__all__ = ["ABSMAX_BLOCK", "ABSMAX_CODE", "BLOCK", "NF4_CODE", "NF4Weight", "absmax", "dequantize_nf4", "from_bnb",
           "from_torchao", "is_torchao_nf4", "quantize_nf4", "Nf4Linear", "is_bnb_linear4bit", "is_torchao_linear",
           "unsupported", "ConversionReport", "bnb_linears", "compile_select", "convert", "frozen_linears",
           "has_bnb_linears", "has_stored_four_bit_linears", "revert", "stored_four_bit_linears"]
