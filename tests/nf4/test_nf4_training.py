"""The 4-bit base in compiled training (passes/lora/nf4_linear.py, unsloth_compile.compile(...,
precision="nf4")): every site fused into lora_linear_nf4; losses and LoRA gradients equal to
the eager model whose bases are dequantize_nf4(quantize_nf4(W)); unaligned layers left dense and
reported; autocast, gradient checkpointing, the fused cross-entropy, a rank change, adapter
save/load; the option checks and the FSDP2 refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unsloth_compile
from unsloth_compile import nf4
from unsloth_compile.dense_linear import lora_base_layers
from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.report import collect_reports
from unsloth_compile.training_outputs import loss_only

from helpers import (LoraMLP, assert_compiled_matches_eager_under_bf16_autocast, assert_same_training, batch_for,
                     peft_wrap, train_and_compare, train_steps)
from test_nf4_linear import tiny_llama

# bucket_lengths off: padding the token axis would change the dropout draws against eager
AOT = {"inner": "aot_eager", "summary": False, "bucket_lengths": False}


def dequantised_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` whose LoRA bases hold dequantize_nf4(quantize_nf4(W)) as dense weights:
    what the 4-bit model computes, in plain PEFT."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_base_layers(twin):
            w = layer.base_layer.weight
            w.copy_(nf4.dequantize_nf4(nf4.quantize_nf4(w)))
    return twin


def test_compile_with_precision_nf4_fuses_every_site_and_trains_as_the_dequantised_model():
    torch.manual_seed(0)
    model = peft_wrap(tiny_llama(), lora_dropout=0.1)
    twin = dequantised_twin(model)
    with collect_reports() as report:
        unsloth_compile.compile(model, precision="nf4", **AOT)
        got = train_steps(model)
    assert all(isinstance(layer.base_layer, nf4.Nf4Linear) for _, layer in lora_base_layers(model))
    assert report.counters["lora_linear.fused"] == 14 and report.counters["nf4_linear.fused"] == 14, str(report)
    assert report.counters["lora_linear.refused"] == 0
    sites = [s for s in report.sites if s.pattern == "lora_linear"]
    assert all(s.details["precision"] == "nf4" and "base in 4 bits (NF4)" in s.reason for s in sites)
    assert all(s.details["base_dtype"] == "float32" for s in sites)
    assert_same_training(got, train_steps(twin))


# The middle layer reads 96 features (not a multiple of 64): convert leaves it dense.
UNALIGNED_SIZES = (64, 96, 128, 40)


def test_an_unaligned_layer_stays_dense_and_the_pass_says_why():
    """convert leaves 96 -> 128 dense with the reason; the pass under precision="nf4" fuses it with
    the dense op and reports "nf4 refused"; the compiled model trains as the eager converted one
    (the same 4-bit bases, a residual folded in and a bias in each base)."""
    torch.manual_seed(0)
    model = LoraMLP(UNALIGNED_SIZES)
    report = nf4.convert(model)
    assert report.converted == ["layers.0.base_layer", "layers.2.base_layer"]
    assert "K (in_features)=96" in report.refused["layers.1.base_layer"]
    x = torch.randn(3, 7, 64)
    result = train_and_compare(model, lambda step: (x + step,), options={**AOT, "precision": "nf4"}, steps=2)
    counters = result.report.counters
    assert counters["lora_linear.fused"] == 3 and counters["nf4_linear.fused"] == 2
    assert counters["nf4_linear.refused"] == 1
    sites = {s.module: s for s in result.report.sites}
    assert "base in 4 bits (NF4)" in sites["layers.0"].reason
    assert "nf4 refused: the base is dense" in sites["layers.1"].reason


def test_stored_bases_fuse_without_the_option_and_under_autocast_match_eager():
    """An fp32 model with 4-bit bases under bf16 autocast: Nf4Linear casts x as nn.Linear would,
    the pass peels that cast so that the adapters match, and the op computes in bf16 as eager."""
    torch.manual_seed(0)
    model = LoraMLP(sizes=(64, 128, 64, 40))
    nf4.convert(model)
    report = assert_compiled_matches_eager_under_bf16_autocast(model, torch.randn(3, 7, 64), AOT)
    assert report.counters["nf4_linear.fused"] == 3
    assert all("autocast (computes in bfloat16), base in 4 bits (NF4)" in s.reason for s in report.sites)


def test_peft_llama_under_autocast_trains_as_the_dequantised_model():
    torch.manual_seed(0)
    model = peft_wrap(tiny_llama())
    twin = dequantised_twin(model)
    with collect_reports() as report:
        unsloth_compile.compile(model, precision="nf4", **AOT)
        got = train_steps(model, autocast=True)
    assert report.counters["nf4_linear.fused"] == 14, str(report)
    want = train_steps(twin, autocast=True)
    # bf16: the op sums dx of the base and the adapter in bf16 where eager sums them in fp32
    # (passes/lora/lora_autocast.py), a rounding that the second step's gradients carry on
    assert_same_training((got[0], got[1][:1]), (want[0], want[1][:1]), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    """The sites inside the checkpointed decoder layer fuse over their 4-bit bases; backward
    recomputes them from the same codes. One layer (one checkpoint body), as in
    tests/passes/test_checkpointing.py: a second body costs seconds of tracing."""
    torch.manual_seed(0)
    base = tiny_llama(layers=1)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = peft_wrap(base, lora_dropout=0.1)
    model.train()
    twin = dequantised_twin(model)
    with collect_reports() as report:
        unsloth_compile.compile(model, precision="nf4", **AOT)
        got = train_steps(model)
    assert report.counters["nf4_linear.fused"] == 7 and report.counters["lora_linear.refused"] == 0, str(report)
    assert_same_training(got, train_steps(twin))


@pytest.mark.parametrize("compress", ["none", "int8"])
def test_the_fused_cross_entropy_and_compressed_activations(compress):
    """A loss-only forward: the dense LM head fuses with the cross-entropy; the FFN regions
    between the 4-bit LoRA ops are found (their products recomputed, or compressed)."""
    torch.manual_seed(0)
    model = loss_only(peft_wrap(tiny_llama()))
    twin = dequantised_twin(model)
    with collect_reports() as report:
        unsloth_compile.compile(model, precision="nf4", compress_activations=compress, **AOT)
        got = train_steps(model)
    assert report.counters["nf4_linear.fused"] == 14 and report.counters["linear_cross_entropy.fused"] == 1
    assert report.counters["compress_saved.recomputed"] == 2, str(report)
    if compress == "none":
        assert_same_training(got, train_steps(twin))
    else:  # lossy for the gradients only: the losses stay exact
        want = train_steps(twin)
        torch.testing.assert_close(got[0][0], want[0][0], rtol=1.3e-6, atol=1e-5)
        assert report.counters["compress_saved.compressed"] >= 2, str(report)


def test_a_rank_change_leaves_the_4bit_base_untouched():
    from unsloth_compile.rank import set_rank

    torch.manual_seed(0)
    model = peft_wrap(tiny_llama(layers=1))  # the rank change and the kept bases are per site: one layer has seven
    unsloth_compile.compile(model, precision="nf4", **AOT)
    bases = [layer.base_layer for _, layer in lora_base_layers(model)]
    before = [[t.clone() for t in m.buffers()] for m in bases]
    train_steps(model, steps=1)
    with collect_reports() as report:
        set_rank(model, 6)
        train_steps(model, steps=1, seed_offset=1)
    assert report.counters["nf4_linear.fused"] == report.counters["lora_linear.fused"] > 0, str(report)
    assert all("rank 6" in s.reason for s in report.fused)
    assert all(r.shape[0] == 6 for _, layer in lora_base_layers(model) for r in [layer.lora_A["default"].weight])
    assert [layer.base_layer for _, layer in lora_base_layers(model)] == bases
    assert all(torch.equal(a, b) for m, kept in zip(bases, before) for a, b in zip(m.buffers(), kept))


def test_the_adapter_saves_and_loads_and_the_base_stays_as_loaded(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = peft_wrap(tiny_llama(layers=1))  # one layer's adapters are what is saved per layer
    base_state = copy.deepcopy(model.get_base_model().state_dict())
    unsloth_compile.compile(model, precision="nf4", **AOT)
    train_steps(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)  # the adapter alone, nothing of the 4-bit base
    fresh = tiny_llama(layers=1)
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base_state.items()
                           if "lora_" not in k}, strict=False)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    unsloth_compile.compile(loaded, precision="nf4", **AOT)
    batch = batch_for("llama", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)
    for (name, a), (_, b) in zip(sorted((n, p) for n, p in model.named_parameters() if "lora_" in n),
                                 sorted((n, p) for n, p in loaded.named_parameters() if "lora_" in n)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_options_are_checked():
    with pytest.raises(UnslothCompileError, match="nf4_layers='all' says which layers precision='nf4'"):
        unsloth_compile.Config(nf4_layers="all")
    with pytest.raises(UnslothCompileError, match="choose one of 'default', 'fp8', 'nf4'"):
        unsloth_compile.Config(precision="int4")
    with pytest.raises(UnslothCompileError, match="sparsity='2:4' with precision='nf4'"):
        unsloth_compile.Config(precision="nf4", sparsity="2:4")
    assert unsloth_compile.Config(precision="nf4", nf4_layers="all").nf4_layers.value == "all"


def test_fsdp2_refuses_to_shard_a_4bit_base_with_the_reason():
    from unsloth_compile.distributed.fsdp import shard_lora_model

    model = peft_wrap(tiny_llama())
    nf4.convert(model)
    with pytest.raises(UnslothCompileError, match="frozen='shard' cannot shard the 4-bit base .*frozen='replicate'"):
        shard_lora_model(model, frozen="shard")
