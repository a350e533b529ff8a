"""The NF4 kernels (kernels/nf4/): the one-pass dequantisation bit for bit against the format's
reference, and the NF4 LoRA linear's forward and backward (fused GEMMs, and dequantise + the
dense op) against float64, on awkward shapes. Under the Triton interpreter on CPU (fp32, fp16);
the GPU tests add bf16, the tuned tiles and the timed choice."""

from __future__ import annotations

import pytest
import torch

from unsloth_compile.kernels import knobs, reference
from unsloth_compile.kernels.nf4.nf4_dequantize import dequantize_nf4_triton
from unsloth_compile.kernels.nf4.nf4_gemm import nf4_gemm_backward, nf4_gemm_forward
from unsloth_compile.kernels.nf4.nf4_lora import nf4_lora_backward, nf4_lora_forward, supports
from unsloth_compile.nf4 import ABSMAX_CODE, NF4_CODE, dequantize_nf4, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _nf4(N, K, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (torch.rand(N, 1, generator=g) + 0.2)
    q = quantize_nf4(w.to(device))
    fmt = (q.packed, q.absmax_codes, q.absmax_scale, q.absmax_offset, NF4_CODE.to(device), ABSMAX_CODE.to(device))
    return q, fmt


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _close(ours, exact, torch_own, name, floor):
    """ours at least about as close to the float64 result as torch's own in the same precision."""
    err = (ours.double() - exact).abs().max().item()
    own = (torch_own.double() - exact).abs().max().item()
    assert err <= max(2 * own, floor), f"{name}: error {err:.3g}, torch's own {own:.3g}"


@pytest.mark.parametrize("shape", [(7, 64), (5, 192), (1, 128), (3, 8256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_triton_bit_for_bit(shape, dtype):
    q, fmt = _nf4(*shape)
    out = dequantize_nf4_triton(*fmt, *shape, dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, dequantize_nf4(q, dtype))


def test_dequantize_triton_refuses_a_mismatched_shape():
    _, fmt = _nf4(4, 128)
    with pytest.raises(ValueError, match="do not describe an NF4 weight"):
        dequantize_nf4_triton(*fmt, 4, 96, torch.float32)


# (M, N, K, r, bias, lora_B bias, residual, lora_x, scale tensor, dtype): M not a multiple of the
# tile, N odd, K = 64 and 192, ranks 1, 16, 33.
CASES = [
    (37, 33, 192, 16, True, False, True, False, False, torch.float32),
    (19, 17, 64, 1, False, True, False, True, True, torch.float32),
    (1, 24, 128, 33, True, True, True, True, False, torch.float32),
    (21, 31, 192, 33, False, False, False, False, True, torch.float16),
    (40, 19, 64, 16, True, True, True, False, False, torch.float16),
    (17, 9, 128, 1, False, False, True, True, False, torch.float16),
]


def _case(M, N, K, R, bias, b_bias, residual, lora_x, scale_tensor, dtype, seed=1):
    q, fmt = _nf4(N, K, seed=seed)
    adapter = torch.float32  # PEFT's default: fp32 adapters on a half base
    return dict(
        q=q, fmt=fmt, N=N, K=K,
        x=_randn(M, K, dtype=dtype, seed=seed + 1),
        lora_A=_randn(R, K, dtype=adapter, seed=seed + 2, scale=0.2),
        lora_B=_randn(N, R, dtype=adapter, seed=seed + 3, scale=0.2),
        bias=_randn(N, dtype=dtype, seed=seed + 4) if bias else None,
        lora_B_bias=_randn(N, dtype=adapter, seed=seed + 5) if b_bias else None,
        residual=_randn(M, N, dtype=dtype, seed=seed + 6) if residual else None,
        lora_x=_randn(M, K, dtype=dtype, seed=seed + 7) if lora_x else None,
        scale=0.75, scale_tensor=torch.tensor(1.5, device=DEVICE) if scale_tensor else None,
        grad=_randn(M, N, dtype=dtype, seed=seed + 8),
    )


def _forward(c):
    return nf4_lora_forward(c["x"], *c["fmt"], c["N"], c["K"], c["bias"], c["lora_A"], c["lora_B"], c["lora_B_bias"],
                            c["lora_x"], c["residual"], c["scale"], c["scale_tensor"], c["x"].dtype)


def _backward(c, hidden):
    return nf4_lora_backward(c["grad"], c["x"], *c["fmt"], c["N"], c["K"], c["lora_A"], c["lora_B"], c["lora_x"],
                             hidden, c["scale"], c["scale_tensor"])


def _exact(c):
    """Every output in float64, W the dequantised weight in the activation dtype (what both paths
    multiply by)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    W = dequantize_nf4(c["q"], c["x"].dtype).double()
    s = c["scale"] * (1.0 if c["scale_tensor"] is None else c["scale_tensor"].item())
    x, xl = d(c["x"]), d(c["lora_x"] if c["lora_x"] is not None else c["x"])
    A, B, g = d(c["lora_A"]), d(c["lora_B"]), d(c["grad"])
    hidden = xl @ A.T
    out = x @ W.T + s * hidden @ B.T
    if c["bias"] is not None:
        out = out + d(c["bias"])
    if c["lora_B_bias"] is not None:
        out = out + s * d(c["lora_B_bias"])
    if c["residual"] is not None:
        out = out + d(c["residual"])
    d_adapter_in = s * (g @ B) @ A
    dx = g @ W + (d_adapter_in if c["lora_x"] is None else 0)
    d_lora_x = d_adapter_in if c["lora_x"] is not None else None
    return dict(out=out, hidden=hidden, dx=dx, d_lora_x=d_lora_x, dA=s * (g @ B).T @ xl, dB=s * g.T @ hidden)


def _torch_own(c):
    """The same outputs from the reference ops (plain torch) in the same precision, dense W."""
    W = dequantize_nf4(c["q"], c["x"].dtype)
    out, hidden = reference.lora_linear_forward(
        c["x"], W, c["bias"], c["lora_A"], c["lora_B"], c["lora_B_bias"], c["lora_x"], c["residual"], c["scale"],
        c["scale_tensor"], False, c["x"].dtype)
    dx, d_lora_x, dA, dB = reference.lora_linear_backward(
        c["grad"], c["x"], W, c["lora_A"], c["lora_B"], c["lora_x"], hidden, c["scale"], c["scale_tensor"], False,
        c["x"].dtype)
    return dict(out=out, hidden=hidden, dx=dx, d_lora_x=d_lora_x, dA=dA, dB=dB)


def _check_case(case, main_gemm):
    c = _case(*case)
    ok, why = supports(c["x"], c["lora_A"], c["lora_B"], c["lora_x"], c["N"], c["K"])
    assert ok, why
    exact, own = _exact(c), _torch_own(c)
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[c["x"].dtype]
    with knobs.patch(main_gemm=main_gemm):
        out, hidden = _forward(c)
        dx, d_lora_x, dA, dB = _backward(c, hidden)
    assert out.shape == exact["out"].shape and out.dtype == c["x"].dtype and out.is_contiguous()
    assert hidden.dtype == c["lora_A"].dtype
    assert dx.dtype == c["x"].dtype and dx.shape == c["x"].shape and dx.is_contiguous()
    assert dA.dtype == dB.dtype == c["lora_A"].dtype
    for name, value in dict(out=out, hidden=hidden, dx=dx, dA=dA, dB=dB).items():
        _close(value, exact[name], own[name], name, floor * max(1.0, exact[name].abs().max().item()))
    if c["lora_x"] is None:
        assert d_lora_x is None
    else:
        assert d_lora_x.dtype == c["lora_x"].dtype and d_lora_x.shape == c["lora_x"].shape
        _close(d_lora_x, exact["d_lora_x"], own["d_lora_x"], "d_lora_x",
               floor * max(1.0, exact["d_lora_x"].abs().max().item()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:4])) + f"-{str(c[-1])[6:]}")
def test_fused_against_float64(case):
    _check_case(case, "triton")


@pytest.mark.parametrize("case", CASES[:1] + CASES[4:5], ids=["fp32", "fp16"])
def test_dequantize_path_against_float64(case):
    _check_case(case, "cublas")


@pytest.mark.parametrize("K, kstep", [(128, 128), (256, 128), (192, 64)])
def test_gemm_tiles_with_two_blocks_per_step(K, kstep):
    """KSTEP 128 (two NF4 blocks per row and step, as on the GPU) agrees with the float64 product."""
    M, N, R = 20, 18, 3
    q, fmt = _nf4(N, K, seed=3)
    W = dequantize_nf4(q, torch.float32).double()
    x = _randn(M, K, dtype=torch.float32, seed=4)
    u, v = _randn(M, R, dtype=torch.float32, seed=5), _randn(R, N, dtype=torch.float32, seed=6)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "KSTEP": kstep, "GROUP_M": 2}
    out = nf4_gemm_forward(x, *fmt, N, u, v, torch.empty(M, N), 0.5, None, config=config)
    assert torch.allclose(out.double(), x.double() @ W.T + 0.5 * u.double() @ v.double(), atol=1e-4, rtol=1e-5)
    dy = _randn(M, N, dtype=torch.float32, seed=7)
    va = _randn(R, K, dtype=torch.float32, seed=8)
    dx = nf4_gemm_backward(dy, *fmt, K, u, va, torch.empty(M, K), 0.5, None, config=config)
    assert torch.allclose(dx.double(), dy.double() @ W + 0.5 * u.double() @ va.double(), atol=1e-4, rtol=1e-5)


def test_empty_batch():
    c = _case(0, 9, 64, 4, True, False, False, False, False, torch.float32)
    c["grad"] = c["grad"][:0]
    out, hidden = _forward(c)
    assert out.shape == (0, 9) and hidden.shape == (0, 4)
    dx, d_lora_x, dA, dB = _backward(c, hidden)
    assert dx.shape == (0, 64) and d_lora_x is None
    assert (dA == 0).all() and (dB == 0).all() and dA.shape == (4, 64) and dB.shape == (9, 4)


def test_supports_refusals():
    x = torch.randn(4, 96)
    A, B = torch.randn(2, 96), torch.randn(8, 2)
    ok, why = supports(x, A, B, None, 8, 96)
    assert not ok and "multiple of 64" in why
    x = torch.randn(4, 64, dtype=torch.float64)
    ok, why = supports(x, torch.randn(2, 64), B, None, 8, 64)
    assert not ok and "float64" in why


# --------------------------------------------------------------------------------------------
# GPU: bf16, the autotuned tiles and the timed choice
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    (1000, 1022, 1024, 16, True, True, True, False, False, torch.bfloat16),
    (333, 512, 384, 33, False, False, False, True, True, torch.bfloat16),
    (257, 768, 512, 1, True, False, True, False, False, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("main_gemm", ["triton", "cublas", "auto"])
@pytest.mark.parametrize("case", GPU_CASES, ids=["bf16", "bf16-lora_x", "fp16"])
def test_gpu_against_float64(case, main_gemm):
    _check_case(case, main_gemm)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 1024), (1023, 192)])
def test_gpu_dequantize_bit_for_bit(shape):
    q, fmt = _nf4(*shape)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(dequantize_nf4_triton(*fmt, *shape, dtype), dequantize_nf4(q, dtype))


@pytest.mark.gpu
def test_gpu_choice_is_timed_and_kept():
    from unsloth_compile.kernels.timed_choice import CHOICES

    c = _case(*GPU_CASES[0])
    out, hidden = _forward(c)
    _backward(c, hidden)
    chosen = {key[0]: value[0] for key, value in CHOICES["main GEMM"].items() if str(key[0]).startswith("nf4")}
    assert set(chosen) == {"nf4 forward", "nf4 backward"}
    assert set(chosen.values()) <= {"fused", "dequantize"}
