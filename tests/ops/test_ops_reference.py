"""torch.ops.unsloth.lora_linear: schema, fake impl, autograd and the reference numerics."""

import itertools

import pytest
import torch

import unsloth_compile  # noqa: F401
from helpers import saved_tensors
from unsloth_compile.kernels import reference


def make_inputs(m=(2, 7), k=19, n=23, r=3, dtype=torch.float64, adapter_dtype=None, bias=True,
                lora_B_bias=False, lora_x=False, residual=False, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).requires_grad_(grad)

    return dict(
        x=rand(*m, k),
        weight=rand(*((k, n) if transposed else (n, k)), grad=False),
        bias=rand(n) if bias else None,
        lora_A=rand(r, k, dt=adapter_dtype),
        lora_B=rand(n, r, dt=adapter_dtype),
        lora_B_bias=rand(n, dt=adapter_dtype) if lora_B_bias else None,
        lora_x=rand(*m, k, dt=adapter_dtype) if lora_x else None,
        residual=rand(*m, n) if residual else None,
        scale=0.75, scale_tensor=None, weight_transposed=transposed, out_dtype=dtype, impl="reference",
    )


def direct_formula(inp):
    """The math, written out independently of kernels/reference.py."""
    x, w = inp["x"].double(), inp["weight"].double()
    base = x @ (w if inp["weight_transposed"] else w.t())
    if inp["bias"] is not None:
        base = base + inp["bias"].double()
    xl = (inp["lora_x"] if inp["lora_x"] is not None else inp["x"]).double()
    lora = xl @ inp["lora_A"].double().t() @ inp["lora_B"].double().t()
    if inp["lora_B_bias"] is not None:
        lora = lora + inp["lora_B_bias"].double()
    out = base + inp["scale"] * lora
    if inp["residual"] is not None:
        out = out + inp["residual"].double()
    return out


FLAGS = ["bias", "lora_B_bias", "lora_x", "residual", "transposed"]


@pytest.mark.parametrize("flags", [dict(zip(FLAGS, bits)) for bits in itertools.product([False, True], repeat=5)
                                   if sum(bits) in (0, 1, 5)], ids=str)
def test_forward_and_every_gradient_match_float64_formula(flags):
    inp = make_inputs(**flags)
    out, hidden = torch.ops.unsloth.lora_linear(**inp)
    expected = direct_formula(inp)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    tensors = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    got = torch.autograd.grad(out, list(tensors.values()), grad)
    want = torch.autograd.grad(expected, list(tensors.values()), grad)
    for name, g1, g2 in zip(tensors, got, want):
        torch.testing.assert_close(g1, g2, msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert inp["weight"].grad is None


def test_with_dropout_input_x_is_not_saved_for_backward():
    """With lora_x (the dropout output) backward needs only x's shape and dtype: x's storage
    must not be among the saved tensors; the gradients still match the formula."""
    inp = make_inputs(lora_x=True, dtype=torch.float32)
    (out, _), saved = saved_tensors(lambda: torch.ops.unsloth.lora_linear(**inp))
    x_ptr = inp["x"].untyped_storage().data_ptr()
    assert not any(t.untyped_storage().data_ptr() == x_ptr for t in saved), "x was saved"
    assert any(t.untyped_storage().data_ptr() == inp["lora_x"].untyped_storage().data_ptr() for t in saved)
    grad = torch.randn_like(out)
    leaves = [inp[k] for k in ("x", "lora_A", "lora_B", "lora_x", "bias")]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(direct_formula(inp), leaves, grad)
    for name, g1, g2 in zip(("x", "lora_A", "lora_B", "lora_x", "bias"), got, want):
        assert g1.shape == g2.shape and g1.dtype == g2.dtype, name
        torch.testing.assert_close(g1, g2.to(g1.dtype), msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("r", [1, 7, 16])
def test_gradcheck_float64(r):
    inp = make_inputs(m=(5,), k=6, n=9, r=r, bias=True, lora_B_bias=True, residual=True)
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return torch.ops.unsloth.lora_linear(**{**inp, **dict(zip(names, tensors))})[0]

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])


def test_opcheck_schema_fake_and_autograd_registration():
    for flags in ({}, {"lora_x": True, "residual": True, "transposed": True, "lora_B_bias": True}):
        inp = make_inputs(dtype=torch.float32, **flags)
        torch.library.opcheck(torch.ops.unsloth.lora_linear.default, tuple(inp.values()))


def test_mixed_precision_mirrors_eager_peft_numerics():
    """bf16 base, fp32 adapters: the op's output and gradients equal eager PEFT's op sequence
    bit for bit on CPU (the reference mirrors its casts), with fp32 adapter gradients."""
    inp = make_inputs(dtype=torch.bfloat16, adapter_dtype=torch.float32, residual=True)
    out, _ = torch.ops.unsloth.lora_linear(**inp)
    x, A, B = inp["x"], inp["lora_A"], inp["lora_B"]
    base = torch.nn.functional.linear(x, inp["weight"], inp["bias"])
    eager = (base + (x.to(torch.float32) @ A.t() @ B.t()) * inp["scale"]).to(torch.bfloat16) + inp["residual"]
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    grad = torch.randn_like(out)
    for g1, g2, t in zip(torch.autograd.grad(out, [x, A, B], grad), torch.autograd.grad(eager, [x, A, B], grad), [x, A, B]):
        assert g1.dtype == t.dtype
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def _mask(shape, p=0.3, seed=5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["fp64", "bf16_base_fp32_adapters"])
def test_dropout_mask_matches_eager_dropout_bitwise(dtype, adapter_dtype):
    """Dropout given as (mask, 1/(1-p)): the output and every gradient equal eager PEFT's
    sequence cast -> native_dropout -> A -> B -> scale -> cast back, bit for bit."""
    p = 0.3
    inp = make_inputs(dtype=dtype, adapter_dtype=adapter_dtype, residual=True)
    mask = _mask(inp["x"].shape, p)
    out, _ = torch.ops.unsloth.lora_linear(**inp, dropout_mask=mask, dropout_scale=1.0 / (1.0 - p))
    x, A, B, bias, res = inp["x"], inp["lora_A"], inp["lora_B"], inp["bias"], inp["residual"]
    dropped = x.to(adapter_dtype) * mask * (1.0 / (1.0 - p))  # aten.native_dropout's products
    base = torch.nn.functional.linear(x, inp["weight"], bias)
    eager = (base + (dropped @ A.t() @ B.t()) * inp["scale"]).to(dtype) + res
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    grad = torch.randn_like(out)
    leaves = [x, A, B, bias, res]
    for name, g1, g2 in zip(("x", "A", "B", "bias", "residual"), torch.autograd.grad(out, leaves, grad),
                            torch.autograd.grad(eager, leaves, grad)):
        assert g1.dtype == g2.dtype, name
        torch.testing.assert_close(g1, g2, rtol=0, atol=0, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_dropout_mask_gradcheck_opcheck_and_bad_input():
    inp = make_inputs(m=(5,), k=6, n=9, r=3)
    mask = _mask((5, 6))
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return torch.ops.unsloth.lora_linear(**{**inp, **dict(zip(names, tensors))}, dropout_mask=mask,
                                             dropout_scale=1.25)[0]

    assert torch.autograd.gradcheck(fn, [inp[k] for k in names])
    f32 = make_inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.unsloth.lora_linear.default,
                          tuple(f32.values()) + (_mask(f32["x"].shape), 1.25))
    with pytest.raises(ValueError, match="bool tensor of x's shape"):
        torch.ops.unsloth.lora_linear(**inp, dropout_mask=mask.float(), dropout_scale=1.25)
    with pytest.raises(ValueError, match="not both"):
        torch.ops.unsloth.lora_linear(**{**inp, "lora_x": inp["x"].detach()}, dropout_mask=mask, dropout_scale=1.25)


def test_dropout_mask_saves_the_mask_not_the_dropped_input():
    inp = make_inputs(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    _, saved = saved_tensors(
        lambda: torch.ops.unsloth.lora_linear(**inp, dropout_mask=_mask(inp["x"].shape), dropout_scale=1.25))
    full = [t for t in saved if t.shape == inp["x"].shape]
    assert sorted(str(t.dtype) for t in full) == ["torch.bfloat16", "torch.bool"], full


def test_no_gradient_is_computed_for_a_trainable_looking_weight():
    """The op never returns dW: a weight that requires grad gets none (the pass refuses such sites)."""
    inp = make_inputs()
    inp["weight"].requires_grad_(True)
    out, _ = torch.ops.unsloth.lora_linear(**inp)
    out.sum().backward()
    assert inp["weight"].grad is None


def test_reference_backward_returns_the_four_gradients_and_no_bias_gradient():
    """Bias gradients are taken outside the op (ops.side_grads): the backward returns four."""
    inp = make_inputs(dtype=torch.float32)
    out, hidden = reference.lora_linear_forward(*[inp[k] for k in list(inp)[:-1]])
    args = (torch.randn_like(out), inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], None, hidden,
            inp["scale"], None, False, torch.float32)
    dx, d_lora_x, dA, dB = reference.lora_linear_backward(*args)
    assert d_lora_x is None
    assert dx.shape == inp["x"].shape and dA.shape == inp["lora_A"].shape and dB.shape == inp["lora_B"].shape
    with pytest.raises(TypeError):
        reference.lora_linear_backward(*args, True, False)


# ------------------------------------------------------------------------------------------
# Layouts: the fake impls promise contiguous outputs; the real ones must return exactly that
# ------------------------------------------------------------------------------------------

def _layout_inputs(layout):
    """float32 inputs in the layouts the compiler hands the op."""
    inp = make_inputs(dtype=torch.float32, residual=True, lora_B_bias=True)
    inp = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    if layout == "A_B_transposed_views":  # the `x @ A @ B` form: the pass feeds A.t(), B.t()
        inp["lora_A"] = inp["lora_A"].t().contiguous().t()
        inp["lora_B"] = inp["lora_B"].t().contiguous().t()
    elif layout == "strided_x":  # every second token of a bigger batch
        inp["x"] = torch.randn(2, 14, 19)[:, ::2]
    elif layout == "permuted_x_residual":  # (seq, batch) storage seen as (batch, seq)
        inp["x"] = torch.randn(7, 2, 19).transpose(0, 1)
        inp["residual"] = torch.randn(23, 2, 7).permute(1, 2, 0)
    elif layout == "strided_lora_x":
        inp["lora_x"] = torch.randn(2, 7, 38)[..., ::2]
    return inp


LAYOUTS = ["contiguous", "A_B_transposed_views", "strided_x", "permuted_x_residual", "strided_lora_x"]


def _backward_args(inp, grad, hidden, x=None):
    return (grad, inp["x"] if x is None else x, inp["weight"], inp["lora_A"], inp["lora_B"], inp["lora_x"],
            hidden, inp["scale"], inp["scale_tensor"], inp["weight_transposed"], inp["weight"].dtype,
            inp["impl"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_and_real_outputs_have_the_same_strides(layout):
    """opcheck compares the fake impls' sizes and strides with the real outputs (out,
    lora_hidden, dx, d_lora_x, dA, dB) for inputs in every layout; the real outputs are
    contiguous. A.t() / B.t() gave dA, dB the strides of the views in the fake impl and
    contiguous ones in the real op: Inductor's stride assertion failed in backward."""
    inp = _layout_inputs(layout)
    torch.library.opcheck(torch.ops.unsloth.lora_linear.default, tuple(inp.values()))
    out, hidden = torch.ops.unsloth.lora_linear(**inp)
    grad = torch.randn(out.shape).transpose(0, 1).contiguous().transpose(0, 1)  # strided dY too
    results = torch.ops.unsloth.lora_linear_backward(*_backward_args(inp, grad, hidden))
    args = _backward_args(inp, grad, hidden)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_backward.default, args)
    if inp["lora_x"] is not None:  # what autograd passes for x then: a stand-in of x's shape
        stand_in = torch.empty(()).expand(inp["x"].shape)
        torch.library.opcheck(torch.ops.unsloth.lora_linear_backward.default,
                              _backward_args(inp, grad, hidden, x=stand_in))
    mask_args = args[:5] + (None,) + args[6:] + (torch.rand(inp["x"].shape) > 0.3, 1.25)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_backward.default, mask_args)
    for name, t in zip(("out", "lora_hidden", "dx", "d_lora_x", "dA", "dB"), (out, hidden) + tuple(results)):
        assert t.is_contiguous(), f"{name}: strides {t.stride()} for shape {tuple(t.shape)}"


def test_promoting_residual_gives_the_fake_impl_the_promoted_dtype():
    inp = make_inputs(dtype=torch.float32, residual=True)
    inp["residual"] = inp["residual"].detach().double()
    torch.library.opcheck(torch.ops.unsloth.lora_linear.default, tuple(inp.values()))
    assert torch.ops.unsloth.lora_linear(**inp)[0].dtype == torch.float64


class PaperFormLoRA(torch.nn.Module):
    """`x @ W^T + s x @ A @ B` with A stored (in, r), B (r, out): in != out, so no
    transposition of A or B can pass for the other."""

    def __init__(self, k=8, n=6, r=4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k) / k**0.5, requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(k, r) / k**0.5)
        self.B = torch.nn.Parameter(torch.randn(r, n) / r**0.5)

    def forward(self, x):
        return x @ self.weight.T + (x @ self.A @ self.B) * 0.5


def test_x_at_A_at_B_trains_under_real_inductor():
    """The default inner compiler (Inductor, C++ on CPU) checks the strides of the op's real
    outputs against its fake impl; the adapter gradients' strides differed there. Inductor's
    caches are off: a graph cached with an older fake impl keeps asserting its strides."""
    from helpers import train_and_compare

    def batch(step):
        return (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(step)),)

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        result = train_and_compare(PaperFormLoRA(), batch, options={"inner": "inductor"}, steps=2)
    assert result.report.counters["lora_linear.fused"] == 1
