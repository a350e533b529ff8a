"""Which inputs the LoRA linear's Triton kernels take: the checks of the activations, the adapters
and the sizes that the dense base (kernels/lora/lora_linear_triton.py) and the NF4 base
(kernels/nf4/nf4_lora.py) share; each host module adds the check of its own base weight."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..launch_args import capability, interpreting
from ..precision import HALF

INT32_LIMIT = 2**31 - 1  # the kernels index in int32
MAX_RANK = 256


def lora_inputs_supported(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_x: Optional[Tensor], *,
                          weight_numel: int, weight_refusal: Callable[[], str],
                          kernels: str) -> tuple[bool, str]:
    """(True, "") when the LoRA kernels take these inputs, else (False, the first reason).

    weight_numel   the base weight's element count (N K, however it is stored)
    weight_refusal the caller's reason its base weight is refused, "" when it is taken; asked
                   after the activations' device and dtype, before the adapters
    kernels        how a refused dtype names the kernels ("the {kernels} take ...")
    """
    if x.device.type == "cuda":
        allowed = HALF
        if x.dtype == torch.bfloat16 and capability(x.device) < (8, 0):
            return False, f"bf16 needs compute capability >= 8.0, {x.device} has less"
    elif x.device.type == "cpu" and interpreting():
        allowed = (torch.float32, torch.float16)
    else:
        return False, f"no Triton kernel for {x.device.type} tensors (only CUDA)"
    if x.dtype not in allowed:
        return False, f"activations are {x.dtype}; the {kernels} take {', '.join(map(str, allowed))}"
    refusal = weight_refusal()
    if refusal:
        return False, refusal
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"adapters must be fp32/fp16/bf16 of one dtype, got A {lora_A.dtype}, B {lora_B.dtype}"
    if not 1 <= lora_A.shape[0] <= MAX_RANK:
        return False, f"rank {lora_A.shape[0]} outside 1..{MAX_RANK}"
    if lora_x is not None and (lora_x.shape != x.shape or not lora_x.dtype.is_floating_point):
        return False, f"lora_x must be a float tensor of x's shape, got {lora_x.dtype} {tuple(lora_x.shape)}"
    if x.dim() == 0 or x.shape[-1] == 0 or weight_numel == 0:
        return False, "empty K or N"
    n_out = weight_numel // x.shape[-1]
    rows = x.numel() // x.shape[-1]
    if max(x.numel(), weight_numel, rows * n_out) > INT32_LIMIT:
        return False, "a tensor has 2**31 elements or more (the kernels index in int32)"
    return True, ""
