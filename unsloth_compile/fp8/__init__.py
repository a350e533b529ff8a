"""fp8: frozen base weights stored in float8 e4m3 (`convert`, `revert`, `Fp8Linear`).

    report = unsloth_compile.fp8.convert(model)   # each LoRA layer's frozen base -> Fp8Linear
    model = torch.compile(model, backend="unsloth")   # fuses each into torch.ops.unsloth.lora_linear_fp8
    unsloth_compile.fp8.revert(model)             # back to nn.Linear / Conv1D, dequantised (lossy)

The conversion is in conversion.py; the ops in unsloth_compile/ops/base_fp8.py, the math in
kernels/fp8/fp8.py, the pass in passes/lora/fp8_linear.py. See docs/fp8.md.
"""

from .conversion import (ConversionReport, Fp8Linear, convert, dense_weight, frozen_linears, lora_base_layers, revert,
                         unsupported)

__all__ = ["ConversionReport", "Fp8Linear", "convert", "dense_weight", "frozen_linears", "lora_base_layers", "revert",
           "unsupported"]
