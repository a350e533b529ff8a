"""What the kernels' hosts ask of a device, asked once per device (the answers do not change)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability (major, minor)."""
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: the program count of persistent and split
    kernels. 4 for CPU tensors (the Triton interpreter), so that programs loop there too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
