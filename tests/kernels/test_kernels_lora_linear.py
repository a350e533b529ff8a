"""kernels/lora/lora_linear_triton.py against kernels/reference.py and a float64 computation.

Without CUDA the kernels run in the Triton interpreter (fp32/fp16, small awkward shapes;
tests/conftest.py sets TRITON_INTERPRET=1 before Triton decorates them). With CUDA the
interpreter tests are skipped and the `gpu` tests run bf16/fp16 over a grid incl. Llama
shapes, judged by SQNR against float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import triton_kernel_module

HAS_CUDA = torch.cuda.is_available()
lt = triton_kernel_module("lora.lora_linear_triton")
from unsloth_compile.kernels import knobs  # noqa: E402
from unsloth_compile.kernels.lora import lora_gemm as gemm  # noqa: E402
from unsloth_compile.kernels import launch_plan, reference  # noqa: E402

interp = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on machines without CUDA")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _make(M, K, N, r, dtype, adapter_dtype, device, *, bias=False, b_bias=False, residual=False,
          lora_x=False, scale_tensor=False, transposed=False, three_d=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device)

    if three_d:  # (2, M/2-ish, K) with a non-unit row stride: every second token of a bigger batch
        rows = max(1, M // 2)
        x = rnd(2, 2 * rows, K)[:, ::2, :].to(dtype)
    else:
        x = rnd(M, K).to(dtype)
    lead = x.shape[:-1]
    w = rnd(N, K, std=K ** -0.5).to(dtype)
    if transposed:
        w = w.t().contiguous()
    t = dict(
        x=x, weight=w,
        bias=rnd(N).to(dtype) if bias else None,
        lora_A=rnd(r, K, std=K ** -0.5).to(adapter_dtype),
        lora_B=rnd(N, r, std=r ** -0.5).to(adapter_dtype),
        lora_B_bias=rnd(N, std=0.1).to(adapter_dtype) if b_bias else None,
        lora_x=(rnd(*lead, K) * (torch.rand(*lead, K, generator=g) > 0.3).to(device) * 1.4).to(dtype)
        if lora_x else None,
        residual=rnd(*lead, N).to(dtype) if residual else None,
        scale=0.75,
        scale_tensor=torch.tensor(1.5, device=device, dtype=adapter_dtype) if scale_tensor else None,
        weight_transposed=transposed,
    )
    grad = rnd(*lead, N).to(dtype)
    return t, grad


def _fwd(mod, t, out_dtype):
    return mod.lora_linear_forward(
        t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["lora_B_bias"], t["lora_x"],
        t["residual"], t["scale"], t["scale_tensor"], t["weight_transposed"], out_dtype)


def _bwd(mod, t, grad, hidden, base_dtype):
    """(dx, d_lora_x, dA, dB): bias gradients are not the backward's (ops.side_grads)."""
    return mod.lora_linear_backward(
        grad, t["x"], t["weight"], t["lora_A"], t["lora_B"], t["lora_x"], hidden, t["scale"],
        t["scale_tensor"], t["weight_transposed"], base_dtype)


def _cast(t, dtype, adapter_dtype=None):
    """Every tensor of t in dtype (adapters in adapter_dtype when given)."""
    adapters = ("lora_A", "lora_B", "lora_B_bias", "scale_tensor")
    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(adapter_dtype if (adapter_dtype is not None and k in adapters) else dtype)
        else:
            out[k] = v
    return out


NAMES = ("out", "lora_hidden", "dx", "d_lora_x", "dA", "dB")


def _run_all(mod, t, grad):
    out_dtype = t["x"].dtype
    out, hidden = _fwd(mod, t, out_dtype)
    grads = _bwd(mod, t, grad, hidden, t["weight"].dtype)
    return dict(zip(NAMES, (out, hidden) + tuple(grads)))


def _float64(t, grad):
    """The reference with every tensor in float64 (on the tensors' device: fp64 GEMMs at
    Llama shapes take seconds on a GPU, minutes on a CPU)."""
    return _run_all(reference, _cast(t, torch.float64), grad.double())


def _first_mismatches(ours, ref, atol, rtol, n=5):
    bad = ~torch.isclose(ours, ref, atol=atol, rtol=rtol)
    idx = bad.nonzero()[:n].tolist()
    return ", ".join(f"{tuple(i)}: ours {ours[tuple(i)].item():.6g} ref {ref[tuple(i)].item():.6g}" for i in idx)


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sqnr(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    noise = (a - ref).norm().item()
    return math.inf if noise == 0 else 20 * math.log10(ref.norm().item() / noise)


def _compare(ours, ref, ref_half, ref64, *, atol, rtol, f64_margin):
    """Each output: present iff the reference has it, same shape and dtype, close to the
    reference (atol relative to its largest magnitude), and no further from float64 than
    f64_margin x the larger error of the reference and of the reference run entirely in the
    activation dtype (the kernels round fp32 adapters to it by design), plus a floor."""
    for name in NAMES:
        o, r, r64 = ours[name], ref[name], ref64[name]
        assert (o is None) == (r is None), f"{name}: ours {o is not None}, reference {r is not None}"
        if o is None:
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, f"{name}: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten output?)"
        scale = r.detach().abs().max().item() or 1.0
        o32, r32 = o.detach().float().cpu(), r.detach().float().cpu()
        ok = torch.allclose(o32, r32, atol=atol * scale, rtol=rtol)
        assert ok, f"{name}: differs from the reference; first mismatches {_first_mismatches(o32, r32, atol * scale, rtol)}"
        e_ours, e_ref = _rel_err(o, r64), max(_rel_err(r, r64), _rel_err(ref_half[name], r64))
        assert e_ours <= f64_margin * e_ref + 1e-6 + (4e-4 if o.dtype == torch.float16 else 0.0), (
            f"{name}: rel. error vs float64 {e_ours:.3g} > {f64_margin} x reference's {e_ref:.3g}")


# ------------------------------------------------------------------------------------------
# interpreter tests (CPU)
# ------------------------------------------------------------------------------------------

INTERP_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3)}

SHAPES = [  # (M, K, N, r): a single row, nothing a multiple of 16, r-loop over several blocks
    (1, 19, 23, 1),
    (37, 19, 23, 7),
    (37, 19, 23, 16),
    (20, 33, 17, 70),
    (37, 40, 24, 7),  # 16-byte aligned rows: the TMA-descriptor main loop (K tail zero-filled)
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_interpreter_shapes(M, K, N, r, dtype):
    adapter = torch.float32
    t, grad = _make(M, K, N, r, dtype, adapter, "cpu", seed=M * 131 + r)
    ours, ref = _run_all(lt, t, grad), _run_all(reference, t, grad)
    atol, rtol = INTERP_TOL[dtype]
    ref_half = _run_all(reference, _cast(t, dtype), grad)
    _compare(ours, ref, ref_half, _float64(t, grad), atol=atol, rtol=rtol, f64_margin=1.5)


VARIANTS = {
    "bias": dict(bias=True),
    "lora_B_bias": dict(b_bias=True),
    "residual": dict(residual=True),
    "dropout": dict(lora_x=True),
    "scale_tensor": dict(scale_tensor=True),
    "conv1d": dict(transposed=True),
    "3d_strided": dict(three_d=True),
    "all": dict(bias=True, b_bias=True, residual=True, lora_x=True, scale_tensor=True,
                transposed=True, three_d=True),
}


@interp
@pytest.mark.parametrize("adapter", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interpreter_variants(variant, dtype, adapter):
    adapter_dtype = torch.float32 if adapter == "fp32" else dtype
    t, grad = _make(37, 19, 23, 7, dtype, adapter_dtype, "cpu", seed=7, **VARIANTS[variant])
    assert lt.supports(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["lora_x"])[0]
    ours, ref = _run_all(lt, t, grad), _run_all(reference, t, grad)
    atol, rtol = INTERP_TOL[dtype]
    ref_half = _run_all(reference, _cast(t, dtype), grad)
    _compare(ours, ref, ref_half, _float64(t, grad), atol=atol, rtol=rtol, f64_margin=1.5)


@interp
def test_interpreter_expanded_grad_and_no_rows():
    """grad_out as `sum().backward()` makes it (stride 0), and M = 0."""
    t, _ = _make(37, 19, 23, 7, torch.float32, torch.float32, "cpu", bias=True)
    out, hidden = _fwd(lt, t, torch.float32)
    grad = torch.ones(()).expand_as(out)
    ours = _bwd(lt, t, grad, hidden, torch.float32)
    ref = _bwd(reference, t, grad, hidden, torch.float32)
    for name, o, r in zip(NAMES[2:], ours, ref):
        assert (o is None) == (r is None), name
        if o is not None:
            assert torch.allclose(o, r, atol=1e-5, rtol=1e-5), f"{name}: {_first_mismatches(o, r, 1e-5, 1e-5)}"
    t0, g0 = _make(0, 19, 23, 7, torch.float32, torch.float32, "cpu")
    t0["x"] = t0["x"][:0]
    out0, h0 = _fwd(lt, t0, torch.float32)
    assert out0.shape == (0, 23) and h0.shape == (0, 7)
    dx0 = _bwd(lt, t0, out0, h0, torch.float32)[0]
    assert dx0.shape == (0, 19)


@interp
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_interpreter_both_main_loops_agree(transposed):
    """The TMA-descriptor and pointer main loops compute the same thing (aligned shape)."""
    t, grad = _make(37, 40, 24, 7, torch.float32, torch.float32, "cpu", bias=True, residual=True,
                    transposed=transposed)
    assert gemm._use_tma(t["x"], t["weight"] if transposed else t["weight"].t())[0]
    tma = _run_all(lt, t, grad)
    with knobs.patch(main_loop="pointer"):
        assert not gemm._use_tma(t["x"], t["weight"])[0]
        pointer = _run_all(lt, t, grad)
    for name in NAMES:
        if tma[name] is not None:
            assert torch.allclose(tma[name], pointer[name], atol=1e-5, rtol=1e-5), name


def _gemm_operands(M, K, N, r, dtype, device, b_k_contiguous, seed):
    """a (M, K), b (K, N) (a W^T view when b_k_contiguous), u (M, r), v (r, N), bias (N,),
    residual (M, N), random, and the float64 result of the fused GEMM with scale 0.5."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    a, u = rnd(M, K), rnd(M, r)
    b = rnd(N, K, std=K ** -0.5).t() if b_k_contiguous else rnd(K, N, std=K ** -0.5)
    v, bias, residual = rnd(r, N, std=r ** -0.5), rnd(N), rnd(M, N)
    want = a.double() @ b.double() + 0.5 * (u.double() @ v.double()) + bias.double()
    want = want.to(dtype).double() + residual.double()  # the kernel rounds before the residual add
    return (a, b, u, v, bias, residual), want


@interp
@pytest.mark.parametrize("b_k_contiguous", [False, True], ids=["b_rows", "w_t_view"])
def test_interpreter_persistent_tma_programs_loop_over_tiles(b_k_contiguous):
    """The TMA kernel's persistent flavour: fewer programs than tiles (each loops over several,
    epilogue included) gives the one-program-per-tile result and float64's."""
    M, K, N, r = 70, 40, 88, 7  # 5 x 6 tiles of 16 x 16 over 4 programs
    (a, b, u, v, bias, residual), want = _gemm_operands(M, K, N, r, torch.float32, "cpu", b_k_contiguous, 11)
    assert gemm._use_tma(a, b)[0]
    cfg = dict(gemm._INTERPRETER_TMA_CONFIG)
    assert gemm._programs(M, N, cfg, a.device) == 4 < 30
    outs = {}
    for persistent in (True, False):
        out = torch.empty(M, N)
        gemm.launch_lora_gemm(a, b, u, v, out, 0.5, None, bias=bias, residual=residual,
                              config={**cfg, "PERSISTENT": persistent})
        outs[persistent] = out
        assert _rel_err(out, want) < 1e-5, (persistent, _rel_err(out, want))
    assert torch.equal(outs[True], outs[False])


@interp
@knobs.patch(main_loop="pointer")
def test_interpreter_fixed_persistent_config_falls_back_to_one_program_per_tile_without_tma():
    """A persistent config given for operands the TMA kernel cannot take runs the pointer
    kernel with its full grid (every tile computed)."""
    (a, b, u, v, bias, residual), want = _gemm_operands(70, 40, 88, 7, torch.float32, "cpu", False, 13)
    out = torch.empty(70, 88)
    gemm.launch_lora_gemm(a, b, u, v, out, 0.5, None, bias=bias, residual=residual,
                          config=dict(gemm._INTERPRETER_TMA_CONFIG))
    assert _rel_err(out, want) < 1e-5, _rel_err(out, want)


@interp
@pytest.mark.parametrize("r,pair_enabled,expect_one_pass", [(16, True, True), (16, False, False),
                                                              (70, True, False)],
                         ids=["r16", "r16_knob_off", "r70_over_pair_max_rank"])
def test_interpreter_g_and_db_from_one_pass_or_apart(r, pair_enabled, expect_one_pass, monkeypatch):
    """Backward takes G and dB from one pass over dY (rows_thin_pair) at r <= PAIR_MAX_RANK
    unless the thin_pair knob turns it off, else from the two thin kernels; either way the
    gradients match float64."""
    calls = []
    one_pass = lt.rows_thin_pair
    monkeypatch.setattr(lt, "rows_thin_pair", lambda *a, **k: calls.append(1) or one_pass(*a, **k))
    t, grad = _make(37, 19, 23, r, torch.float32, torch.float32, "cpu", seed=r)
    with knobs.patch(thin_pair=pair_enabled):
        ours = _run_all(lt, t, grad)
    assert len(calls) == (1 if expect_one_pass else 0)
    ref64 = _float64(t, grad)
    for name in ("dx", "dA", "dB"):
        assert _rel_err(ours[name], ref64[name]) < 1e-5, (name, _rel_err(ours[name], ref64[name]))


@interp
def test_supports_reasons():
    x = torch.randn(4, 8)
    w = torch.randn(5, 8)
    A, B = torch.randn(3, 8), torch.randn(5, 3)
    assert lt.supports(x, w, A, B, None) == (True, "")
    ok, why = lt.supports(x.double(), w.double(), A, B, None)
    assert not ok and "float64" in why
    ok, why = lt.supports(x, w.half(), A, B, None)
    assert not ok and "weight" in why
    ok, why = lt.supports(x, w, torch.randn(300, 8), torch.randn(5, 300), None)
    assert not ok and "rank 300" in why
    ok, why = lt.supports(x, w, A, B, torch.randn(4, 9))
    assert not ok and "lora_x" in why


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("scale_tensor", [False, True], ids=["float_scale", "scale_tensor"])
def test_cublas_composition_matches_float64(bias, scale_tensor):
    """_cublas_lora_gemm (low-rank term written first, base GEMM accumulated onto it) against
    float64, here with CPU fp32 tensors (the same torch calls run cuBLAS on a GPU)."""
    g = torch.Generator().manual_seed(11)
    M, K, N, r = 45, 38, 29, 7
    a, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).t()  # b: (K, N) view
    u, v = torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)
    bias_t = torch.randn(N, generator=g) if bias else None
    st = torch.tensor(1.5) if scale_tensor else None
    out = torch.full((M, N), float("nan"))
    result = lt._cublas_lora_gemm(a, b, u, v, out, 0.75, st, bias_t)
    s = 0.75 * (1.5 if scale_tensor else 1.0)
    want = a.double() @ b.double() + s * (u.double() @ v.double())
    if bias:
        want = want + bias_t.double()
    assert result.data_ptr() == out.data_ptr(), "must write into out (no temporary)"
    assert _rel_err(out, want) < 1e-6, _rel_err(out, want)


def test_plan_key_follows_what_triton_specialises():
    """Plans are keyed on this: a misaligned view, another pointer dtype (a bf16 vs fp32
    lora_B bias or scale tensor), M % 16 and M == 1 must all change it."""
    base = torch.randn(64, 32)
    spec = launch_plan.specialization
    assert spec((base, 32)) != spec((base[:, 1:], 32))
    assert spec((base, 32)) != spec((base.half(), 32))
    assert spec((base, 48)) != spec((base, 37))
    assert spec((base, 1)) != spec((base, 3))
    assert spec((base, 37)) == spec((base[1:], 21))


# ------------------------------------------------------------------------------------------
# GPU tests
# ------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (name, M, K, N, r)
    ("awkward", 37, 19, 23, 7),
    ("awkward.big", 1000, 1000, 1030, 13),
    ("llama-8b.attn.q", 2048, 4096, 4096, 16),
    ("llama-8b.mlp.up", 2048, 4096, 14336, 16),
    ("llama-8b.mlp.down", 2048, 14336, 4096, 16),
    ("llama-8b.attn.q.r64", 1024, 4096, 4096, 64),
    ("rank256", 512, 1024, 768, 256),
]
SQNR_MARGIN_DB = 1.0


# Both candidates of _lora_gemm_triton_or_cublas and of _thin_gemm_triton_or_cublas, each
# forced: "triton" = Triton main GEMM and thin kernels, "cublas" = the cuBLAS composition and
# cuBLAS thin GEMMs.
MAIN_GEMMS = ["triton", "cublas"]


@gpu
@needs_cuda
@pytest.mark.parametrize("main_gemm", MAIN_GEMMS)
@pytest.mark.parametrize("adapter", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,M,K,N,r", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_sqnr(name, M, K, N, r, dtype, adapter, main_gemm):
    adapter_dtype = torch.float32 if adapter == "fp32" else dtype
    t, grad = _make(M, K, N, r, dtype, adapter_dtype, "cuda", seed=r + M)
    with knobs.patch(main_gemm=main_gemm, thin=main_gemm):
        ours = _run_all(lt, t, grad)
    ref64 = _float64(t, grad)
    torch_half = _run_all(reference, _cast(t, dtype), grad)  # PyTorch's own result in dtype
    _check_sqnr(ours, torch_half, ref64, name)


def _check_sqnr(ours, torch_half, ref64, label):
    for key in NAMES:
        o, r64 = ours[key], ref64[key]
        assert (o is None) == (r64 is None), key
        if o is None:
            continue
        assert torch.isfinite(o).all(), f"{label} {key}: non-finite values"
        mine, theirs = _sqnr(o, r64), _sqnr(torch_half[key], r64)
        assert mine >= theirs - SQNR_MARGIN_DB, f"{label} {key}: SQNR {mine:.1f} dB < torch's {theirs:.1f} dB"


@gpu
@needs_cuda
@pytest.mark.parametrize("main_gemm", MAIN_GEMMS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("adapter", ["fp32", "same"])
def test_gpu_variants(variant, adapter, main_gemm):
    dtype = torch.bfloat16
    adapter_dtype = torch.float32 if adapter == "fp32" else dtype
    t, grad = _make(300, 264, 520, 16, dtype, adapter_dtype, "cuda", seed=3, **VARIANTS[variant])
    with knobs.patch(main_gemm=main_gemm, thin=main_gemm):
        ours = _run_all(lt, t, grad)
    _check_sqnr(ours, _run_all(reference, _cast(t, dtype), grad), _float64(t, grad), variant)


@gpu
@needs_cuda
@pytest.mark.parametrize("main_gemm", ["triton", "auto"])
def test_gpu_repeated_calls_reuse_plans(main_gemm):
    """Later calls of a problem launch the cached compiled kernel directly (launch_plan.Plan.launch):
    new data, an M of the same bucket with other alignment (M % 16), a misaligned x view;
    each result checked, and the plans reused rather than rebuilt per call."""
    calls = 0
    plans_before = len(gemm._PLANS)
    for M, seed, three_d in [(640, 1, False), (640, 2, False), (637, 3, False), (600, 4, False),
                             (640, 5, True), (640, 6, True), (637, 7, False)]:
        t, grad = _make(M, 264, 520, 16, torch.bfloat16, torch.float32, "cuda", seed=seed,
                        bias=True, three_d=three_d)
        with knobs.patch(main_gemm=main_gemm):
            ours = _run_all(lt, t, grad)
        calls += 2
        _check_sqnr(ours, _run_all(reference, _cast(t, torch.bfloat16), grad), _float64(t, grad),
                    f"M={M} seed={seed}")
    if main_gemm == "triton":
        built = len(gemm._PLANS) - plans_before
        assert 0 < built < calls, f"{built} plans built for {calls} launches: no reuse"


@gpu
@needs_cuda
@pytest.mark.parametrize("b_k_contiguous", [False, True], ids=["b_rows", "w_t_view"])
@pytest.mark.parametrize("tile", gemm._PERSISTENT_TILES, ids=lambda t: "x".join(map(str, t)))
def test_gpu_persistent_tma_configs(tile, b_k_contiguous):
    """The persistent TMA configurations the autotuner may pick (not run by the other GPU tests,
    which run UNSLOTH_LORA_AUTOTUNE=0): 4 tiles or more per program, ragged M and N edges."""
    bm, bn, bk, stages, warps = tile
    M, K, N, r = 4000, 520, 4104, 16
    (a, b, u, v, bias, residual), want = _gemm_operands(M, K, N, r, torch.bfloat16, "cuda", b_k_contiguous, 12)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": True,
           "num_stages": stages, "num_warps": warps}
    assert gemm._use_tma(a, b)[0]
    assert math.ceil(M / bm) * math.ceil(N / bn) >= 4 * gemm._programs(M, N, cfg, a.device)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    gemm.launch_lora_gemm(a, b, u, v, out, 0.5, None, bias=bias, residual=residual, config=cfg)
    torch_half = (torch.addmm(bias, a, b) + 0.5 * (u @ v)) + residual
    mine, theirs = _sqnr(out, want), _sqnr(torch_half, want)
    assert mine >= theirs - SQNR_MARGIN_DB, f"SQNR {mine:.1f} dB < torch's {theirs:.1f} dB"


@gpu
@needs_cuda
def test_gpu_op_autograd_matches_reference():
    """torch.ops.unsloth.lora_linear with impl='triton' under autograd vs impl='reference'."""
    import unsloth_compile.ops  # noqa: F401  registers the op

    dtype = torch.bfloat16
    t, grad = _make(512, 1024, 768, 16, dtype, torch.float32, "cuda", bias=True, residual=True)
    results = {}
    for impl in ("triton", "reference"):
        leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "residual")}
        out, _ = torch.ops.unsloth.lora_linear(
            leaves["x"], t["weight"], t["bias"], leaves["lora_A"], leaves["lora_B"], None, None,
            leaves["residual"], t["scale"], None, False, dtype, impl)
        out.backward(grad)
        results[impl] = [out] + [leaves[k].grad for k in ("x", "lora_A", "lora_B", "residual")]
    for name, o, r in zip(("out", "dx", "dA", "dB", "dres"), results["triton"], results["reference"]):
        assert o.dtype == r.dtype, name
        assert _rel_err(o, r) < 2e-2, f"{name}: rel. err {_rel_err(o, r):.3g}"


@gpu
@needs_cuda
def test_gpu_backend_tiny_peft_llama_matches_eager(monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import unsloth_compile  # noqa: F401  registers the backend

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = lt.lora_linear_forward, lt.lora_linear_backward

    def count_fwd(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def count_bwd(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(lt, "lora_linear_forward", count_fwd)
    monkeypatch.setattr(lt, "lora_linear_backward", count_bwd)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, lcfg)
    for name, p in model.named_parameters():  # B starts at zero in PEFT: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 256, (2, 48), device="cuda")

    def step(m):
        model.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.detach().float().clone()
                                       for n, p in model.named_parameters() if p.requires_grad}

    loss_eager, grads_eager = step(model)
    compiled = torch.compile(model, backend="unsloth")
    loss_c, grads_c = step(compiled)
    assert calls["fwd"] > 0 and calls["bwd"] > 0, f"the Triton kernels were not used: {calls}"
    assert abs(loss_c.item() - loss_eager.item()) < 2e-2 * abs(loss_eager.item())
    worst = max(_rel_err(grads_c[n], grads_eager[n]) for n in grads_eager)
    assert worst < 0.1, f"largest relative gradient difference {worst:.3g}"


@gpu
@needs_cuda
def test_gpu_backend_changing_float_scale_uses_scale_tensor():
    """A float LoRA scale that changes between calls (what a rank change does) reaches the
    Triton kernels as a 0-d float64 scale_tensor; the compiled output still matches eager."""
    import unsloth_compile  # noqa: F401  registers the backend
    from unsloth_compile.report import collect_reports

    class LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(256, 320, bias=False).requires_grad_(False)
            self.A = torch.nn.Linear(256, 8, bias=False)
            self.B = torch.nn.Linear(8, 320, bias=False)
            torch.nn.init.normal_(self.B.weight, std=0.05)
            self.scale = 2.0

        def forward(self, x):
            return self.base(x) + self.B(self.A(x.float())) * self.scale

    torch.manual_seed(0)
    model = LoRA().cuda()
    model.base.to(torch.bfloat16)
    compiled = torch.compile(model, backend="unsloth")
    x = torch.randn(2, 96, 256, device="cuda", dtype=torch.bfloat16)
    with collect_reports() as report:
        for scale in (2.0, 0.5, 0.25):
            model.scale = scale
            want = model(x).float()
            got = compiled(x).float()
            assert _rel_err(got, want) < 2e-2, f"scale {scale}: rel. err {_rel_err(got, want):.3g}"
    assert report.refused == [] and report.counters["lora_linear.fused"] == report.graphs >= 2
