"""A model loaded in 4 bits by bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`) and wrapped by PEFT (its `lora.bnb.Linear4bit` layers): compile
takes the Linear4bit bases over as they are stored (no re-quantisation: the codes' storage is
shared), every site fuses into lora_linear_nf4, and training matches PEFT + bitsandbytes eager;
other bitsandbytes formats are refused with the reason. Skipped without bitsandbytes."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from unsloth_compile import nf4  # noqa: E402
from unsloth_compile.dense_linear import lora_base_layers  # noqa: E402

from helpers import assert_same_training, train_steps, train_taking_over_four_bit_bases  # noqa: E402
from test_nf4_linear import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def load_in_4bit(path, double_quant=True, quant_type="nf4"):
    """The tiny Llama as transformers loads it with BitsAndBytesConfig, LoRA on every projection
    (random A and B) by PEFT's 4-bit layer."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32,
                                                    device_map="cpu")
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1,
                                            init_lora_weights=False))


def test_a_bitsandbytes_model_is_taken_over_as_stored_and_trains_as_peft_bitsandbytes_eager(checkpoint, caplog):
    model, eager, eager_bnb = (load_in_4bit(checkpoint) for _ in range(3))
    nf4.convert(eager, select=nf4.bnb_linears)  # PEFT's 4-bit layers over Nf4Linear bases, eager
    layers = [layer for _, layer in lora_base_layers(model)]
    assert all(type(layer).__module__ == "peft.tuners.lora.bnb" for layer in layers)
    storage = [layer.base_layer.weight.untyped_storage().data_ptr() for layer in layers]
    got = train_taking_over_four_bit_bases(model, {"inner": "aot_eager", "bucket_lengths": False}, "bitsandbytes",
                                           storage, "0 linear(s) stored in NF4, 14 bitsandbytes Linear4bit taken "
                                           "over as stored", caplog, sites=14)
    assert_same_training(got, train_steps(eager))
    # bitsandbytes' own CPU forward of an input that takes no gradient (the first layer's
    # projections) runs its 4-bit GEMM, which rounds as bf16 does: close, not equal
    # (the losses of both steps, the gradients of the first: a step on them drifts further)
    want = train_steps(eager_bnb)
    assert_same_training((got[0], got[1][:1]), (want[0], want[1][:1]), rtol=1e-2, atol=1e-3)


def test_the_op_on_bitsandbytes_codes_equals_bitsandbytes_dequantisation(checkpoint):
    """The Nf4Linear that shares a Linear4bit's codes computes with bitsandbytes' own
    dequantised weight, bit for bit."""
    from bitsandbytes.functional import dequantize_4bit

    model = load_in_4bit(checkpoint)
    layer = lora_base_layers(model)[0][1].base_layer
    want = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    taken = nf4.Nf4Linear.from_bnb(layer)
    torch.testing.assert_close(taken.dequantized_weight(), want, rtol=0, atol=0)
    x = torch.randn(3, 5, taken.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(taken(x), torch.nn.functional.linear(x, want, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fp4", "single_quant"])
def test_other_bitsandbytes_formats_are_refused_with_the_reason(checkpoint, kind):
    """An FP4 model or one without double-quantised statistics keeps its Linear4bit layers (they
    run as bitsandbytes runs them); the conversion report says why."""
    model = load_in_4bit(checkpoint, double_quant=kind != "single_quant", quant_type="nf4" if kind != "fp4" else "fp4")
    report = nf4.convert(model, select=nf4.bnb_linears)
    assert not report.converted and not report.from_bnb and len(report.refused) == 14
    reason = next(iter(report.refused.values()))
    assert ("quant_type 'fp4'" if kind == "fp4" else "not double-quantised") in reason, reason
    assert all(type(layer.base_layer).__name__ == "Linear4bit" for _, layer in lora_base_layers(model))
