"""The one LoRA autograd Function over each frozen-base strategy (unsloth_compile/ops/): forward and
every gradient against a float64 formula written out here, at awkward shapes (rows not a multiple
of 16, ranks 1 and 7), with and without bias, LoRA-B bias, residual, dropout (as a mask or as a
tensor) and a tensor scale; a toy strategy defined and registered in this file runs through the
same Function, fake impls and compile path as the product's."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import unsloth_compile  # noqa: F401  registers the ops
from helpers import saved_tensors
from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.kernels import reference, sparse24
from unsloth_compile.kernels.fp8 import fp8
from unsloth_compile.nf4 import dequantize_nf4, quantize_nf4
from unsloth_compile.ops.frozen_base import FrozenBase, LoraBackward, LoraForward
from unsloth_compile.ops.lora import REGISTERED, LoraLinearFunction, register_lora_op
from unsloth_compile.sparsity.mask import transposable_mask


# ----------------------------------------------------------------------------- a toy strategy
#
# The base weight is stored as W and a per-output-row scale s: the product is x (s * W)^T.
# This file is all a new base needs: its subclass, its schemas, one register_lora_op call.


@dataclass(frozen=True)
class RowScaledBase(FrozenBase):
    def out_features(self, base) -> int:
        return base["weight"].shape[0]

    def forward(self, base, call: LoraForward):
        weight = base["weight"] * base["row_scale"][:, None]
        lead, n = call.x.shape[:-1], weight.shape[0]
        out = F.linear(reference.rows(call.x), weight, call.bias)
        adapter_in = reference.rows(call.x if call.lora_x is None else call.lora_x).to(call.lora_A.dtype)
        hidden = adapter_in @ call.lora_A.t()
        lora = F.linear(hidden, call.lora_B, call.lora_B_bias)
        out = (out + lora * reference.effective_scale(call.scale, call.scale_tensor)).to(call.out_dtype)
        if call.residual is not None:
            out = out + reference.rows(call.residual)
        return out.reshape(*lead, n), hidden

    def backward(self, base, call: LoraBackward):
        weight = base["weight"] * base["row_scale"][:, None]
        grad2d = reference.rows(call.grad_out)
        dx = grad2d.to(weight.dtype) @ weight
        grad_lora = grad2d.to(call.lora_A.dtype) * reference.effective_scale(call.scale, call.scale_tensor)
        return reference.adapter_backward(grad_lora, dx, call.x, call.lora_x, call.lora_A, call.lora_B,
                                          call.lora_hidden)


TOY = RowScaledBase(
    name="lora_linear_row_scaled",
    forward_args=(
        "Tensor x, Tensor weight, Tensor row_scale, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_B_bias, "
        "Tensor? lora_x, Tensor? residual, float scale, Tensor? scale_tensor, ScalarType out_dtype, str impl, "
        "Tensor? dropout_mask=None, float dropout_scale=1.0"),
    backward_args=(
        "Tensor grad_out, Tensor x, Tensor weight, Tensor row_scale, Tensor lora_A, Tensor lora_B, Tensor? lora_x, "
        "Tensor lora_hidden, float scale, Tensor? scale_tensor, str impl, Tensor? dropout_mask=None, "
        "float dropout_scale=1.0"),
)
TOY_OP = REGISTERED.get("unsloth_test::lora_linear_row_scaled") or register_lora_op(TOY, namespace="unsloth_test")


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """A frozen base: its op, its (n, k), the base's op arguments, the float64 weight they
    stand for, and whether its base products are lossy (judged by SQNR, not allclose)."""

    op: str
    n: int
    k: int
    lossy: bool = False


CASES = {
    "dense": Case("unsloth::lora_linear", 23, 19),
    "dense_transposed": Case("unsloth::lora_linear", 23, 19),
    "fp8_stored": Case("unsloth::lora_linear_fp8", 40, 48, lossy=True),
    "fp8_quantised_per_call": Case("unsloth::lora_linear_fp8", 40, 48, lossy=True),
    "sparse24": Case("unsloth::lora_linear_sparse24", 24, 40),
    "nf4": Case("unsloth::lora_linear_nf4", 23, 128),  # exact: compared with its dequantised weight
    "toy_row_scaled": Case("unsloth_test::lora_linear_row_scaled", 23, 19),
}


def make_base(name: str, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """(the base's op arguments, the float64 (N, K) weight they compute with)."""
    case = CASES[name]
    w = torch.randn(case.n, case.k, generator=g)
    if name == "dense":
        return {"weight": w, "weight_transposed": False}, w.double()
    if name == "dense_transposed":
        return {"weight": w.t().contiguous(), "weight_transposed": True}, w.double()
    if name == "fp8_stored":
        codes, dequant = fp8.quantize_weight(w)
        return {"weight": codes, "weight_scale": dequant}, fp8.dequantize_rowwise(codes, dequant).double()
    if name == "fp8_quantised_per_call":
        return {"weight": w, "weight_scale": None}, w.double()
    if name == "nf4":
        q = quantize_nf4(w)
        base = {"packed": q.packed, "absmax_codes": q.absmax_codes, "absmax_scale": q.absmax_scale,
                "absmax_offset": q.absmax_offset, "out_features": case.n, "in_features": case.k,
                "weight_dtype": q.dtype}
        return base, dequantize_nf4(q).double()
    if name == "sparse24":
        w = w * transposable_mask(w.abs())
        return {"weight": w, "compressed": [], "layout": sparse24.DENSE}, w.double()
    row_scale = torch.rand(case.n, generator=g) + 0.5
    return {"weight": w, "row_scale": row_scale}, (w * row_scale[:, None]).double()


VARIANTS = {
    "plain": {},
    "bias_residual": {"bias": True, "residual": True},
    "mask_scale_tensor": {"dropout": "mask", "scale_tensor": True},
    "lora_x_lora_B_bias": {"dropout": "lora_x", "lora_B_bias": True},
    "everything": {"bias": True, "lora_B_bias": True, "residual": True, "dropout": "mask", "scale_tensor": True},
}


def make_inputs(name: str, r: int, variant: dict, lead=(3, 7), seed=0):
    """(the op's arguments by name, the float64 weight). Never zeros: every tensor random."""
    g = torch.Generator().manual_seed(seed)
    base, w64 = make_base(name, g)
    n, k = CASES[name].n, CASES[name].k

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    dropout = variant.get("dropout")
    values = dict(
        x=rand(*lead, k), bias=rand(n) if variant.get("bias") else None, lora_A=rand(r, k), lora_B=rand(n, r),
        lora_B_bias=rand(n) if variant.get("lora_B_bias") else None,
        lora_x=rand(*lead, k) if dropout == "lora_x" else None,
        residual=rand(*lead, n) if variant.get("residual") else None, scale=0.75,
        scale_tensor=torch.rand((), generator=g) + 0.5 if variant.get("scale_tensor") else None,
        out_dtype=torch.float32, impl="reference",
        dropout_mask=torch.rand(*lead, k, generator=g) > 0.3 if dropout == "mask" else None,
        dropout_scale=1 / 0.7 if dropout == "mask" else 1.0, **base)
    return values, w64


def call(op_name: str, values: dict):
    op = REGISTERED[op_name]
    return op.forward_op.overloadpacket(*(values[name] for name in op.forward_names))


def formula(values: dict, w64: torch.Tensor, leaves: dict) -> torch.Tensor:
    """out in float64, from the leaves' float64 copies."""
    x = leaves["x"]
    if values["dropout_mask"] is not None:
        adapter_in = x * values["dropout_mask"].double() * values["dropout_scale"]
    else:
        adapter_in = x if values["lora_x"] is None else leaves["lora_x"]
    lora = adapter_in @ leaves["lora_A"].t() @ leaves["lora_B"].t()
    if values["lora_B_bias"] is not None:
        lora = lora + leaves["lora_B_bias"]
    scale = values["scale"] * (1.0 if values["scale_tensor"] is None else values["scale_tensor"].double())
    out = x @ w64.t() + scale * lora
    if values["bias"] is not None:
        out = out + leaves["bias"]
    if values["residual"] is not None:
        out = out + leaves["residual"]
    return out


GRADIENTS = ("x", "bias", "lora_A", "lora_B", "lora_B_bias", "lora_x", "residual")


def sqnr(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(20 * torch.log10(want.norm() / (got.double() - want).norm()))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, lossy: bool):
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if lossy:  # an fp8 base product: judged against float64 by signal-to-noise ratio
        assert sqnr(got, want) >= 25, f"{what}: SQNR {sqnr(got, want):.1f} dB < 25 dB"
        return
    err = (got.double() - want).abs()
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    if float(err.max()) > tol:
        bad = (err > tol).nonzero()[:5].tolist()
        pytest.fail(f"{what}: max error {float(err.max()):.3g} > {tol:.3g}; first mismatches at {bad}: "
                    f"got {[float(got[tuple(i)]) for i in bad]}, want {[float(want[tuple(i)]) for i in bad]}")


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("r", [1, 7])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_every_gradient_match_float64(name, r, variant):
    values, w64 = make_inputs(name, r, VARIANTS[variant])
    out, hidden = call(CASES[name].op, values)
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    assert not hidden.requires_grad and hidden.shape == (21, r)
    leaves = {k: values[k].detach().double().requires_grad_(True) for k in GRADIENTS if values[k] is not None}
    want = formula(values, w64, leaves)
    lossy = CASES[name].lossy
    assert_close(out, want, "out", lossy)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    want.backward(grad.double())
    for k in leaves:
        # with an fp8 base only dx goes through a quantised product (dY W); the rest is exact
        assert_close(values[k].grad, leaves[k].grad, f"d{k}", lossy and k == "x")
    assert all(values[k].grad is None for k in ("weight", "scale_tensor") if isinstance(values.get(k), torch.Tensor))


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_of_each_strategy(name):
    """Schema, fake impl (sizes and strides), autograd registration and AOT dispatch."""
    values, _ = make_inputs(name, 7, VARIANTS["everything"], lead=(5,))
    op = REGISTERED[CASES[name].op]
    # test_schema compares the inputs before and after by arithmetic that e4m3 tensors lack
    utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if not (name == "fp8_stored" and u == "test_schema")]
    torch.library.opcheck(op.forward_op, tuple(values[n] for n in op.forward_names), test_utils=utils)


@pytest.mark.parametrize("name", list(CASES))
def test_x_is_not_saved_when_the_adapter_reads_lora_x(name):
    values, _ = make_inputs(name, 7, {"dropout": "lora_x", "bias": True})
    _, saved = saved_tensors(lambda: call(CASES[name].op, values)[0])
    x_storage = values["x"].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != x_storage for t in saved)
    assert any(t.untyped_storage().data_ptr() == values["lora_x"].untyped_storage().data_ptr() for t in saved)


def test_toy_strategy_trains_under_compile_as_eager():
    """The toy op in a compiled module (AOTAutograd partitions the Function's graphs, the fake
    impls give the shapes) equals its eager run, forward and gradients."""
    values, _ = make_inputs("toy_row_scaled", 7, VARIANTS["everything"])

    def step(fn):
        leaves = {k: values[k].detach().clone().requires_grad_(True) for k in GRADIENTS if values[k] is not None}
        out = fn({**values, **leaves})
        out.sum().backward()
        return [out.detach()] + [leaves[k].grad for k in sorted(leaves)]

    def run(v):
        return call(CASES["toy_row_scaled"].op, v)[0] * 2

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for got, want in zip(step(compiled), step(run)):
        torch.testing.assert_close(got, want)


def test_a_strategy_is_one_registration_of_the_same_function():
    assert {op.strategy.name for op in REGISTERED.values()} >= {
        "lora_linear", "lora_linear_fp8", "lora_linear_sparse24", "lora_linear_nf4", "lora_linear_row_scaled"}
    assert TOY_OP.base_names == ("weight", "row_scale")
    assert TOY_OP.backward_base_names == ("weight", "row_scale")
    assert REGISTERED["unsloth::lora_linear"].backward_base_names == ("weight", "weight_transposed", "base_dtype")
    assert issubclass(LoraLinearFunction, torch.autograd.Function)


def test_registration_refuses_a_schema_without_the_adapter_arguments_or_a_taken_name():
    broken = RowScaledBase(name="lora_linear_no_hidden", forward_args=TOY.forward_args,
                           backward_args=TOY.backward_args.replace("Tensor lora_hidden, ", ""))
    with pytest.raises(UnslothCompileError, match=r"lack the adapter's arguments \['lora_hidden'\]"):
        register_lora_op(broken, namespace="unsloth_test")
    with pytest.raises(UnslothCompileError, match="registered already"):
        register_lora_op(TOY, namespace="unsloth_test")
