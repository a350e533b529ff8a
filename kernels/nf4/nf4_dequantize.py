"""W (N, K) from its NF4 codes in one pass, into a buffer of the activation dtype: the
"dequantise, then cuBLAS" side of the NF4 LoRA linear, and a check of the decoding.

Bytes: N K / 2 codes + N K / 64 absmax codes read, 2 N K written (bf16/fp16): memory-bound, one
read and one write of each weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..lora.lora_epilogue import TL_DTYPES
from ...errors import UnslothCompileError
from .nf4_tiles import block_absmax, nf4_pair


@triton.jit
def _dequantize_kernel(
    # pointers
    packed_ptr, absmax_codes_ptr, absmax_scale_ptr, offset_ptr, nf4_code_ptr, absmax_code_ptr, out_ptr,
    # sizes
    n_bytes,
    # meta-parameters
    OUT_DTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    """out[2i], out[2i+1] = the weights of byte i, for BLOCK_BYTES bytes per program."""
    offs = tl.program_id(0) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    ok = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=ok, other=0)
    absmax = block_absmax(offs // 32, absmax_codes_ptr, absmax_scale_ptr, absmax_code_ptr,
                          tl.load(offset_ptr), ok)
    hi, lo = nf4_pair(byte, nf4_code_ptr, absmax, absmax, OUT_DTYPE)
    pair = tl.reshape(tl.join(hi, lo), (2 * BLOCK_BYTES,))
    offs_out = tl.program_id(0) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + offs_out, pair, mask=offs_out < 2 * n_bytes)


_BLOCK_BYTES = 1024  # 2048 weights a program: wide enough stores, thousands of programs at 8B shapes
_INTERPRETER_BLOCK_BYTES = 256


def dequantize_nf4_triton(packed: Tensor, absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor,
                          nf4_code: Tensor, absmax_code: Tensor, N: int, K: int, dtype: torch.dtype) -> Tensor:
    """W' (N, K) in dtype (bf16/fp16; fp32 too), equal to unsloth_compile.nf4.dequantize_nf4
    bit for bit: one pass over the codes."""
    if K % 64 or packed.numel() != N * K // 2 or absmax_codes.numel() != N * K // 64:
        raise UnslothCompileError(
            f"unsloth_compile.kernels.nf4.dequantize_nf4_triton: codes of {packed.numel()} bytes and "
            f"{absmax_codes.numel()} absmax codes do not describe an NF4 weight of shape {(N, K)} (K a multiple "
            "of 64); pass the tensors of one unsloth_compile.nf4.NF4Weight")
    out = torch.empty((N, K), device=packed.device, dtype=dtype)
    n_bytes = N * K // 2
    if n_bytes == 0:
        return out
    block = _INTERPRETER_BLOCK_BYTES if packed.device.type == "cpu" else _BLOCK_BYTES
    _dequantize_kernel[(triton.cdiv(n_bytes, block),)](
        packed_ptr=packed, absmax_codes_ptr=absmax_codes, absmax_scale_ptr=absmax_scale,
        offset_ptr=absmax_offset, nf4_code_ptr=nf4_code, absmax_code_ptr=absmax_code, out_ptr=out,
        n_bytes=n_bytes, OUT_DTYPE=TL_DTYPES[dtype], BLOCK_BYTES=block,
        num_warps=4, enable_fp_fusion=False)
    return out
