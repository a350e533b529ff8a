"""kernels/lora/lowrank_thin.py (the rank-sized GEMMs H, G, dA, dB) against float64.

Without CUDA they run in the Triton interpreter (fp32, fp16; awkward sizes, ranks 1 to 70,
strided operands, both output layouts, float and tensor scales); the `gpu` tests run bf16 at
Llama sizes and the whole op with the thin kernels forced on.
"""

from __future__ import annotations

import pytest
import torch

from helpers import triton_kernel_module

HAS_CUDA = torch.cuda.is_available()
thin = triton_kernel_module("lora.lowrank_thin")

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,C,r", [(1, 19, 1), (37, 19, 7), (300, 45, 16), (1100, 70, 20), (130, 33, 64)])
@pytest.mark.parametrize("target_programs", [0, 40], ids=["default_split", "more_groups"])
@pytest.mark.parametrize("scale_tensor", [False, True], ids=["float_scale", "scale_tensor"])
def test_rows_thin_pair(M, C, r, dtype, target_programs, scale_tensor):
    """Both products of one pass over x (G = dY B, dB = s dY^T H) against float64, with x and
    w strided, several column chunks and row groups (partials summed)."""
    x = _rand(M, 2 * C, dtype=dtype, device="cpu", seed=M + r)[:, ::2]
    w = _rand(r, C, dtype=torch.float32, device="cpu", seed=5).t()  # (C, r), strides (1, C)
    t = _rand(M, r, dtype=torch.float32, device="cpu", seed=6)
    st = torch.tensor([1.5]) if scale_tensor else None  # 1-element, not 0-d: normalised inside
    xw, xt = thin.rows_thin_pair(x, w, t, 0.75, st, torch.float16 if dtype == torch.float16 else torch.float32,
                                 torch.float32, target_programs=target_programs)
    s = 0.75 * (1.5 if scale_tensor else 1.0)
    want_xw = x.double() @ w.to(dtype).double()
    want_xt = s * (x.double().t() @ t.to(dtype).double())
    assert xw.shape == (M, r) and xw.dtype == dtype and xt.shape == (C, r) and xt.dtype == torch.float32
    assert _rel_err(xw, want_xw) < TOL[dtype], _rel_err(xw, want_xw)
    assert _rel_err(xt, want_xt) < TOL[dtype], _rel_err(xt, want_xt)


@interp
def test_rows_thin_pair_refuses_large_ranks():
    r = thin.PAIR_MAX_RANK + 1
    with pytest.raises(ValueError, match="ranks up to"):
        thin.rows_thin_pair(torch.randn(4, 8), torch.randn(8, r), torch.randn(4, r), 1.0, None,
                            torch.float32, torch.float32)


@interp
def test_empty_rows_give_zero_gradients():
    t, x = torch.randn(0, 5), torch.randn(0, 9)
    out = thin.thin_t_times_rows(t, x, 2.0, None, torch.float32, rank_first=True)
    assert out.shape == (5, 9) and torch.equal(out, torch.zeros(5, 9))
    assert thin.rows_times_thin(x, torch.randn(9, 5), torch.float32).shape == (0, 5)
    xw, xt = thin.rows_thin_pair(x, torch.randn(9, 5), t, 2.0, None, torch.float32, torch.float32)
    assert xw.shape == (0, 5) and xt.shape == (9, 5) and torch.equal(xt, torch.zeros(9, 5))


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
    if r <= thin.PAIR_MAX_RANK:  # x as dY (M, C = N), w as lora_B (N, r), t as H
        b = _rand(K, r, dtype=torch.bfloat16, device="cuda", seed=4)
        g, db = thin.rows_thin_pair(x, b, t, 0.5, None, torch.bfloat16, torch.float32)
        for got, want in ((g, x.double() @ b.double()), (db, 0.5 * (x.double().t() @ t.double()))):
            assert _rel_err(got, want) < 4e-3, _rel_err(got, want)


@gpu
@needs_cuda
def test_gpu_direct_launches_equal_the_jit_function_launches():
    """kernels/launch_plan.launch: the second and later calls of a specialisation launch the
    compiled kernel directly; each thin kernel (and the fp8 quantisation) gives bit for bit what
    the JITFunction gives, also for new data in the same specialisation and a new one."""
    from unsloth_compile.kernels import knobs, launch_plan
    from unsloth_compile.kernels.fp8 import fp8_quantize

    def results(seed, M=4096, K=2048, r=16):
        x = _rand(M, K, dtype=torch.bfloat16, device="cuda", seed=seed)
        w = _rand(r, K, dtype=torch.float32, device="cuda", seed=seed + 1, std=K ** -0.5)
        t = _rand(M, r, dtype=torch.bfloat16, device="cuda", seed=seed + 2)
        b = _rand(K, r, dtype=torch.bfloat16, device="cuda", seed=seed + 3)
        return [thin.rows_times_thin(x, w.t(), torch.float32),
                thin.thin_t_times_rows(t, x, 0.5, None, torch.float32, rank_first=True),
                *thin.rows_thin_pair(x, b, t, 0.5, None, torch.bfloat16, torch.float32),
                *(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v for v in fp8_quantize.quantize_rows(x))]

    launch_plan._DIRECT.clear()
    with knobs.patch(direct_launch=False):
        expected = [results(seed) for seed in (0, 10)] + [results(20, M=1000, K=1030)]
    assert not launch_plan._DIRECT
    with knobs.patch(direct_launch=True):  # first, direct, direct, new specialisation
        got = [results(seed) for seed in (0, 10, 0)] + [results(20, M=1000, K=1030)]
    assert len(launch_plan._DIRECT) >= 5  # one compiled kernel per kernel and specialisation
    for want, have in zip(expected[:2] + expected[:1] + expected[2:], got):
        for w_, h_ in zip(want, have):
            assert torch.equal(w_, h_)
