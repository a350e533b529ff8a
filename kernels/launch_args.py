"""What the kernels' hosts derive before a launch, shared by kernels/lora/lora_gemm.py and
kernels/lora/lowrank_thin.py: device facts (asked once per device; they do not change), and the
LoRA scale: the tensor scale in the form the kernels take (scale_operand) and how they read
it back (load_scale, a @triton.jit helper); the epilogue's operands made row-contiguous."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability (major, minor)."""
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: the program count of persistent and split
    kernels. 4 for CPU tensors (the Triton interpreter), so that programs loop there too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET set): the CPU path of the
    tests. Read at each call, as Triton reads it when it decorates a kernel."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype with a unit last stride (one copy kernel at most): how the GEMMs' epilogues
    take the low-rank operands U and V."""
    if t.dtype == dtype and t.stride(-1) == 1:
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def scale_operand(scale_tensor: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """The tensor scale as the kernels read it: a 0-d tensor on the kernel's device."""
    if scale_tensor is not None and (scale_tensor.dim() != 0 or scale_tensor.device != device):
        scale_tensor = scale_tensor.to(device=device).reshape(())
    return scale_tensor


@triton.jit
def load_scale(scale, scale_ptr, HAS_SCALE_TENSOR: tl.constexpr):
    """Inside a kernel: s = scale, times the 0-d tensor at scale_ptr (in fp32) when
    HAS_SCALE_TENSOR; scale_ptr is then what scale_operand returned, else never read."""
    s = scale
    if HAS_SCALE_TENSOR:
        s = s * tl.load(scale_ptr).to(tl.float32)
    return s
