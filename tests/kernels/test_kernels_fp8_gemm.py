"""kernels/fp8/fp8_gemm.py: the Triton FP8 GEMM with the LoRA term in its epilogue, against a
float64 formula and against kernels/fp8/fp8.py's emulation (the fp8 numerics' reference): rowwise
dequantisation of both operands, + s U V, bias and s v_bias, a tensor scale, no column scale
(the backward's form), ragged tiles. CPU: the Triton interpreter (one small configuration);
GPU (marker `gpu`): the autotuned kernel at larger shapes, and the LoRA op choosing it."""

from __future__ import annotations

import pytest
import torch

from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.kernels.fp8 import fp8
from unsloth_compile.kernels.fp8.fp8_gemm import fp8_lora_gemm, unsupported

E4M3 = torch.float8_e4m3fn


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _problem(M, N, K, R, dtype, device, seed=0, bias=False, v_bias=False, col_scale=True, residual=False):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, so that the per-row scales matter
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M).reshape(-1, 1)
    w = torch.randn(N, K, generator=g) * K ** -0.5 * torch.logspace(-1, 1, N).reshape(-1, 1)
    a_codes, a_dequant = fp8.quantize_rowwise(x)
    b_codes, b_dequant = fp8.quantize_rowwise(w)
    if not col_scale:  # codes that stand for themselves (the backward folds W's scales into dY)
        b_codes = (torch.randn(N, K, generator=g) * 2).to(E4M3)
    u = (torch.randn(M, R, generator=g) * 0.5).to(dtype)
    v = (torch.randn(R, N, generator=g) * 0.5).to(dtype)
    args = dict(a_codes=a_codes, a_dequant=a_dequant.reshape(-1), b_codes=b_codes,
                b_dequant=b_dequant.reshape(-1) if col_scale else None, u=u, v=v,
                bias=torch.randn(N, generator=g).to(dtype) if bias else None,
                v_bias=torch.randn(N, generator=g) if v_bias else None,
                # strided (a transposed view), as the epilogue reads it by strides
                residual=torch.randn(N, M, generator=g).to(dtype).t() if residual else None)
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in args.items()}


def _plus_terms(base, p, scale, dtype):
    """base + s U V + bias + s v_bias + residual, each term in `dtype`."""
    out = base + scale * (p["u"].to(dtype) @ p["v"].to(dtype))
    for term, weight in ((p["bias"], 1.0), (p["v_bias"], scale), (p["residual"], 1.0)):
        if term is not None:
            out = out + weight * term.to(dtype)
    return out


def _float64(p, scale):
    base = p["a_codes"].double() @ p["b_codes"].double().t() * p["a_dequant"].double().reshape(-1, 1)
    if p["b_dequant"] is not None:
        base = base * p["b_dequant"].double().reshape(1, -1)
    return _plus_terms(base, p, scale, torch.float64)


def _emulated(p, scale):
    """kernels/fp8/fp8.py's emulation of the base (fp32 GEMM of the codes, both scales, rounded to
    bf16 as torch._scaled_mm returns), plus the LoRA term and biases in fp32."""
    ones = torch.ones(1, p["b_codes"].shape[0], device=p["a_codes"].device)
    b_dequant = ones if p["b_dequant"] is None else p["b_dequant"].reshape(1, -1)
    base = fp8._scaled_gemm(p["a_codes"], p["a_dequant"].reshape(-1, 1), p["b_codes"].t(), b_dequant, emulate=True)
    return _plus_terms(base.float(), p, scale, torch.float32)


# Hopper's fp8 tensor cores accumulate a K loop in less than fp32 (Triton does not promote the
# partial sums; cuBLAS, behind torch._scaled_mm, does): measured on the H200 at K <= 4096, up to
# 2.1e-3 of the largest output (4 fp16 ulps) against float64, and the op's output SQNR against
# float64 unchanged (28.47-28.51 dB with this kernel, 28.49-28.50 with _scaled_mm: fp8's own
# rounding dominates; docs/bench/kernel-fp8-s9.md). The interpreter accumulates in fp32.
GPU_ACCUMULATION = 4e-3


def _check(p, out, scale, dtype, accumulation=0.0):
    want = _float64(p, scale)
    err = ((out.double() - want).abs().max() / want.abs().max()).item()
    # one rounding of the fp32 tile to the output dtype (the fp8 products are exact in fp32
    # up to accumulation order): a few ulps of the largest value
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    if p["residual"] is not None:  # cast, add the residual, cast again: one more rounding
        accumulation += ulp
    assert err <= 2 * ulp + accumulation, f"max error {err:.2e} of the largest value against float64"
    # the emulation rounds the fp8 product to bf16 before the LoRA term (as torch._scaled_mm
    # returns it): half a bf16 ulp of difference on top of ours
    emulated = _emulated(p, scale)
    err_emulated = ((out.double() - emulated.double()).abs().max() / emulated.double().abs().max()).item()
    assert err_emulated <= 2 ** -9 + 2 * ulp + accumulation, f"max error {err_emulated:.2e} against the emulation"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case (CPU); the GPU cases run below")
@pytest.mark.parametrize("M, N, K, R, flags", [
    (37, 48, 64, 5, {}),
    (16, 32, 32, 16, {"bias": True, "v_bias": True}),
    (50, 80, 96, 3, {"col_scale": False}),  # the backward's form: no column scale
    (1, 16, 48, 8, {"scale_tensor": True}),
    (21, 40, 64, 4, {"residual": True, "bias": True}),
    (37, 48, 64, 5, {"prefetch": False}),  # the low-rank tiles loaded after the main loop
    (19, 32, 64, 80, {"bias": True}),  # r > 64: two rank blocks, loaded after the main loop
    # the interpreter's configuration is persistent: its tiles are stored by TMA where they can
    # be (the cases above), here by tl.store
    (37, 48, 64, 5, {"tma_store": False}),
    (21, 40, 64, 4, {"residual": True, "bias": True, "tma_store": False}),
], ids=["ragged", "biases", "no-column-scale", "one-row-tensor-scale", "residual", "no-prefetch", "rank-80",
        "tl-store-ragged", "tl-store-residual"])
def test_interpreter_matches_float64_and_the_emulation(M, N, K, R, flags):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (the README's test command sets it)")
    dtype = torch.float16  # the interpreter's bf16 is unreliable
    p = _problem(M, N, K, R, dtype, torch.device("cpu"), bias=flags.get("bias", False),
                 v_bias=flags.get("v_bias", False), col_scale=flags.get("col_scale", True),
                 residual=flags.get("residual", False))
    assert unsupported(p["a_codes"], p["b_codes"]) is None
    scale_tensor = torch.tensor(0.5) if flags.get("scale_tensor") else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    fp8_lora_gemm(out=out, scale=0.75, scale_tensor=scale_tensor, prefetch=flags.get("prefetch"),
                  tma_store=flags.get("tma_store"), **p)
    _check(p, out, 0.75 * (0.5 if scale_tensor is not None else 1.0), dtype)


def test_unsupported_says_why():
    codes = torch.zeros(4, 32, dtype=E4M3)
    assert "K differs" in (unsupported(codes, torch.zeros(4, 48, dtype=E4M3)) or "")
    assert "must be 2-D" in (unsupported(codes.float(), codes) or "")
    assert "must be 2-D" in (unsupported(torch.zeros(4, 64, dtype=E4M3)[:, ::2], codes) or "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA GPU of capability 9.0 (TMA, fp8 tensor cores)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K, R, flags", [
    (1000, 1024, 512, 16, {}),
    (4096, 1536, 2048, 16, {"bias": True, "v_bias": True}),
    (333, 2048, 1024, 8, {"col_scale": False}),
    (8, 256, 4096, 64, {}),
    (777, 1024, 2048, 16, {"residual": True}),
    (1000, 1024, 512, 16, {"prefetch": False}),
    (300, 512, 1024, 96, {"bias": True}),  # r > 64: two rank blocks, no prefetch
    # the persistent tile alone, its output tiles stored by TMA (ragged M, residual and biases)
    (1000, 1024, 512, 16, {"persistent_tma": True}),
    (777, 1024, 2048, 16, {"residual": True, "bias": True, "v_bias": True, "persistent_tma": True}),
])
def test_gpu_kernel_matches_float64_and_the_emulation(M, N, K, R, flags, dtype, monkeypatch):
    from unsloth_compile.kernels.fp8 import fp8_gemm

    if flags.get("persistent_tma"):
        persistent = [tile for tile in fp8_gemm._TILES if tile[5]]
        assert persistent
        monkeypatch.setattr(fp8_gemm, "_TILES", persistent)
        fp8_gemm._tuned.cache_clear()
    p = _problem(M, N, K, R, dtype, _device(), bias=flags.get("bias", False), v_bias=flags.get("v_bias", False),
                 col_scale=flags.get("col_scale", True), residual=flags.get("residual", False))
    assert unsupported(p["a_codes"], p["b_codes"]) is None
    out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
    try:
        fp8_lora_gemm(out=out, scale=0.75, prefetch=flags.get("prefetch"),
                      tma_store=True if flags.get("persistent_tma") else None, **p)
    finally:
        fp8_gemm._tuned.cache_clear()
    _check(p, out, 0.75, dtype, accumulation=GPU_ACCUMULATION)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA GPU of capability 9.0")
@pytest.mark.parametrize("main_gemm", ["triton", "cublas", "auto"])
def test_gpu_lora_op_gives_the_same_results_with_either_fp8_gemm(main_gemm):
    """The fp8 LoRA op forward and backward with the fused kernel, with torch._scaled_mm and a
    separate LoRA pass, and on auto (the fused kernel on Hopper): each within bf16 rounding of
    the emulation."""
    from unsloth_compile.kernels import knobs

    g = torch.Generator().manual_seed(1)
    M, K, N, r = 2048, 1024, 3072, 16
    x = torch.randn(M, K, generator=g).bfloat16().cuda()
    dy = torch.randn(M, N, generator=g).bfloat16().cuda()
    codes, scales = fp8.quantize_weight((torch.randn(N, K, generator=g) * K ** -0.5).cuda())
    A = (torch.randn(r, K, generator=g) * 0.05).cuda()
    B = (torch.randn(N, r, generator=g) * 0.05).cuda()
    results = {}
    for emulate in (False, True):
        with knobs.patch(main_gemm=main_gemm):
            out, hidden = fp8.lora_linear_fp8_forward(x, codes, scales, None, A, B, None, None, None, 2.0, None,
                                                      torch.bfloat16, emulate)
            dx, _, dA, dB = fp8.lora_linear_fp8_backward(dy, x, codes, scales, A, B, None, hidden, 2.0, None, emulate)
        results[emulate] = (out, dx, dA, dB)
    for name, got, want in zip(("out", "dx", "dA", "dB"), results[False], results[True]):
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err < 2e-2, f"{main_gemm}: {name} max error {err:.2e}"


@pytest.mark.parametrize("main_gemm,runs_on_cpu_codes,want", [
    ("auto", True, "fused"), ("triton", True, "fused"), ("cublas", True, "scaled_mm"),
    ("auto", False, "scaled_mm"), ("triton", False, "error")])
def test_the_op_takes_the_fused_gemm_wherever_it_runs(main_gemm, runs_on_cpu_codes, want):
    """`_fp8_gemm`: auto and triton take the fused kernel where `unsupported` says it runs (here:
    the interpreter with K-contiguous e4m3 codes), cublas always torch._scaled_mm; where it cannot
    run (codes not K-contiguous), auto falls back to torch._scaled_mm and triton raises, naming why."""
    from unsloth_compile.kernels import knobs

    codes = fp8.quantize_weight(torch.randn(32, 64))[0]
    b_codes = codes if runs_on_cpu_codes else codes.t().contiguous().t()
    calls = []
    run = lambda: fp8._fp8_gemm("forward", codes, b_codes, lambda: calls.append("scaled_mm"),  # noqa: E731
                                lambda: calls.append("fused"))
    with knobs.patch(main_gemm=main_gemm):
        if want == "error":
            with pytest.raises(UnslothCompileError, match="K-contiguous"):
                run()
            return
        run()
    assert calls == [want]
