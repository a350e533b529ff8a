"""Float8 frozen base, numerics (kernels/fp8/fp8.py, torch.ops.unsloth.*fp8*): the rowwise
quantisation against an independent rounding oracle (scales, round-to-nearest-even,
saturation, zero rows, NaN/inf), SQNR of both GEMMs against float64, the LoRA op's output and
every gradient against a float64 formula, the torch._scaled_mm call path (on CPU, with CUDA's
layout rules asserted) against the emulation, fake impls, and the GPU capability error."""

from __future__ import annotations

import itertools

import pytest
import torch

import unsloth_compile  # noqa: F401  registers the ops
from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.kernels.fp8 import fp8

E4M3 = torch.float8_e4m3fn


def sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return (20 * torch.log10(want.norm() / (got.double() - want).norm())).item()


def e4m3_oracle(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values (already within +-448) to e4m3 by brute force: the nearest of the
    254 finite codes, ties to the even code. Returns the codes as uint8 bits."""
    codes = torch.arange(256, dtype=torch.uint8)
    table = codes.view(E4M3).double()
    finite = ~table.isnan()
    codes, table = codes[finite], table[finite]
    flat = values.double().reshape(-1, 1)
    distance = (flat - table.reshape(1, -1)).abs()
    best = distance.min(dim=1, keepdim=True).values
    tied = distance == best
    # among the nearest, prefer an even code (mantissa LSB 0); -0 and +0 are both zero
    even = (codes % 2 == 0).reshape(1, -1) & tied
    pick = torch.where(even.any(1, keepdim=True), even, tied).float().argmax(dim=1)
    out = codes[pick]
    zero = flat.reshape(-1) == 0
    out[zero & (torch.signbit(flat.reshape(-1)))] = 0x80
    out[zero & ~torch.signbit(flat.reshape(-1))] = 0x00
    return out.reshape(values.shape)


def random_rows(rows: int, cols: int, dtype, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (1e-6 .. 1e6): per-row scales must follow them."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** (torch.rand(rows, 1, generator=g) * 12 - 6)
    return (torch.randn(rows, cols, generator=g) * magnitude).to(dtype)


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rowwise_codes_are_the_oracles_rounding_with_power_of_two_scales(dtype):
    x = random_rows(37, 53, dtype) if dtype != torch.float16 else random_rows(37, 53, torch.float32).clamp(-6e4, 6e4).half()
    codes, dequant = fp8.quantize_rowwise(x)
    assert codes.dtype == E4M3 and codes.shape == x.shape and codes.is_contiguous()
    assert dequant.dtype == torch.float32 and dequant.shape == (37, 1)
    scale = 1.0 / dequant.double()
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale), "scales must be powers of two"
    amax_scaled = x.double().abs().amax(1, keepdim=True) * scale
    assert (amax_scaled <= 448).all() and (amax_scaled > 224).all(), "the largest power of two that fits"
    want = e4m3_oracle((x.double() * scale))
    got = codes.view(torch.uint8)
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"first mismatches (row, col): {mismatch[:5].tolist()}"


def test_weight_scales_are_per_output_row():
    w = random_rows(48, 32, torch.bfloat16, seed=1)
    codes, scales = fp8.quantize_weight(w)
    assert codes.shape == (48, 32) and scales.shape == (48,)
    assert sqnr_db(fp8.dequantize_rowwise(codes, scales), w) > 28  # every row, whatever its magnitude
    for row in (0, 17, 47):
        assert sqnr_db(fp8.dequantize_rowwise(codes[row:row + 1], scales[row:row + 1]), w[row:row + 1]) > 25


def test_saturation_clamps_to_448_before_the_cast():
    """CUDA's cast makes values past 448 NaN, the CPU's saturates: the clamp makes both 448."""
    values = torch.tensor([448.0, 455.0, 464.0, 500.0, 1e6, -470.0, -1e30])
    got = fp8.saturate_to_e4m3(values).float()
    assert torch.equal(got, torch.tensor([448.0, 448.0, 448.0, 448.0, 448.0, -448.0, -448.0]))
    assert fp8.saturate_to_e4m3(torch.tensor([float("nan")])).float().isnan().all()


def test_zero_rows_and_values_below_the_scale_floor_give_zero_codes_and_outputs():
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[2] = 1e-19  # amax below the 1e-12 floor: scale 2^48, and 1e-19 * 2^48 < 2^-10: flushed to zero
    codes, dequant = fp8.quantize_rowwise(x)
    assert dequant[1].item() == dequant[2].item() == 2.0 ** -48
    assert codes[1:3].float().abs().sum() == 0
    w_codes, w_scale = fp8.quantize_weight(torch.randn(16, 32))
    out = fp8.base_forward(x, w_codes, w_scale, emulate=True)
    assert out[1:3].abs().sum() == 0 and out[[0, 3]].isfinite().all()


def test_nan_and_inf_make_their_row_nan_and_leave_other_rows_alone():
    """torchao's convention: a NaN makes the row's amax NaN; an inf makes the scale 0 and
    inf * 0 = NaN. Never a silent finite value; the other rows are untouched."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g)
    clean = x.clone()
    x[1, 5], x[2, 7], x[3, 0] = float("nan"), float("inf"), float("-inf")
    w_codes, w_scale = fp8.quantize_weight(torch.randn(16, 32, generator=g))
    out = fp8.base_forward(x, w_codes, w_scale, emulate=True)
    assert out[1:4].isnan().all()
    keep = [0, 4, 5]
    assert torch.equal(out[keep], fp8.base_forward(clean, w_codes, w_scale, emulate=True)[keep])
    dy = torch.randn(6, 16, generator=g)
    dy[4, 3] = float("inf")
    dx = fp8.base_grad_input(dy, w_codes, w_scale, emulate=True)
    assert dx[4].isnan().all() and dx[[0, 1, 2, 3, 5]].isfinite().all()


# ----------------------------------------------------------------------------- the GEMMs


@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "outlier-channels"])
def test_sqnr_of_both_gemms_against_float64(outliers):
    """e4m3 rowwise measures 28.5 dB for X W^T and dY W here (3 seeds, with and without 30x
    outlier channels); bf16 gives 51 dB. Bound 27 dB, above torchao's 25."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 256, 512, 384
    x = torch.randn(M, K, generator=g)
    if outliers:
        x = x * torch.where(torch.rand(K, generator=g) < 0.01, 30.0, 1.0)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    dy = torch.randn(M, N, generator=g)
    codes, scales = fp8.quantize_weight(w)
    out = fp8.base_forward(x.bfloat16(), codes, scales, emulate=True)
    dx = fp8.base_grad_input(dy.bfloat16(), codes, scales, emulate=True)
    assert out.dtype == dx.dtype == torch.bfloat16
    assert sqnr_db(out, x.double() @ w.double().t()) >= 27
    assert sqnr_db(dx, dy.double() @ w.double()) >= 27
    # against the bf16 linear (torchao's bar: 25 dB)
    assert sqnr_db(out, (x.bfloat16() @ w.bfloat16().t()).double()) >= 25
    assert sqnr_db(dx, (dy.bfloat16() @ w.bfloat16()).double()) >= 25


def test_backward_folds_the_weight_scales_into_dy_exactly():
    """dY W = (dY diag(w_s)) W_q: the emulated backward equals dY times the dequantised weight
    computed with dY quantised after the fold, to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    w = random_rows(48, 32, torch.float32, seed=2)  # rows of very different magnitudes
    dy = torch.randn(9, 48, generator=g)
    codes, scales = fp8.quantize_weight(w)
    folded = dy.double() * scales.double()
    g_codes, g_dequant = fp8.quantize_rowwise(folded.float())
    want = (fp8.dequantize_rowwise(g_codes, g_dequant).double() @ codes.double())
    got = fp8.base_grad_input(dy, codes, scales, emulate=True)
    torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), rtol=8e-3, atol=0)


_HAS_CPU_SCALED_MM = True
try:
    torch._scaled_mm(torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t(), torch.ones(16, 1),
                     torch.ones(1, 16), out_dtype=torch.bfloat16)
except (RuntimeError, NotImplementedError):
    _HAS_CPU_SCALED_MM = False


def _checked_scaled_mm(original):
    """torch._scaled_mm that first asserts what CUDA's requires (the meta function's checks,
    which the CPU build skips): a row-major, b column-major, K and N multiples of 16, fp32
    rowwise scales (M, 1) and (1, N), contiguous, bf16 out."""
    calls = []

    def call(a, b, scale_a, scale_b, out_dtype=None, **kwargs):
        assert a.stride(1) == 1 and a.stride(0) >= a.shape[1], f"a must be row-major, strides {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) >= b.shape[0], f"b must be column-major, strides {b.stride()}"
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
        assert out_dtype == torch.bfloat16
        calls.append((a.shape, b.shape))
        return original(a, b, scale_a, scale_b, out_dtype=out_dtype, **kwargs)
    return call, calls


@pytest.mark.skipif(not _HAS_CPU_SCALED_MM, reason="this torch has no CPU torch._scaled_mm")
def test_scaled_mm_path_meets_cudas_layout_rules_and_matches_the_emulation(monkeypatch):
    g = torch.Generator().manual_seed(4)
    M, K, N = 33, 64, 48
    x = torch.randn(M, K, generator=g).bfloat16()
    dy = torch.randn(M, N, generator=g).bfloat16()
    codes, scales = fp8.quantize_weight(torch.randn(N, K, generator=g) * 0.1)
    checked, calls = _checked_scaled_mm(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", checked)
    for fn, arg in ((fp8.base_forward, x), (fp8.base_grad_input, dy)):
        got, want = fn(arg, codes, scales, emulate=False), fn(arg, codes, scales, emulate=True)
        # the same codes and scales: only the fp32 accumulation order differs (one bf16 ulp at most)
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    assert calls == [((M, K), (K, N)), ((M, N), (N, K))]
    assert fp8.base_forward(x[:0], codes, scales, emulate=False).shape == (0, N)


def test_the_scaled_mm_path_refuses_unaligned_shapes_before_computing():
    codes, scales = fp8.quantize_weight(torch.randn(48, 24))
    with pytest.raises(ValueError, match=r"K \(in_features\)=24 not a non-zero multiple of 16"):
        fp8.base_forward(torch.randn(3, 24), codes, scales, emulate=False)
    assert fp8.gemm_shape_problem(4096, 14336) is None
    assert "N (out_features)=100" in fp8.gemm_shape_problem(100, 64)


def test_capability_below_8_9_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UnslothCompileError) as error:
        fp8.require_scaled_mm(torch.device("cuda", 0))
    message = str(error.value)
    for part in ("compute capability 8.9", "has 8.0", "A100", "precision='default'", "kernels='reference'"):
        assert part in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.scaled_mm_problem(torch.device("cuda", 0)) is None


# ----------------------------------------------------------------------------- the LoRA op


def _op_inputs(lead=(2, 5), K=32, N=48, r=3, bias=True, lora_B_bias=False, lora_x=False, residual=False,
               mask=False, stored=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(grad)

    dense = rand(N, K, grad=False, scale=K ** -0.5)
    codes, scales = fp8.quantize_weight(dense)
    inp = dict(x=rand(*lead, K), weight=codes if stored else dense, weight_scale=scales if stored else None,
               bias=rand(N) if bias else None, lora_A=rand(r, K), lora_B=rand(N, r),
               lora_B_bias=rand(N) if lora_B_bias else None, lora_x=rand(*lead, K) if lora_x else None,
               residual=rand(*lead, N) if residual else None, scale=0.75, scale_tensor=None,
               out_dtype=torch.float32, impl="reference")
    if mask:
        inp["dropout_mask"] = torch.rand(*lead, K, generator=g) > 0.3
        inp["dropout_scale"] = 1 / 0.7
    return inp, codes, scales


def _expected(inp, codes, scales):
    """Float64 formula: the fp8 base from the (oracle-checked) quantisation, dequantised, in
    float64 then rounded to bf16 as the GEMM returns it; the LoRA term in float64."""
    x = inp["x"]
    xq = fp8.dequantize_rowwise(*fp8.quantize_rowwise(x.detach().reshape(-1, x.shape[-1]))).double()
    base = (xq @ fp8.dequantize_rowwise(codes, scales).double().t()).to(torch.bfloat16).double()
    base = base.reshape(*x.shape[:-1], codes.shape[0]).detach()
    if inp["bias"] is not None:
        base = base + inp["bias"].double()
    xl = inp["lora_x"] if inp["lora_x"] is not None else x
    if "dropout_mask" in inp:
        xl = x * inp["dropout_mask"] * inp["dropout_scale"]
    lora = xl.double() @ inp["lora_A"].double().t() @ inp["lora_B"].double().t()
    if inp["lora_B_bias"] is not None:
        lora = lora + inp["lora_B_bias"].double()
    out = base + inp["scale"] * lora
    return out + inp["residual"].double() if inp["residual"] is not None else out


FLAGS = ["bias", "lora_B_bias", "lora_x", "residual", "mask", "stored"]
CASES = [dict(zip(FLAGS, bits)) for bits in itertools.product([False, True], repeat=6)
         if sum(bits) in (0, 1, 5) and not (bits[2] and bits[4])]


@pytest.mark.parametrize("flags", CASES, ids=lambda f: "-".join(k for k, v in f.items() if v) or "plain")
@pytest.mark.parametrize("lead", [(2, 5), (1,), (3, 0)], ids=["3d", "one-row", "empty"])
def test_lora_linear_fp8_output_and_every_gradient_match_the_float64_formula(flags, lead):
    inp, codes, scales = _op_inputs(lead=lead, **flags)
    out, hidden = torch.ops.unsloth.lora_linear_fp8(**inp)
    want = _expected(inp, codes, scales)
    assert out.shape == want.shape and hidden.shape == (want[..., 0].numel(), 3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape)
    tensors = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    got = dict(zip(tensors, torch.autograd.grad(out, list(tensors.values()), grad)))
    # The formula's base is a constant (built from x detached): autograd gives the LoRA part of dx
    lora_grads = torch.autograd.grad(want, list(tensors.values()), grad.double(), allow_unused=True)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) if g is None else g
                for (k, v), g in zip(tensors.items(), lora_grads)}
    # and dx's base part is the fp8 backward: dY diag(w_s) quantised by rows, times W_q, in bf16
    g_codes, g_dequant = fp8.quantize_rowwise(grad.reshape(-1, grad.shape[-1]) * scales)
    base_dx = (fp8.dequantize_rowwise(g_codes, g_dequant).double() @ codes.double()).to(torch.bfloat16).double()
    expected["x"] = expected["x"] + base_dx.reshape(expected["x"].shape)
    for name, value in got.items():
        torch.testing.assert_close(value.double(), expected[name].double(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert inp["weight"].grad is None


def test_per_call_quantisation_is_bitwise_the_stored_form():
    stored, _, _ = _op_inputs(bias=True, residual=True, stored=True, seed=5)
    dense, _, _ = _op_inputs(bias=True, residual=True, stored=False, seed=5)
    outs = []
    for inp in (stored, dense):
        out, _ = torch.ops.unsloth.lora_linear_fp8(**inp)
        outs.append([out, *torch.autograd.grad(out.square().sum(), [inp["x"], inp["lora_A"], inp["lora_B"]])])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fp8_linear_op_is_the_base_alone_with_its_gradients():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 32, generator=g, requires_grad=True)
    bias = torch.randn(16, generator=g, requires_grad=True)
    codes, scales = fp8.quantize_weight(torch.randn(16, 32, generator=g))
    out = torch.ops.unsloth.fp8_linear(x, codes, scales, bias, "reference")
    want = fp8.base_forward(x.detach().reshape(-1, 32), codes, scales, True).float().reshape(4, 3, 16) + bias
    torch.testing.assert_close(out, want)
    dy = torch.randn(out.shape, generator=g)
    dx, dbias = torch.autograd.grad(out, [x, bias], dy)
    torch.testing.assert_close(dx, fp8.base_grad_input(dy.reshape(-1, 16), codes, scales, True).float().reshape(x.shape))
    torch.testing.assert_close(dbias, dy.sum((0, 1)))


# opcheck's test_schema compares the inputs before and after with a multiply that CPU torch has
# no float8 kernel for: it runs on the per-call form (dense weight), the other checks on all.
_NO_SCHEMA = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck_of_the_four_fp8_ops():
    inp, codes, scales = _op_inputs(residual=True, lora_B_bias=True)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_fp8.default, tuple(inp.values()), test_utils=_NO_SCHEMA)
    masked, _, _ = _op_inputs(mask=True, stored=False)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_fp8.default, tuple(masked.values()))
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.unsloth.fp8_linear.default, (x, codes, scales, torch.randn(48), "reference"),
                          test_utils=_NO_SCHEMA)
    torch.library.opcheck(torch.ops.unsloth.fp8_linear_backward.default,
                          (torch.randn(2, 5, 48), codes, scales, torch.float32, "reference"), test_utils=_NO_SCHEMA)
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    _, hidden = torch.ops.unsloth.lora_linear_fp8(**detached)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_fp8_backward.default, (
        torch.randn(2, 5, 48), detached["x"], codes, scales, detached["lora_A"], detached["lora_B"], None, hidden,
        0.75, None, "reference"), test_utils=_NO_SCHEMA)


@pytest.mark.skipif(not _HAS_CPU_SCALED_MM, reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("main_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("flags", [dict(), dict(bias=True, lora_B_bias=True, residual=True), dict(lora_x=True),
                                   dict(scale_tensor=True), dict(lead=(1,)), dict(lead=(3, 0))],
                         ids=["plain", "biases-residual", "lora_x", "scale_tensor", "one-row", "empty"])
def test_gpu_path_of_the_lora_op_matches_the_emulation(monkeypatch, flags, main_gemm):
    """kernels/fp8/fp8.py's GPU path (emulate=False on fp16 activations: Triton quantisation on CUDA,
    the thin Triton GEMMs in the interpreter) run on CPU against the emulation: the same fp8
    base, the LoRA term rounded to fp16 operands instead of computed in fp32. The fp8 GEMM and
    its LoRA term both ways: torch._scaled_mm with CUDA's layout rules asserted and a rank-r
    addmm (main_gemm="cublas"), or the Triton FP8 GEMM with the term in its epilogue, in the
    interpreter ("triton"; with lora_x the op takes torch._scaled_mm for dX either way)."""
    from unsloth_compile.kernels import knobs

    checked, calls = _checked_scaled_mm(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", checked)

    g = torch.Generator().manual_seed(7)
    lead, K, N, r = flags.get("lead", (2, 9)), 64, 48, 5

    def rand(*shape, scale=1.0, dtype=torch.float16):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    codes, scales = fp8.quantize_weight(rand(N, K, scale=K ** -0.5, dtype=torch.float32))
    x, A, B = rand(*lead, K), rand(r, K, scale=0.3, dtype=torch.float32), rand(N, r, scale=0.3, dtype=torch.float32)
    bias = rand(N) if flags.get("bias") else None
    b_bias = rand(N, dtype=torch.float32) if flags.get("lora_B_bias") else None
    lora_x = rand(*lead, K) if flags.get("lora_x") else None
    residual = rand(*lead, N) if flags.get("residual") else None
    scale_tensor = torch.tensor(0.5) if flags.get("scale_tensor") else None
    dy = rand(*lead, N)
    results = {}
    for emulate in (False, True):
        with knobs.patch(main_gemm=main_gemm):
            out, hidden = fp8.lora_linear_fp8_forward(x, codes, scales, bias, A, B, b_bias, lora_x, residual, 0.75,
                                                      scale_tensor, torch.float16, emulate)
            grads = fp8.lora_linear_fp8_backward(dy, x, codes, scales, A, B, lora_x, hidden, 0.75, scale_tensor,
                                                 emulate)
        results[emulate] = (out, hidden, *grads)
    rows = x.numel() // K
    # which GEMM ran: torch._scaled_mm for the forward and dX with "cublas", for dX alone with
    # lora_x under "triton" (that dX has no LoRA term to fuse), never on an empty batch
    expected = 0 if rows == 0 else (2 if main_gemm == "cublas" else int(lora_x is not None))
    assert len(calls) == expected, calls
    names = ("out", "hidden", "dx", "d_lora_x", "dA", "dB")
    for name, got, want in zip(names, results[False], results[True]):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), name
        if want.numel() == 0:
            continue
        scale = want.double().abs().max().clamp(min=1e-3)
        err = (got.double() - want.double()).abs().max() / scale
        assert err < 2e-2, f"{name}: max error {err:.2e} of the largest value"


def test_triton_quantisation_scales_in_the_interpreter_equal_the_reference():
    """kernels/fp8/fp8_quantize.py under the Triton interpreter: the row scales (dequant) bit for bit
    the torch reference's, with and without the column fold, on rows held whole (24, 4096, 5000)
    and rows read twice in tiles with a ragged last one (16400 > MAX_ONE_TILE), and zero, NaN
    and inf rows; several rows per program (a ragged last program), and the fold's scales in
    fp32 or bf16 (the same codes). The codes are compared on the GPU only
    (test_gpu_quantisation_is_bitwise_the_cpu_emulation): the interpreter's fp8 cast misrounds."""
    pytest.importorskip("triton")
    from unsloth_compile.kernels.fp8.fp8_quantize import MAX_ONE_TILE, quantize_rows

    g = torch.Generator().manual_seed(3)
    assert 16400 > MAX_ONE_TILE
    for C in (24, 4096, 5000, 16400):
        x = torch.randn(37, C, generator=g) * torch.logspace(-4, 4, 37).reshape(-1, 1)
        x[3] = 0
        x[5, 9] = float("nan")
        x[7, C - 1] = float("-inf")
        x = x.half()
        col_scale = torch.exp2(torch.randint(-6, 6, (C,), generator=g).float())
        # rows per program and warps: the default, and 2 / 8 rows (37 rows: a ragged last program)
        configs = (None, (2, 4), (8, 1)) if C <= MAX_ONE_TILE else (None,)
        for fold, config in itertools.product((None, col_scale, col_scale.bfloat16()), configs):
            codes, dequant = quantize_rows(x, fold, config=config)
            _, want = fp8.quantize_rowwise(x, None if fold is None else fold.float())
            assert codes.shape == x.shape and codes.dtype == E4M3 and dequant.shape == (37, 1)
            assert torch.equal(dequant.isnan(), want.isnan())
            assert torch.equal(dequant[~want.isnan()], want[~want.isnan()]), (C, fold, config)
            if fold is not None and fold.dtype == torch.bfloat16:  # the same codes as the fp32 fold
                assert torch.equal(codes.view(torch.uint8), quantize_rows(x, col_scale, config=config)[0].view(
                    torch.uint8)), (C, config)
