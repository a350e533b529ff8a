"""The bench's model options (bench/model_options.py): `checkpointing=true` and `base=bnb-nf4`,
valid for every LoRA kind, popped before the backend sees the options. Parsing and validation,
the model they build (checkpointed layers that recompute, Linear4bit bases wrapped by PEFT's
4-bit LoRA layer), and tiny e2e runs: checkpointing leaves the losses as they were, eager and
the backend train the same 4-bit weights to the same losses."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from unsloth_compile.bench.__main__ import main
from unsloth_compile.dense_linear import lora_base_layers
from unsloth_compile.bench.e2e import PRESETS, build_model, prepare_model
from unsloth_compile.bench.model_options import quantise_linears_bnb_nf4
from unsloth_compile.bench.variants import compile_for, parse_variant, run_isolated

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
TINY = PRESETS["tiny"]
CPU = torch.device("cpu")


def _tiny(spec: str):
    variant = parse_variant(spec, inner="aot_eager")
    torch.manual_seed(0)
    return prepare_model(build_model(TINY, CPU, torch.float32), variant, TINY), variant


def test_model_options_parse_for_every_lora_kind_and_stay_out_of_the_backend_options():
    for kind in ("eager", "inductor", "aot_eager", "unsloth"):
        v = parse_variant(f"q={kind}:base=bnb-nf4,checkpointing=true", inner="aot_eager")
        assert v.options["base"] == "bnb-nf4" and v.options["checkpointing"] is True
    assert parse_variant("c=full:checkpointing=true", inner="aot_eager").options == {"checkpointing": True}
    assert parse_variant("d=eager:base=bf16,checkpointing=false", inner="aot_eager").describe() == "PEFT LoRA, eager"
    assert (parse_variant("q=eager:base=bnb-nf4,checkpointing=true", inner="aot_eager").describe()
            == "PEFT LoRA, eager, bitsandbytes NF4 bases, gradient checkpointing")
    unsloth = parse_variant("q=unsloth:checkpointing=true,base=bnb-nf4", inner="aot_eager")
    assert unsloth.describe() == ('PEFT LoRA + backend="unsloth" (inner=aot_eager), bitsandbytes NF4 bases, '
                                  'gradient checkpointing')
    assert unsloth.lossy and not parse_variant("b=unsloth:base=bf16", inner="aot_eager").lossy


@pytest.mark.parametrize("spec, match", [
    ("x=eager:checkpointing=maybe", "checkpointing='maybe'; true or false"),
    ("x=unsloth:base=fp4", "base='fp4'; one of bf16, bnb-nf4"),
    ("x=full:base=bnb-nf4", "base=bnb-nf4 is for the LoRA kinds .*kind 'full'"),
    ("x=floor:base=bnb-nf4", "base=bnb-nf4 is for the LoRA kinds .*kind 'floor'"),
    ("x=eager:checkpointing=true,fold_residual=false", "only meaningful for kinds unsloth and floor"),
])
def test_bad_model_options_are_refused_with_the_reason(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(spec, inner="aot_eager")


def test_checkpointing_makes_every_layer_recompute_in_backward():
    """Non-reentrant checkpointing, set before PEFT: each decoder layer's MLP is entered twice per
    step (forward, then backward's recomputation), once without."""
    def mlp_calls(spec):
        model, _ = _tiny(spec)
        model.train()  # transformers checkpoints in training only
        calls = []
        # a pre-hook: backward's recomputation stops as soon as the last saved tensor is recomputed,
        # inside the MLP, before a forward hook would run
        model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        batch = {"input_ids": torch.randint(0, 512, (2, 16)), "labels": torch.randint(0, 512, (2, 16))}
        model(**batch).loss.backward()
        return model, len(calls)

    model, calls = mlp_calls("c=eager:checkpointing=true")
    layer = model.get_base_model().model.layers[0]
    assert layer.gradient_checkpointing and calls == 2
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    assert mlp_calls("c=eager")[1] == 1


def test_a_model_built_without_the_options_is_refused():
    """A command that builds its own model and does not apply the options is told so, rather
    than measuring another model than the variant names."""
    model, _ = _tiny("p=eager")
    with pytest.raises(ValueError, match="checkpointing=true, but the model has no checkpointed layer"):
        compile_for(model, parse_variant("c=eager:checkpointing=true", inner="aot_eager"))
    with pytest.raises(ValueError, match="base=bnb-nf4, but the model has no bitsandbytes Linear4bit"):
        compile_for(model, parse_variant("q=unsloth:base=bnb-nf4", inner="aot_eager"))


def test_without_bitsandbytes_the_4bit_variant_fails_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ValueError, match="base=bnb-nf4 needs the bitsandbytes package"):
        quantise_linears_bnb_nf4(build_model(TINY, CPU, torch.float32))
    result = run_isolated(lambda: _tiny("q=eager:base=bnb-nf4"), CPU)
    assert result["status"] == "failed" and "needs the bitsandbytes package" in result["error"]


@needs_bnb
def test_4bit_bases_are_bitsandbytes_nf4_wrapped_by_peft_4bit_lora():
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    dense = build_model(TINY, CPU, torch.float32)
    model, _ = _tiny("q=eager:base=bnb-nf4")
    lora = lora_base_layers(model)
    assert len(lora) == 14 and all(type(m).__module__ == "peft.tuners.lora.bnb" for _, m in lora)
    for name, layer in lora:
        base = layer.base_layer
        assert type(base) is bnb.nn.Linear4bit and base.compute_dtype == torch.float32
        state = base.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
        # the same weights, in 4 bits: NF4 keeps about 20 dB of signal
        want = dense.get_submodule(name.removeprefix("base_model.model.")).weight
        error = dequantize_4bit(base.weight.data, state) - want
        assert 10 * torch.log10(want.pow(2).sum() / error.pow(2).sum()) > 18
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # the output embeddings stay dense
    assert model.get_base_model().is_loaded_in_4bit


def _e2e(tmp_path, *variants: str) -> dict:
    assert main(["e2e", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path),
                 "--variants", "peft-eager", *[a for v in variants for a in ("--variant", v)]]) == 0
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    assert "model preparation" in data["peak_mem_over"] and "model preparation" in (tmp_path / "e2e-tiny.md").read_text()
    results = {r["variant"]["name"]: r for r in data["results"]}
    assert all(r["status"] == "ok" for r in results.values()), [r.get("traceback") for r in results.values()]
    return results


@pytest.mark.slow
def test_e2e_checkpointing_leaves_the_losses_as_they_were(tmp_path):
    r = _e2e(tmp_path, "u=unsloth", "ck=eager:checkpointing=true", "cku=unsloth:checkpointing=true")
    assert r["ck"]["losses"] == r["peft-eager"]["losses"]  # eager: the same ops recomputed, bit for bit
    assert r["cku"]["losses"] == pytest.approx(r["u"]["losses"], rel=1e-5)
    assert r["cku"]["fusion"]["fused"] == 14 and r["cku"]["fusion"]["refused"] == 0
    assert r["cku"]["variant"]["description"].endswith(", gradient checkpointing")


@needs_bnb
@pytest.mark.slow
def test_e2e_4bit_bases_train_alike_eager_and_under_the_backend(tmp_path):
    """The backend takes the Linear4bit bases over as stored (no precision option): every site
    fuses over NF4, and the losses stay close to PEFT + bitsandbytes eager's on the same weights
    and away from the dense model's."""
    r = _e2e(tmp_path, "q=eager:base=bnb-nf4", "qu=unsloth:base=bnb-nf4")
    assert r["qu"]["fusion"]["counters"].get("nf4_linear.fused") == 14
    assert r["qu"]["losses"] == pytest.approx(r["q"]["losses"], rel=1e-3)
    assert r["q"]["losses"] != pytest.approx(r["peft-eager"]["losses"], rel=1e-5)
