"""kernels/fp8/fp8_transpose.py: the backward's transposed copy of the fp8 weight codes. Every byte
must land where torch's transpose puts it (codes are moved, never looked at: NaN codes and every
bit pattern included), on ragged shapes that leave partial tiles on both sides. CPU: the Triton
interpreter; GPU (marker `gpu`): the Llama-8B weight shapes and ragged ones; and the fp8 op's
backward calls it (its dX through the transposed copy equals the emulation's)."""

from __future__ import annotations

import pytest
import torch

from unsloth_compile.kernels.fp8 import fp8
from unsloth_compile.kernels.fp8.fp8_transpose import transpose_codes

E4M3 = torch.float8_e4m3fn


def _codes(R, C, device, seed=0):
    """Every byte value, NaN codes (0x7F, 0xFF) included, as e4m3."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (R, C), generator=g, dtype=torch.uint8).view(E4M3).to(device)


def _check(R, C, device, **tiling):
    codes = _codes(R, C, device, seed=R * 1000 + C)
    out = transpose_codes(codes, **tiling)
    assert out.shape == (C, R) and out.dtype == E4M3 and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), codes.view(torch.uint8).t()), (R, C)


@pytest.mark.parametrize("R,C", [(1, 16), (37, 200), (129, 257), (300, 5), (128, 384)])
def test_transpose_moves_every_byte_in_the_interpreter(R, C):
    _check(R, C, "cpu")


def test_transpose_with_small_tiles_covers_many_programs():
    _check(70, 45, "cpu", block=16, num_warps=1)


def test_transpose_refuses_what_it_cannot_move():
    with pytest.raises(ValueError, match="1-byte"):
        transpose_codes(torch.randn(4, 4))
    with pytest.raises(ValueError, match="contiguous rows"):
        transpose_codes(_codes(4, 8, "cpu").t())
    empty = transpose_codes(_codes(0, 8, "cpu"))
    assert empty.shape == (8, 0)


def test_the_fp8_backward_through_the_transposed_copy_equals_the_emulation():
    """base_grad_input on the GPU path (not emulated) reads W_q through transpose_codes; in the
    interpreter its GEMM is the emulation's exact fp32 product, so dX must equal it."""
    g = torch.Generator().manual_seed(1)
    w_codes, w_dequant = fp8.quantize_weight(torch.randn(48, 80, generator=g) / 9)
    dy = torch.randn(33, 48, generator=g)
    want = fp8.base_grad_input(dy, w_codes, w_dequant, emulate=True)
    w_t = fp8.transposed_codes(w_codes)
    assert torch.equal(w_t.view(torch.uint8), w_codes.view(torch.uint8).t())
    g_codes, g_dequant = fp8.quantize_rowwise(dy, col_scale=w_dequant)
    got = fp8._grad_codes_times_weight(g_codes, g_dequant, w_t.t(), emulate=True)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("R,C", [(14336, 4096), (4096, 14336), (8192, 2048), (1000, 3000), (4097, 129)])
def test_gpu_transpose_moves_every_byte(R, C):
    _check(R, C, "cuda")
