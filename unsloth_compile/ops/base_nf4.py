"""The 4-bit NF4 frozen base (QLoRA; the format is unsloth_compile/nf4/format.py):

    unsloth::nf4_linear                 x W^T + b with W stored in NF4 (Nf4Linear's forward, and
                                        what the LoRA pass recognises as a 4-bit base)
    unsloth::nf4_linear_backward        its dx = dY W
    unsloth::lora_linear_nf4            the LoRA op over an NF4 base
    unsloth::lora_linear_nf4_backward   its (dx, d_lora_x, dA, dB)

The base is passed as the format's tensors (packed codes, absmax codes, their scales and
offset) with its shape (N, K) and the dtype of the dense weight it stands for. The products
compute in x's dtype (the pass casts x to the dtype the base computed in, autocast's included),
with W = dequantize_nf4(q) rounded once to x's dtype, as the kernels decode it. The weight never
gets a gradient and backward keeps it as given (nothing new is saved: the 4-bit tensors are the
module's buffers).

Where they run: the LoRA op on CUDA with impl "auto"/"triton" runs kernels/nf4/nf4_lora.py
(dequantisation inside the GEMM's main loop) where its `supports` takes the inputs (fp16/bf16
activations); anywhere else, or with impl="reference", the dequantised weight and the dense
reference math (kernels/reference.py), which is also the
oracle the tests compare with. The base alone (frozen linears outside LoRA layers) dequantises
into a buffer of x's dtype and calls the dense linear on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import reference
from ..nf4 import format as nf4_format
from .base_linear import register_base_linear_op
from .frozen_base import FrozenBase, LoraBackward, LoraForward
from .kernel_loader import KernelLoader
from .lora import register_lora_op

KERNELS = KernelLoader(
    module_name="unsloth_compile.kernels.nf4.nf4_lora",
    kernels="NF4 kernels",
    unavailable="unsloth_compile: NF4 Triton kernels unavailable (%s); lora_linear_nf4 runs the dequantised reference",
    unsupported="unsloth_compile: lora_linear_nf4 runs the dequantised reference: %s",
)
_codes: dict[torch.device, tuple[Tensor, Tensor]] = {}

# The schemas' base arguments, in order: the format's tensors, the shape, the dequantised dtype.
BASE_ARGS = ("packed", "absmax_codes", "absmax_scale", "absmax_offset", "out_features", "in_features",
             "weight_dtype")
_BASE_SCHEMA = ("Tensor packed, Tensor absmax_codes, Tensor absmax_scale, Tensor absmax_offset, int out_features, "
                "int in_features, ScalarType weight_dtype")


def stored_weight(base: Mapping[str, Any]) -> "nf4_format.NF4Weight":
    """The NF4Weight the base arguments describe (sharing their storage)."""
    return nf4_format.NF4Weight(packed=base["packed"], absmax_codes=base["absmax_codes"],
                                absmax_scale=base["absmax_scale"], absmax_offset=base["absmax_offset"],
                                shape=(int(base["out_features"]), int(base["in_features"])),
                                dtype=base["weight_dtype"])


def dense_weight(base: Mapping[str, Any], dtype: torch.dtype) -> Tensor:
    """(N, K) in `dtype`: the float32 products of the dequantisation rounded once to it."""
    return nf4_format.dequantize_nf4(stored_weight(base), dtype)


def pick_kernels(impl: str, base: Mapping[str, Any], x: Tensor, lora_A: Tensor, lora_B: Tensor,
                 lora_x: Optional[Tensor]):
    """The NF4 kernel module for these inputs, or None for the reference path."""
    return KERNELS.pick(impl, x.device,
                        (x, lora_A, lora_B, lora_x, int(base["out_features"]), int(base["in_features"])))


def code_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(NF4_CODE, ABSMAX_CODE) on `device`, made once per device (a CUDA graph replays them)."""
    if device not in _codes:
        _codes[device] = (nf4_format.NF4_CODE.to(device), nf4_format.ABSMAX_CODE.to(device))
    return _codes[device]


def _kernel_base_args(base: Mapping[str, Any], device: torch.device) -> tuple:
    nf4_code, absmax_code = code_tables(device)
    return (base["packed"], base["absmax_codes"], base["absmax_scale"], base["absmax_offset"], nf4_code, absmax_code,
            int(base["out_features"]), int(base["in_features"]))


def _optional_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else reference.rows(t)


@dataclass(frozen=True)
class Nf4Base(FrozenBase):
    """x dequant(W)^T, W in NF4 with double-quantised absmax, in x's dtype."""

    def out_features(self, base) -> int:
        return int(base["out_features"])

    def forward(self, base, call: LoraForward):
        kernels = pick_kernels(call.impl, base, call.x, call.lora_A, call.lora_B, call.lora_x)
        if kernels is None:
            return reference.lora_linear_forward(
                call.x, dense_weight(base, call.x.dtype), call.bias, call.lora_A, call.lora_B, call.lora_B_bias,
                call.lora_x, call.residual, call.scale, call.scale_tensor, False, call.out_dtype)
        lead = call.x.shape[:-1]
        out, hidden = kernels.nf4_lora_forward(
            reference.rows(call.x), *_kernel_base_args(base, call.x.device), call.bias, call.lora_A, call.lora_B,
            call.lora_B_bias, _optional_rows(call.lora_x), _optional_rows(call.residual), call.scale,
            call.scale_tensor, call.out_dtype)
        return out.reshape(*lead, out.shape[-1]), hidden

    def backward(self, base, call: LoraBackward):
        kernels = pick_kernels(call.impl, base, call.x, call.lora_A, call.lora_B, call.lora_x)
        if kernels is None:
            return reference.lora_linear_backward(
                call.grad_out, call.x, dense_weight(base, call.x.dtype), call.lora_A, call.lora_B, call.lora_x,
                call.lora_hidden, call.scale, call.scale_tensor, False, call.x.dtype)
        x = call.x
        dx, d_lora_x, dA, dB = kernels.nf4_lora_backward(
            reference.rows(call.grad_out), reference.rows(x), *_kernel_base_args(base, x.device), call.lora_A,
            call.lora_B, _optional_rows(call.lora_x), call.lora_hidden, call.scale, call.scale_tensor)
        lead, k = x.shape[:-1], x.shape[-1]
        if d_lora_x is not None:
            d_lora_x = d_lora_x.reshape(*lead, k)
        return dx.to(x.dtype).reshape(*lead, k), d_lora_x, dA, dB


NF4 = Nf4Base(
    name="lora_linear_nf4",
    forward_args=(
        f"Tensor x, {_BASE_SCHEMA}, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_B_bias, Tensor? lora_x, "
        "Tensor? residual, float scale, Tensor? scale_tensor, ScalarType out_dtype, str impl, "
        "Tensor? dropout_mask=None, float dropout_scale=1.0"),
    backward_args=(
        f"Tensor grad_out, Tensor x, {_BASE_SCHEMA}, Tensor lora_A, Tensor lora_B, Tensor? lora_x, "
        "Tensor lora_hidden, float scale, Tensor? scale_tensor, str impl, Tensor? dropout_mask=None, "
        "float dropout_scale=1.0"),
)

register_lora_op(NF4)


# ----------------------------------------------------------------------------- nf4_linear: the base alone


def _linear_forward(x, base, bias, impl):
    return F.linear(x, dense_weight(base, x.dtype), bias)


def _linear_backward(grad_out, base, x_dtype, impl):
    return (grad_out.to(x_dtype) @ dense_weight(base, x_dtype)).contiguous()


NF4_LINEAR = register_base_linear_op("nf4_linear", _BASE_SCHEMA, _linear_forward, _linear_backward,
                                     shape=lambda base: (base["out_features"], base["in_features"]))
