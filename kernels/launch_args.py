"""What the kernels' hosts derive before a launch, shared by kernels/lora_gemm.py and
kernels/lowrank_thin.py: device facts (asked once per device; they do not change) and the
tensor scale in the form the kernels read."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability (major, minor)."""
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: the program count of persistent and split
    kernels. 4 for CPU tensors (the Triton interpreter), so that programs loop there too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def scale_operand(scale_tensor: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """The tensor scale as the kernels read it: a 0-d tensor on the kernel's device."""
    if scale_tensor is not None and (scale_tensor.dim() != 0 or scale_tensor.device != device):
        scale_tensor = scale_tensor.to(device=device).reshape(())
    return scale_tensor
