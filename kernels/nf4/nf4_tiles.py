"""Decoding the NF4 format inside a kernel (the format: unsloth_compile/nf4/format.py):

    absmax[b] = float32(ABSMAX_CODE[absmax_codes[b]] * absmax_scale[b // 256]) + offset
    W[i]      = float32(NF4_CODE[code[i]] * absmax[i // 64])

shared by the one-pass dequantisation and the GEMMs' main loops. The kernels are launched
without floating-point contraction, so that the product and the sum above round one at a time,
as the reference does, and W decodes bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

NF4_BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax values per second-level scale


@triton.jit
def block_absmax(block, absmax_codes_ptr, absmax_scale_ptr, absmax_code_ptr, offset, mask):
    """The float32 absmax of NF4 blocks `block` (any shape of int32 block indices); 0 where
    mask is False (nothing is read there)."""
    code = tl.load(absmax_codes_ptr + block, mask=mask, other=0).to(tl.int32)
    level = tl.load(absmax_code_ptr + code)
    second = tl.load(absmax_scale_ptr + block // 256, mask=mask, other=0.0)
    return tl.where(mask, level * second + offset, 0.0)


@triton.jit
def nf4_pair(byte, nf4_code_ptr, scale_hi, scale_lo, OUT_DTYPE: tl.constexpr):
    """The two weights a byte holds, (high nibble, low nibble) = (element 2i, element 2i+1),
    each its NF4 level times its block's absmax, rounded to OUT_DTYPE."""
    byte = byte.to(tl.int32)
    hi = tl.load(nf4_code_ptr + (byte >> 4)) * scale_hi
    lo = tl.load(nf4_code_ptr + (byte & 15)) * scale_lo
    return hi.to(OUT_DTYPE), lo.to(OUT_DTYPE)
