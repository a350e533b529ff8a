"""Nf4Linear and the 4-bit conversion (unsloth_compile/nf4/linear.py, conversion.py,
unsloth_compile/ops/base_nf4.py's nf4_linear): the dense weights freed and the bytes reported,
from_dense / to_dense, refusals with reasons, the base-alone op and its gradients against float64,
dtype casts that leave the codes alone."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import unsloth_compile  # noqa: F401  registers the ops
from unsloth_compile import nf4
from unsloth_compile.dense_linear import dense_weight, lora_base_layers
from unsloth_compile.errors import UnslothCompileError

from helpers import peft_wrap, tiny_causal_lm


def tiny_llama(dtype=torch.float32, layers: int = 2):
    """A tiny Llama whose every projection has K a multiple of 64 (intermediate 128)."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=96, num_hidden_layers=layers)
    return tf.LlamaForCausalLM(cfg).to(dtype)


def test_convert_frees_the_dense_weights_and_reports_the_bytes():
    torch.manual_seed(0)
    model = peft_wrap(tiny_llama())
    dense = [layer.base_layer.weight for _, layer in lora_base_layers(model)]
    shapes = [w.shape for w in dense]
    refs = [weakref.ref(w) for w in dense]
    del dense
    report = nf4.convert(model)
    gc.collect()
    assert len(report.converted) == 14 and not report.refused and not report.from_bnb
    assert all(r() is None for r in refs), "a converted base weight is still alive"
    assert report.dense_bytes == sum(4 * n * k for n, k in shapes)  # fp32 model
    # codes: N K / 2; absmax codes: N K / 64; absmax scales: 4 per 256 absmax codes; offset: 4
    assert report.nf4_bytes == sum(n * k // 2 + n * k // 64 + 4 * -(-(n * k // 64) // 256) + 4 for n, k in shapes)
    assert "MiB freed" in str(report)
    layers = [layer.base_layer for _, layer in lora_base_layers(model)]
    assert all(isinstance(m, nf4.Nf4Linear) and m.source == "quantised" for m in layers)
    assert not any(name.endswith("base_layer.weight") for name, _ in model.named_parameters())
    scales = [m.absmax_scale.clone() for m in layers]
    model.to(torch.bfloat16)  # casts floating buffers, but not the codes or their fp32 statistics
    assert all(m.packed.dtype == torch.uint8 and m.absmax_scale.dtype == torch.float32 for m in layers)
    assert all(torch.equal(m.absmax_scale, s) for m, s in zip(layers, scales))
    assert all(m.weight_dtype == torch.bfloat16 for m in layers)
    assert nf4.revert(model) == 14
    assert all(isinstance(layer.base_layer, nn.Linear) for _, layer in lora_base_layers(model))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_dense_to_dense_round_trip_and_eager_forward(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(128, 40).requires_grad_(False)
    else:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(40, 128).requires_grad_(False)  # weight stored (in, out) = (128, 40)
        dense.weight.copy_(torch.randn(128, 40, generator=g))
    weight_nk = dense_weight(dense)
    converted = nf4.Nf4Linear.from_dense(dense)
    assert converted.packed.shape == (40 * 128 // 2,) and converted.absmax_codes.shape == (40 * 128 // 64,)
    want_w = nf4.dequantize_nf4(nf4.quantize_nf4(weight_nk.contiguous()))
    torch.testing.assert_close(converted.dequantized_weight(), want_w, rtol=0, atol=0)
    back = converted.to_dense()
    assert type(back) is type(dense) and not dense_weight(back).requires_grad
    torch.testing.assert_close(dense_weight(back), want_w, rtol=0, atol=0)
    # 4 bits a weight: the dequantised weight is near the dense one, not equal to it
    assert 15 < float(20 * torch.log10(weight_nk.norm() / (want_w - weight_nk).norm())) < 30
    x = torch.randn(3, 5, 128, generator=g)
    torch.testing.assert_close(converted(x), nn.functional.linear(x, want_w, dense.bias), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_op_and_its_gradients_match_float64(bias):
    """x and the bias get gradients (dx = dY W through the dequantised weight), the codes none."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(192, 23, bias=bias).requires_grad_(False)
    layer.weight.copy_(torch.randn(23, 192, generator=g))
    converted = nf4.Nf4Linear.from_dense(layer)
    if bias:
        converted.bias = nn.Parameter(torch.randn(23, generator=g))
    w64 = converted.dequantized_weight().double()
    x = torch.randn(2, 7, 192, generator=g, requires_grad=True)
    out = converted(x)
    x64 = x.detach().double().requires_grad_(True)
    b64 = converted.bias.detach().double().requires_grad_(True) if bias else None
    want = nn.functional.linear(x64, w64, b64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(converted.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in converted.buffers())


def test_opcheck_of_nf4_linear():
    g = torch.Generator().manual_seed(2)
    q = nf4.quantize_nf4(torch.randn(40, 64, generator=g))
    args = (torch.randn(5, 64, generator=g, requires_grad=True), q.packed, q.absmax_codes, q.absmax_scale,
            q.absmax_offset, 40, 64, q.dtype, torch.randn(40, generator=g, requires_grad=True), "auto")
    torch.library.opcheck(torch.ops.unsloth.nf4_linear.default, args)


def test_convert_refuses_unaligned_trainable_and_non_linear_layers_with_the_reason():
    model = nn.ModuleDict({"a": nn.Linear(96, 64), "b": nn.Linear(64, 96), "c": nn.Linear(64, 64),
                           "d": nn.Embedding(10, 64)})
    model.requires_grad_(False)
    model["c"].weight.requires_grad_(True)
    report = nf4.convert(model, select=lambda path, m: path in ("a", "b", "c", "d"))
    assert report.converted == ["b"]  # N need not be aligned: the blocks run along K
    assert "K (in_features)=96 is not a multiple of 64" in report.refused["a"]
    assert "trainable" in report.refused["c"] and "not a linear" in report.refused["d"]
    assert isinstance(model["b"], nf4.Nf4Linear) and type(model["a"]) is nn.Linear
    with pytest.raises(UnslothCompileError, match="K \\(in_features\\)=96"):
        nf4.Nf4Linear.from_dense(model["a"])


def test_all_frozen_linears_include_the_lm_head_and_keep_a_tied_weight():
    """nf4_layers="all": the LM head too; a head tied to the embedding is stored in NF4 but its
    dense weight stays (the embedding reads it): reported as shared, no bytes counted freed."""
    model = peft_wrap(tiny_llama())
    report = nf4.convert(model, select=nf4.frozen_linears)
    assert len(report.converted) == 15 and any(p.endswith("lm_head") for p in report.converted)
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.requires_grad_(False)
    report = nf4.convert(tied, select=nf4.frozen_linears)
    assert list(report.shared) == ["lm_head"] and report.shared["lm_head"] == "model.embed_tokens.weight"


def test_compile_select_picks_the_lora_bases_all_frozen_linears_or_nothing():
    model = peft_wrap(tiny_causal_lm("llama"))
    assert nf4.compile_select(model, precision_nf4=False, all_layers=False) is None
    assert nf4.compile_select(model, precision_nf4=True, all_layers=True) is nf4.frozen_linears
    select = nf4.compile_select(model, precision_nf4=True, all_layers=False)
    picked = [path for path, m in model.named_modules() if select(path, m)]
    assert len(picked) == 14 and all(p.endswith("base_layer") for p in picked)
