"""Edge shapes of `torch.ops.unsloth.lora_linear`: no rows (an empty batch), one row, one
input or output column, rank 1, a 3-D x with a zero leading dimension.

Three levels: the op (forward and every gradient against a float64 formula and against
kernels/reference.py, incl. fake impls through opcheck), the Triton host functions under the
interpreter (M = 0 and 1 against the reference, and nothing launched for M = 0), and a
compiled training step of a small PEFT model on a (0, seq) and a one-token batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import peft_wrap, tiny_causal_lm, train_and_compare, triton_kernel_module
from test_ops_reference import direct_formula, make_inputs
from unsloth_compile.kernels import reference

HAS_CUDA = torch.cuda.is_available()
lt = triton_kernel_module("lora.lora_linear_triton")
from unsloth_compile.kernels.lora import lora_gemm as gemm  # noqa: E402
from unsloth_compile.kernels.lora import lowrank_thin as thin  # noqa: E402

interp = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on machines without CUDA")

SHAPES = {  # (leading dims of x, K, N, r)
    "no_rows": ((0,), 5, 7, 3),
    "no_rows_3d": ((0, 4), 5, 7, 3),
    "no_rows_3d_inner": ((3, 0), 5, 7, 3),
    "one_row": ((1,), 5, 7, 3),
    "one_row_3d": ((1, 1), 5, 7, 3),
    "one_input_column": ((4,), 1, 7, 3),
    "one_output_column": ((4,), 5, 1, 3),
    "rank_1": ((4,), 5, 7, 1),
    "all_ones": ((1,), 1, 1, 1),
    "no_rows_all_ones": ((0,), 1, 1, 1),
}
VARIANTS = {
    "plain": {},
    "biases_residual": dict(bias=True, lora_B_bias=True, residual=True),
    "dropout_as_lora_x": dict(lora_x=True),
    "dropout_as_mask": dict(mask=True),
    "conv1d": dict(transposed=True, bias=True),
}


def _op_inputs(shape, variant, dtype=torch.float64):
    lead, k, n, r = SHAPES[shape]
    flags = dict(VARIANTS[variant])
    mask = flags.pop("mask", False)
    inp = make_inputs(m=lead, k=k, n=n, r=r, dtype=dtype, bias=flags.pop("bias", False), **flags)
    if mask:
        g = torch.Generator().manual_seed(3)
        inp["dropout_mask"] = torch.rand(*lead, k, generator=g) >= 0.3
        inp["dropout_scale"] = 1.0 / 0.7
    return inp


def _formula(inp):
    """direct_formula, with the dropout mask applied to the adapter's input."""
    if inp.get("dropout_mask") is None:
        return direct_formula(inp)
    dropped = inp["x"].double() * inp["dropout_mask"] * inp["dropout_scale"]
    plain = {k: v for k, v in inp.items() if k not in ("dropout_mask", "dropout_scale")}
    return direct_formula({**plain, "lora_x": dropped})


def _reference(inp, grad):
    """kernels/reference.py's forward and backward called directly (the mask turned into lora_x)."""
    lora_x = inp["lora_x"]
    if inp.get("dropout_mask") is not None:
        lora_x = inp["x"].detach() * inp["dropout_mask"] * inp["dropout_scale"]
    args = [inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "lora_B_bias")]
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    x, weight, _, A, B, _ = args
    out, hidden = reference.lora_linear_forward(*args, lora_x, inp["residual"], inp["scale"], None,
                                                inp["weight_transposed"], inp["out_dtype"])
    grads = reference.lora_linear_backward(grad, x, weight, A, B, lora_x, hidden, inp["scale"], None,
                                           inp["weight_transposed"], weight.dtype)
    return out, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_op_forward_and_gradients_match_float64_and_reference(shape, variant):
    inp = _op_inputs(shape, variant)
    out, hidden = torch.ops.unsloth.lora_linear(**inp)
    expected = _formula(inp)
    assert out.shape == expected.shape and out.is_contiguous() and hidden.is_contiguous()
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, dtype=out.dtype)
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    leaves = [inp[k] for k in names]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for name, leaf, g1, g2 in zip(names, leaves, got, want):
        assert g1.shape == leaf.shape and g1.dtype == leaf.dtype, name
        torch.testing.assert_close(g1, g2, msg=lambda m, name=name: f"gradient of {name}: {m}")
        if out.numel() == 0:  # an empty batch: exactly zero gradients for the parameters
            assert not g1.any(), name
    ref_out, (dx, d_lora_x, dA, dB) = _reference(inp, grad)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    by_name = dict(zip(names, got))
    torch.testing.assert_close(by_name["lora_A"], dA, rtol=0, atol=0)
    torch.testing.assert_close(by_name["lora_B"], dB, rtol=0, atol=0)
    assert dx.shape == inp["x"].shape and dA.shape == inp["lora_A"].shape and dB.shape == inp["lora_B"].shape
    assert (d_lora_x is None) == (inp["lora_x"] is None and inp.get("dropout_mask") is None)


@pytest.mark.parametrize("shape", ["no_rows", "no_rows_3d", "one_row", "all_ones", "no_rows_all_ones"])
def test_opcheck_fake_impls_at_edge_shapes(shape):
    """Schema, fake impls (sizes and strides against the real outputs) and autograd of both ops."""
    inp = _op_inputs(shape, "biases_residual", dtype=torch.float32)
    torch.library.opcheck(torch.ops.unsloth.lora_linear.default, tuple(inp.values()))
    mask = _op_inputs(shape, "dropout_as_mask", dtype=torch.float32)
    torch.library.opcheck(torch.ops.unsloth.lora_linear.default, tuple(mask.values()))
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    out, hidden = torch.ops.unsloth.lora_linear(**detached)
    torch.library.opcheck(torch.ops.unsloth.lora_linear_backward.default, (
        torch.randn(out.shape), detached["x"], detached["weight"], detached["lora_A"], detached["lora_B"],
        None, hidden, 0.75, None, False, torch.float32, "reference"))


def test_empty_input_takes_the_mask_native_dropout_returns():
    """aten's native_dropout gives an empty input an empty mask of the input's dtype (float on
    CPU), not bool: the op takes it (it used to raise 'must be a bool tensor')."""
    inp = _op_inputs("no_rows_3d", "plain")
    _, mask = torch.native_dropout(inp["x"].detach(), 0.3, True)
    out, _ = torch.ops.unsloth.lora_linear(**inp, dropout_mask=mask, dropout_scale=1 / 0.7)
    grads = torch.autograd.grad(out, [inp["x"], inp["lora_A"], inp["lora_B"]],
                                torch.ones(out.shape, dtype=out.dtype))
    assert out.shape == (0, 4, 7) and grads[0].shape == (0, 4, 5) and not grads[1].any() and not grads[2].any()


# ------------------------------------------------------------------------------------------
# Triton host functions under the interpreter
# ------------------------------------------------------------------------------------------

TRITON_SHAPES = ["no_rows", "no_rows_3d", "no_rows_3d_inner", "one_row", "one_row_3d", "one_input_column",
                 "one_output_column", "rank_1", "all_ones", "no_rows_all_ones"]
TRITON_VARIANTS = {
    "plain": {},
    "biases_residual": dict(bias=True, lora_B_bias=True, residual=True),
    "dropout_as_lora_x": dict(lora_x=True),
    "conv1d_scale_tensor": dict(transposed=True, bias=True, scale_tensor=True),
    "adapter_views_strided_x": dict(views=True),  # A.t(), B.t() of the `x @ A @ B` form
}


def _host_inputs(shape, variant):
    lead, k, n, r = SHAPES[shape]
    flags = dict(TRITON_VARIANTS[variant])
    with_scale_tensor, views = flags.pop("scale_tensor", False), flags.pop("views", False)
    inp = make_inputs(m=lead, k=k, n=n, r=r, dtype=torch.float32, bias=flags.pop("bias", False), **flags)
    inp = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    inp["scale_tensor"] = torch.tensor(1.5) if with_scale_tensor else None
    if views:
        inp["lora_A"] = inp["lora_A"].t().contiguous().t()
        inp["lora_B"] = inp["lora_B"].t().contiguous().t()
        inp["x"] = torch.cat([inp["x"], inp["x"]], dim=-1)[..., ::2]  # unit stride nowhere
    return inp


def _host_run(module, inp, grad):
    names = ("x", "weight", "bias", "lora_A", "lora_B", "lora_B_bias", "lora_x", "residual", "scale",
             "scale_tensor", "weight_transposed", "out_dtype")
    out, hidden = module.lora_linear_forward(*[inp[k] for k in names])
    grads = module.lora_linear_backward(
        grad, inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["lora_x"], hidden, inp["scale"],
        inp["scale_tensor"], inp["weight_transposed"], torch.float32)
    return dict(zip(("out", "lora_hidden", "dx", "d_lora_x", "dA", "dB"), (out, hidden) + tuple(grads)))


@interp
@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_host_functions_match_reference(shape, variant):
    inp = _host_inputs(shape, variant)
    assert lt.supports(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["lora_x"])[0]
    grad = torch.randn(*inp["x"].shape[:-1], inp["weight"].shape[0 if not inp["weight_transposed"] else 1])
    ours, ref = _host_run(lt, inp, grad), _host_run(reference, inp, grad)
    for name, o in ours.items():
        r = ref[name]
        assert (o is None) == (r is None), name
        if o is None:
            continue
        assert o.shape == r.shape and o.dtype == r.dtype and o.is_contiguous(), (
            f"{name}: {tuple(o.shape)} {o.dtype} strides {o.stride()} vs {tuple(r.shape)} {r.dtype}")
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        if inp["x"].numel() == 0 and name in ("dA", "dB"):
            assert not o.any(), name


class _NoLaunch:
    """Stands in for a Triton kernel: any launch fails the test."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched with grid {grid} for an empty problem")

    def run(self, *args, **kwargs):
        raise AssertionError(f"{self.name} run for an empty problem")


@interp
def test_no_kernel_is_launched_for_zero_rows(monkeypatch):
    """M = 0: every kernel function returns correctly shaped results (zeros for the sums over
    rows) without a launch, and so do the op's host functions."""
    kernels = {thin: ("_rows_times_thin_kernel", "_thin_t_times_rows_kernel", "_rows_thin_pair_kernel"),
               gemm: ("_lora_gemm_kernel", "_lora_gemm_tma_kernel")}
    for module, names in kernels.items():
        for name in names:
            monkeypatch.setattr(module, name, _NoLaunch(name))
    x, t = torch.randn(0, 9), torch.randn(0, 5)
    assert thin.rows_times_thin(x, torch.randn(9, 5), torch.float32).shape == (0, 5)
    for rank_first, shape in ((True, (5, 9)), (False, (9, 5))):
        got = thin.thin_t_times_rows(t, x, 2.0, torch.tensor(3.0), torch.float16, rank_first=rank_first)
        assert got.shape == shape and got.dtype == torch.float16 and not got.any()
    xw, xt = thin.rows_thin_pair(x, torch.randn(9, 5), t, 2.0, None, torch.float16, torch.float32)
    assert xw.shape == (0, 5) and xw.dtype == torch.float16 and xt.shape == (9, 5) and not xt.any()
    out = torch.empty(0, 7)
    assert gemm.launch_lora_gemm(x, torch.randn(9, 7), t, torch.randn(5, 7), out, 1.0, None) is out
    for variant in TRITON_VARIANTS:
        inp = _host_inputs("no_rows_3d", variant)
        result = _host_run(lt, inp, torch.randn(0, 4, 7))
        assert result["out"].shape == (0, 4, 7) and result["dx"].shape == (0, 4, 5)
        assert result["dA"].shape == (3, 5) and not result["dA"].any() and not result["dB"].any()


# ------------------------------------------------------------------------------------------
# Compiled training on an empty and a one-token batch
# ------------------------------------------------------------------------------------------

class ResidualMLP(nn.Module):
    """x + down(gelu(up(x))): LoRA on both linears, a base bias on one. Transformers' own
    models cannot run an empty batch even eagerly (their attention reshapes with -1)."""

    def __init__(self, hidden=12, inner=20):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.act = nn.GELU()
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def _sum_of_squares(output):
    # A sum, not a mean: the mean of an empty batch is NaN, eager and compiled alike.
    output = output if isinstance(output, torch.Tensor) else output.logits
    return output.float().pow(2).sum()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("rows", [(0, 5), (1, 1)], ids=["empty_batch", "one_token"])
def test_compiled_peft_mlp_training_step_matches_eager(rows, dropout):
    """The compiled backward of an empty batch reshaped dx with -1 and raised; a dropout
    mask of an empty input came back as float and was refused."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(ResidualMLP(), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"],
                                                     lora_dropout=dropout, init_lora_weights=False))

    def batch(step):
        return (torch.randn(*rows, 12, generator=torch.Generator().manual_seed(step)),)

    result = train_and_compare(model, batch, steps=2, loss_fn=_sum_of_squares)
    assert result.report.counters["lora_linear.fused"] == 2


def test_compiled_peft_llama_one_token_batch_matches_eager():
    # Not q_proj, k_proj: attention over one key is 1 whatever q and k, so their adapters'
    # gradients are rounding noise, which AdamW scales up to full-size steps.
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.1,
                      target_modules=["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def batch(step):
        return {"input_ids": torch.randint(2, 96, (1, 1), generator=torch.Generator().manual_seed(step))}

    # The next-token loss of one token has no target: the logits' sum of squares instead.
    result = train_and_compare(model, batch, steps=2, loss_fn=_sum_of_squares)
    assert result.report.counters["lora_linear.fused"] == 10
