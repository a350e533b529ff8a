"""Tensor and pipeline parallelism with the backend (unsloth_compile/distributed/tensor_parallel.py, pipeline.py,
dtensor_sharding.py), on CPU with gloo.

One launch (tests/parallel_cases.py) starts a 2-process group (TP = 2; PP = 2 with GPipe and
with 1F1B) and a 4-process group (DP x TP = 2 x 2; DP x PP = 2 x 2) at once; each trains a tiny
PEFT Llama for two AdamW steps. The tests compare every rank's losses and LoRA gradients (and,
under TP, the parameters after the steps) with one eager process on the whole batch, and count
the fused sites: under TP each is fused on DTensor operands and the op computes with the local
shards' shapes.
"""

from __future__ import annotations


import pytest
import torch

from parallel_cases import STEPS, reference, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(multi_process_launches):
    try:  # started with the session (tests/conftest.py)
        return multi_process_launches["test_parallel.py"].results()
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def ref_tied():
    return reference(tied=True)


def _close(actual: dict, expected: dict, what: str) -> None:
    """Within 1e-4 of the value or of the tensor's largest element (fp32 sums in another order:
    the all-reduces, the split matmuls; measured <= 4e-5 after two AdamW steps)."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4 * scale + 1e-8,
                                   msg=lambda m, name=name: f"{what}, {name}: {m}")


def _losses(run: dict, ref: dict, what: str) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what} losses: {m}")


def _by_model_name(stage_grads: dict, ref_grads: dict) -> dict:
    """A stage's parameter names (`layers.3.self_attn...`) as the whole model names them."""
    out = {}
    for name, value in stage_grads.items():
        (full,) = [k for k in ref_grads if k.endswith(".model." + name)]
        out[full] = value
    return out


def _check_tp(run: dict, ref: dict, what: str) -> None:
    _losses(run, ref, what)
    for step in range(STEPS):
        _close(run["grads"][step], ref["grads"][step], f"{what} step {step} grads")
    _close(run["params"], ref["params"], f"{what} params")
    assert run["counters"]["lora_linear.fused"] == run["counters"]["lora_linear.dtensor"] == 14
    assert run["counters"].get("lora_linear.refused", 0) == 0
    assert run["layouts"] == ["column-wise", "row-wise"]
    # (W, A, B) as the op saw them: each rank's shards (hidden 64, 2 kv heads of 16, MLP 96)
    assert run["op_shapes"] == [((16, 64), (4, 64), (16, 4)),   # k/v: column-wise, A whole
                                ((32, 64), (4, 64), (32, 4)),   # q
                                ((48, 64), (4, 64), (48, 4)),   # gate/up
                                ((64, 32), (4, 32), (64, 4)),   # o: row-wise, B whole
                                ((64, 48), (4, 48), (64, 4))]   # down


def test_tp_matches_one_process(runs, ref):
    """TP = 2 (lora_tp_plan, tensor_parallel): loss, every LoRA gradient and the parameters after
    two AdamW steps as one process; all 14 sites fused on DTensor operands, the op computing with
    the local shards."""
    for run in runs["pair"]:
        _check_tp(run["tp"], ref, "tp")


def test_dp_tp_matches_one_process(runs, ref):
    """DP x TP = 2 x 2 on a DeviceMesh: TP over mesh['tp'], the replicas' gradients averaged over
    mesh['dp'] (all_reduce_gradients), each replica on half the rows."""
    for run in runs["quad"]:
        _check_tp(run["dp-tp"], ref, "dp x tp")


def test_dp_tp_sequence_parallel_matches_one_process(runs, ref):
    """sequence_parallel under DP x TP = 2 x 2: norms on sequence shards of 6 and 5 tokens, the
    embedding's and the row-wise projections' outputs reduce-scattered, attention and the MLP
    gathering their input once. As test_dp_tp_matches_one_process, every site fused; the frozen
    embedding, norms and head stay frozen (only the LoRA parameters have gradients)."""
    for run in runs["quad"]:
        _check_tp(run["dp-tp-sp"], ref, "dp x tp, sequence parallel")


def test_tp_sequence_and_vocab_parallel_matches_one_process(runs, ref_tied):
    """TP = 2 with sequence_parallel (its blocks' inputs all-gathered again in backward:
    regather_in_backward) and vocab_parallel_head on a tied head (llama-1b's): logits sharded on
    the vocabulary, the loss under loss_parallel(); the head and the embedding one parameter
    sharded on the vocabulary. Then SP alone and SP regathered (eager): the tied embedding stays
    whole."""
    for run in runs["pair"]:
        r = run["tp-sp-vocab"]
        _check_tp(r, ref_tied, "tp, sequence (regathered) and vocab parallel")
        assert r["still_tied"] and r["head_placements"] == ["S(0)"]
        # no logits returned (loss_only), and the head's DTensor output is not fused with the loss
        assert r["counters"].get("linear_cross_entropy.fused", 0) == 0
        for eager in ("sp_only", "sp_regathered"):
            assert r[eager]["still_tied"]
            assert r[eager]["loss"] == pytest.approx(ref_tied["losses"][0], rel=1e-5)
            _close(r[eager]["grads"], ref_tied["grads"][0], f"tp, {eager}, tied head")


def test_regather_in_backward_keeps_only_the_sequence_shard(runs):
    """regather_in_backward, compiled: what each rank saves for backward no longer holds
    attention's and the MLP's gathered input (4 tensors of 4 rows x 11 tokens x hidden 64 in the
    two layers); it drops by at least those less their sequence shards (6 or 5 tokens), which
    are kept instead, and by at most all of them."""
    from parallel_cases import BATCH, SEQ

    gathered_shape, hidden, fp32 = (BATCH, SEQ, 64), 64, 4
    for rank, run in enumerate(runs["pair"]):
        on, off = run["tp-sp-vocab"]["saved"]["regathered"], run["tp-sp-vocab"]["saved"]["kept gathered"]
        assert off["shapes"].count(gathered_shape) == 4, off["shapes"]  # the measurement sees them
        assert on["shapes"].count(gathered_shape) == 0, on["shapes"]
        shard = (SEQ + 1) // 2 if rank == 0 else SEQ // 2
        gathered_bytes, shard_bytes = (4 * BATCH * tokens * hidden * fp32 for tokens in (SEQ, shard))
        dropped = off["bytes"] - on["bytes"]
        assert gathered_bytes - shard_bytes <= dropped <= gathered_bytes, (rank, on["bytes"], off["bytes"])


def test_tp_resize_is_refused(runs):
    """unsloth_compile.rank under TP: refused, naming the cause and the way out."""
    error = runs["pair"][0]["tp"]["set_rank_error"]
    assert "tensor parallelism" in error and "column-wise" in error and "before" in error and "tensor_parallel" in error


def test_tp_site_in_another_layout_is_refused_and_computed_right(runs, ref):
    """A plan that shards q_proj's A along its rank: no strategy of the fused op fits, so the two
    q_proj sites are refused with the placements in the reason and DTensor computes them unfused;
    loss and gradients still equal one process's."""
    r = runs["pair"][0]["tp"]["refused"]
    assert r["counters"]["lora_linear.refused"] == 2 and r["counters"]["lora_linear.fused"] == 12
    (reason,) = r["reasons"]
    assert "lora_A=S(0)" in reason and "column-wise, row-wise, replicated" in reason and "lora_tp_plan" in reason
    assert r["loss"] == pytest.approx(ref["losses"][0], rel=1e-5)
    _close(r["grads"], ref["grads"][0], "refused-site grads")


@pytest.mark.parametrize("case,group", [("pp-gpipe", "pair"), ("pp-1f1b", "pair"), ("dp-pp", "quad")])
def test_pp_matches_one_process(runs, ref, case, group):
    """PP = 2 (GPipe and 1F1B, 2 microbatches) and DP x PP = 2 x 2 (1F1B): the last stage's loss
    (mean over microbatches and replicas) and each stage's LoRA gradients as one process; each
    stage fuses its 7 sites; the stages together hold every LoRA parameter once."""
    held = []
    for run in runs[group]:
        r = run[case]
        assert r["counters"]["lora_linear.fused"] == 7 and r["counters"].get("lora_linear.refused", 0) == 0
        if r["last"]:
            _losses(r, ref, case)
        for step in range(STEPS):
            grads = _by_model_name(r["grads"][step], ref["grads"][step])
            _close(grads, {k: ref["grads"][step][k] for k in grads}, f"{case} step {step} grads")
        held += list(_by_model_name(r["grads"][0], ref["grads"][0]))
    replicas = 2 if group == "quad" else 1
    assert sorted(held) == sorted(list(ref["grads"][0]) * replicas)


@pytest.mark.parametrize("case,group", [("pp-gpipe", "pair"), ("pp-1f1b", "pair"), ("dp-pp", "quad")])
def test_pp_warm_up_compiles_before_the_schedule(runs, case, group):
    """pipeline_stage compiles each stage's forward (one Dynamo frame) and backward (AOTAutograd's
    lazy backward) on a dummy microbatch; the schedule's steps then compile nothing (the same
    guards: shapes, requires_grad, mode). The warm-up leaves no gradient and the CPU RNG state
    as it was."""
    for run in runs[group]:
        r = run[case]
        assert r["warmup"]["frames"] == 1 and r["warmup"]["triggers"] == ["DYNAMO", "LAZY_BACKWARD"], r["warmup"]
        assert r["steps_compiled"] == {"frames": 0, "triggers": []}
        assert r["warmup"]["grads_none"] and r["warmup"]["rng_kept"] and r["warmup"]["seconds"] > 0


# ----------------------------------------------------------------------------- without processes


def test_lora_tp_plan():
    from unsloth_compile.distributed.tensor_parallel import LoraColwiseParallel, LoraRowwiseParallel, lora_tp_plan

    plan = lora_tp_plan(tiny_model())
    assert len(plan) == 14
    layer = "base_model.model.model.layers.1"
    assert isinstance(plan[f"{layer}.self_attn.q_proj"], LoraColwiseParallel)
    assert isinstance(plan[f"{layer}.mlp.down_proj"], LoraRowwiseParallel)
    assert {type(s).__name__ for k, s in plan.items() if k.endswith(("o_proj", "down_proj"))} == {"LoraRowwiseParallel"}
    with pytest.raises(ValueError, match="colwise=/rowwise="):
        lora_tp_plan(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_sequence_parallel_plan():
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    from unsloth_compile.distributed.tensor_parallel import GatherSequence, LoraRowwiseParallel, lora_tp_plan

    model = tiny_model()
    inner, layer = "base_model.model.model", "base_model.model.model.layers.1"
    plan = lora_tp_plan(model, sequence_parallel=True)
    assert {k for k, s in plan.items() if isinstance(s, SequenceParallel)} == {
        f"{inner}.norm", *(f"{inner}.layers.{i}.{n}" for i in (0, 1)
                           for n in ("input_layernorm", "post_attention_layernorm"))}
    assert isinstance(plan[f"{layer}.self_attn"], GatherSequence) and isinstance(plan[f"{layer}.mlp"], GatherSequence)
    assert type(plan[f"{inner}.embed_tokens"]) is RowwiseParallel
    assert isinstance(plan["base_model.model.lm_head"], PrepareModuleInput)  # a whole head: gathered input
    assert str(plan[f"{layer}.mlp.down_proj"].output_layouts) == "(Shard(dim=1),)"
    assert isinstance(plan[f"{layer}.mlp.down_proj"], LoraRowwiseParallel)
    head = lora_tp_plan(model, vocab_parallel_head=True)["base_model.model.lm_head"]
    assert type(head) is ColwiseParallel and str(head.output_layouts) == "(Shard(dim=-1),)"
    assert not plan[f"{layer}.mlp"].regather_in_backward
    assert lora_tp_plan(model, sequence_parallel=True, regather_in_backward=True)[f"{layer}.mlp"].regather_in_backward
    with pytest.raises(ValueError, match="needs sequence_parallel=True"):
        lora_tp_plan(model, regather_in_backward=True)


def test_styles_refuse_layers_they_cannot_shard():
    from peft import LoraConfig, get_peft_model

    from unsloth_compile.distributed.tensor_parallel import LoraColwiseParallel

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"],
                                                                                   use_dora=True))
    with pytest.raises(ValueError, match="DoRA.*Leave it out of the plan"):
        LoraColwiseParallel()._apply(model.base_model.model[0], None)


def test_pipeline_split_and_refusals():
    import helpers

    from unsloth_compile.distributed.pipeline import pipeline_schedule, pipeline_stage, split_layers

    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match="not a Llama-style causal LM"):
        pipeline_stage(helpers.peft_wrap(helpers.tiny_causal_lm("gpt2")), 0, 2, "cpu", microbatch=(1, 8))
    with pytest.raises(ValueError, match="schedule='zb'"):
        pipeline_schedule(None, 2, "zb")


def test_example_runs_tensor_parallel(monkeypatch, capsys):
    """examples/train_parallel.py in this process as a 1-process gloo group (torchrun's
    environment): the DP x TP path on a 1 x 1 mesh, with its timing printout."""
    from helpers import load_example, one_process_torchrun_env

    example = load_example("train_parallel")
    one_process_torchrun_env(monkeypatch)
    assert example.main(["--device", "cpu", "--preset", "tiny", "--dp", "1", "--tp", "1", "--steps", "2",
                         "--batch", "2", "--seq", "16", "--inner", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "mesh dp=1 x tp=1" in out and "step 1: loss" in out and "tokens/s" in out and "fused 14/14" in out
