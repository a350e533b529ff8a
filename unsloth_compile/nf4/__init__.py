"""nf4: frozen base weights in the QLoRA 4-bit format (NF4 codes in blocks of 64, double-quantised
absmax), bit-compatible with bitsandbytes' Linear4bit.

    q = unsloth_compile.nf4.quantize_nf4(linear.weight)      # NF4Weight, about 4.13 bits a weight
    w = unsloth_compile.nf4.dequantize_nf4(q)                # the reference dequantisation
    q = unsloth_compile.nf4.from_bnb(bnb_linear4bit.weight)  # a bitsandbytes weight, storage shared

The format and its reference are in format.py; the CUDA kernels in kernels/nf4/.
"""

from .format import (ABSMAX_BLOCK, ABSMAX_CODE, BLOCK, NF4_CODE, NF4Weight, absmax, dequantize_nf4, from_bnb,
                     quantize_nf4)

__all__ = ["ABSMAX_BLOCK", "ABSMAX_CODE", "BLOCK", "NF4_CODE", "NF4Weight", "absmax", "dequantize_nf4", "from_bnb",
           "quantize_nf4"]
