"""`torch.ops.unsloth.*`: the ops the passes emit, each with its schema, fake impl, one
implementation for every device (kernels on CUDA, plain torch elsewhere) and its autograd.

    frozen_base.py, lora.py   the LoRA op: one autograd Function over a frozen-base strategy
    dropout.py                the adapter's dropout as a tensor or as its mask
    base_dense.py             unsloth::lora_linear(_backward)           bf16/fp16/fp32 base
    base_fp8.py               unsloth::lora_linear_fp8(_backward)       float8 base, and fp8_linear
    base_sparse24.py          unsloth::lora_linear_sparse24(_backward)  2:4 base, and sparse24_linear
    base_nf4.py               unsloth::lora_linear_nf4(_backward)       4-bit NF4 base, and nf4_linear
    base_linear.py            the base-only ops (fp8_linear, ...): registration and autograd
    saved_args.py             an op's arguments kept for backward (the LoRA and base-only Functions)
    kernel_loader.py          a base's CUDA kernel module: imported on first use, chosen per call
    cross_entropy.py          unsloth::linear_cross_entropy*, unsloth::logits_cross_entropy*
    compress.py               the ops of compress_activations
    packed_attention.py       unsloth::packed_attention(_backward)
    attention_bias.py         unsloth::attention_bias

Importing the package registers them all.
"""

import torch

# The namespace's one DEF library (the modules below extend it with FRAGMENTs); kept alive
# here, since a Library unregisters its ops when collected.
namespace = torch.library.Library("unsloth", "DEF")

from . import base_dense, base_fp8, base_sparse24, base_nf4  # noqa: E402,F401  the LoRA op, one per frozen base
from . import cross_entropy, compress, packed_attention, attention_bias  # noqa: E402,F401
