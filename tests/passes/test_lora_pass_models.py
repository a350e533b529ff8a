"""The LoRA pass on real architectures: every LoRA linear fused, training identical to eager."""

import pytest

from helpers import batch_for, count_lora_layers, peft_wrap, tiny_causal_lm, train_and_compare

FAMILIES = ["llama", "mistral", "qwen2", "bert", "gpt2", "opt"]


@pytest.mark.smoke
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_all_linear_fp32_matches_eager(family):
    extra = {"fan_in_fan_out": True} if family == "gpt2" else {}
    model = peft_wrap(tiny_causal_lm(family), lora_dropout=0.0, **extra)
    n_lora = count_lora_layers(model)
    result = train_and_compare(model, lambda step: batch_for(family, seed=step))
    report = result.report
    # One compile of forward per graph; every LoRA layer is fused exactly once per step-1 compile.
    assert report.counters["lora_linear.fused"] == n_lora, str(report)
    assert report.counters["lora_linear.refused"] == 0, str(report)
    assert n_lora >= 8


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_with_dropout_matches_eager(family):
    """lora_dropout > 0: the base sees the undropped input, the adapter the dropped one; the
    same RNG stream gives the same masks as eager under aot_eager."""
    model = peft_wrap(tiny_causal_lm(family), lora_dropout=0.2)
    result = train_and_compare(model, lambda step: batch_for(family, seed=step))
    assert result.report.counters["lora_linear.fused"] == count_lora_layers(model)
    assert all(s.details["dropout"] == pytest.approx(0.2) for s in result.report.fused)


def test_residual_add_is_folded_in_llama():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, target_modules=["o_proj", "down_proj", "q_proj"])
    result = train_and_compare(model, lambda step: batch_for("llama", seed=step), steps=1)
    folded = {s.module.rsplit(".", 1)[-1] for s in result.report.fused if s.details["residual_folded"]}
    assert folded == {"o_proj", "down_proj"}  # q_proj feeds a view, not a residual add
    assert result.report.counters["lora_linear.residual_folded"] == 4  # 2 layers x (o, down)


def test_residual_folding_can_be_switched_off():
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, target_modules=["o_proj"])
    result = train_and_compare(model, lambda step: batch_for("llama", seed=step), steps=1,
                               options={"inner": "aot_eager", "fold_residual": False})
    assert result.report.counters["lora_linear.fused"] == 2
    assert result.report.counters["lora_linear.residual_folded"] == 0


@pytest.mark.smoke
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout_mask"])
def test_varying_sequence_length_compiles_dynamic_graph(dropout):
    """Real batches vary in length: Dynamo's second compile marks the dim dynamic; the pass and
    the op's fake impl work on symbolic shapes (with the dropout mask too), and no third
    compile happens."""
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=dropout, target_modules=["q_proj", "down_proj"])
    lengths = [8, 11, 13, 5]
    result = train_and_compare(model, lambda step: batch_for("llama", seq=lengths[step], seed=step), steps=4)
    assert result.report.graphs == 2, str(result.report)
    assert result.report.counters["lora_linear.fused"] == 8
