"""kernels/lowrank_thin.py (the rank-sized GEMMs H, G, dA, dB) against float64.

Without CUDA they run in the Triton interpreter (fp32, fp16; awkward sizes, ranks 1 to 70,
strided operands, both output layouts, float and tensor scales); the `gpu` tests run bf16 at
Llama sizes and the whole op with the thin kernels forced on.
"""

from __future__ import annotations

import pytest
import torch

from helpers import triton_kernel_module

HAS_CUDA = torch.cuda.is_available()
thin = triton_kernel_module("lowrank_thin")

interp = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on machines without CUDA")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rand(*shape, dtype, device, seed, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)


# fp32 in the interpreter is exact up to summation order; fp16 is judged against the same
# product computed by torch in fp16 inputs / fp32 accumulation (what cuBLAS does).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SHAPES = [(1, 19, 1), (37, 19, 7), (45, 70, 16), (130, 33, 70)]  # (M, K, r)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,r", SHAPES)
@pytest.mark.parametrize("w_layout", ["A^T view", "B rows"])
def test_rows_times_thin(M, K, r, dtype, w_layout):
    x = _rand(M, 2 * K, dtype=dtype, device="cpu", seed=M + r)[:, ::2]  # row stride 2K, col stride 2
    if w_layout == "A^T view":
        w = _rand(r, K, dtype=torch.float32, device="cpu", seed=3).t()  # (K, r), strides (1, K)
    else:
        w = _rand(K, r, dtype=torch.float32, device="cpu", seed=4)
    out = thin.rows_times_thin(x, w, torch.float32)
    want = x.double() @ w.to(dtype).double()
    assert out.shape == (M, r) and out.dtype == torch.float32
    assert _rel_err(out, want) < TOL[dtype], _rel_err(out, want)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,C,r", [(1, 19, 1), (37, 19, 7), (300, 45, 16), (1100, 70, 20)])
@pytest.mark.parametrize("rank_first", [True, False], ids=["dA_layout", "dB_layout"])
@pytest.mark.parametrize("scale_tensor", [False, True], ids=["float_scale", "scale_tensor"])
def test_thin_t_times_rows(M, C, r, dtype, rank_first, scale_tensor):
    """M up to 1100 makes several row splits (partials summed)."""
    t = _rand(M, r, dtype=torch.float32, device="cpu", seed=M)
    x = _rand(M, C, dtype=dtype, device="cpu", seed=C + 1)
    st = torch.tensor(1.5) if scale_tensor else None
    out = thin.thin_t_times_rows(t, x, 0.75, st, torch.float32, rank_first=rank_first)
    s = 0.75 * (1.5 if scale_tensor else 1.0)
    want = s * (t.to(dtype).double().t() @ x.double())  # (r, C)
    if not rank_first:
        want = want.t()
    assert out.shape == want.shape and out.dtype == torch.float32
    assert _rel_err(out, want) < TOL[dtype], _rel_err(out, want)


@interp
def test_empty_rows_give_zero_gradients():
    t, x = torch.randn(0, 5), torch.randn(0, 9)
    out = thin.thin_t_times_rows(t, x, 2.0, None, torch.float32, rank_first=True)
    assert out.shape == (5, 9) and torch.equal(out, torch.zeros(5, 9))
    assert thin.rows_times_thin(x, torch.randn(9, 5), torch.float32).shape == (0, 5)


@gpu
@needs_cuda
@pytest.mark.parametrize("M,K,r", [(8192, 4096, 16), (4000, 14336, 64), (37, 19, 7), (1000, 1030, 256)])
def test_gpu_thin_kernels_bf16(M, K, r):
    x = _rand(M, K, dtype=torch.bfloat16, device="cuda", seed=1)
    w = _rand(r, K, dtype=torch.float32, device="cuda", seed=2, std=K ** -0.5)
    h = thin.rows_times_thin(x, w.t(), torch.float32)
    want = x.double() @ w.t().bfloat16().double()
    assert _rel_err(h, want) < 1e-3, _rel_err(h, want)
    t = _rand(M, r, dtype=torch.bfloat16, device="cuda", seed=3)
    for rank_first in (True, False):
        got = thin.thin_t_times_rows(t, x, 0.5, None, torch.float32, rank_first=rank_first)
        want = 0.5 * (t.double().t() @ x.double())
        want = want if rank_first else want.t()
        assert _rel_err(got, want) < 1e-3, (rank_first, _rel_err(got, want))
