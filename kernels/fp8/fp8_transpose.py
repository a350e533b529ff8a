"""The backward's transposed copy of the fp8 weight codes, in one tiled Triton kernel.

    codes (R, C) e4m3, rows contiguous  ->  out (C, R) e4m3, rows contiguous (out = codes^T)

Why: dX = dY W needs W_q with the contraction dimension (N) contiguous, because Hopper's fp8
tensor cores take only K-major operands, in torch._scaled_mm and in Triton alike. W_q is
stored once, (N, K) for the forward's X W^T; storing its transpose as well would give back
the memory fp8 saves. So every backward makes a transient (K, N) copy. torch's
`.t().contiguous()` on a 1-byte dtype runs the generic strided copy, a fraction of the memory's
rate and a large part of the fp8 GEMM it feeds. And reading W_q as stored inside the GEMM (a
(K, N) TMA block fed to tl.dot) is several times slower than the K-major GEMM: Triton has no
fast path for an N-major fp8 operand (docs/bench/design-choices.md#fp8-quantisation-and-transpose).

This kernel moves square tiles: each program loads a BLOCK x BLOCK tile with rows along C
(coalesced), transposes it in registers/shared memory (tl.trans) and stores it with rows
along R (coalesced). The codes are moved as bytes (uint8 views): a transpose never looks at
the values, so NaN codes and every bit pattern survive. Tile side 128 with 8 warps: the fastest
of 64 or 128 and 4 or 8 warps at all four Llama weights, near the memory's rate
(docs/bench/design-choices.md#fp8-quantisation-and-transpose).
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..launch_plan import launch
from ...errors import UnslothCompileError

E4M3 = torch.float8_e4m3fn
BLOCK = 128  # bytes per tile side: 128-byte rows on both sides of the transpose (measured best)


@triton.jit
def _transpose_bytes_kernel(
    src_ptr, dst_ptr,
    R, C,
    stride_sr, stride_dr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[c, r] = src[r, c] over one BLOCK_R x BLOCK_C tile of src."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    tile = tl.load(src_ptr + rows[:, None] * stride_sr + cols[None, :], mask=inside)
    tl.store(dst_ptr + cols[:, None] * stride_dr + rows[None, :], tl.trans(tile), mask=tl.trans(inside))


def transpose_codes(codes: Tensor, block: int = BLOCK, num_warps: int = 8) -> Tensor:
    """codes^T as a new contiguous (C, R) tensor of the same dtype, for a 2-D tensor of 1-byte
    elements whose rows are contiguous (stride(1) == 1), on CUDA or under the interpreter.
    block, num_warps: the tile side and warps per program (a probe's sweep; defaults measured)."""
    if codes.dim() != 2 or codes.element_size() != 1 or codes.stride(1) != 1:
        raise UnslothCompileError("unsloth_compile.kernels.fp8.fp8_transpose: transpose_codes takes a 2-D tensor of "
                                  f"1-byte elements with contiguous rows, got {codes.dtype} of shape "
                                  f"{tuple(codes.shape)} and strides {codes.stride()}")
    R, C = codes.shape
    out = torch.empty((C, R), dtype=codes.dtype, device=codes.device)
    if R == 0 or C == 0:
        return out
    src, dst = codes.view(torch.uint8), out.view(torch.uint8)
    launch(_transpose_bytes_kernel, (triton.cdiv(R, block), triton.cdiv(C, block)),
           src_ptr=src, dst_ptr=dst, R=R, C=C, stride_sr=src.stride(0), stride_dr=dst.stride(0),
           BLOCK_R=block, BLOCK_C=block, num_warps=num_warps, num_stages=1)
    return out
