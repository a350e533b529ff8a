"""Multi-process training with the backend (unsloth_compile/distributed/), on CPU with gloo.

One launch of WORLD processes (tests/distributed_cases.py) trains a tiny PEFT Llama under DDP
over the compiled model, FSDP2 with the frozen base sharded and replicated, FSDP2 with a bf16
MixedPrecisionPolicy, and DDP with Dynamo's graph split left on. The tests compare what each
rank saw with one eager process on the concatenated batch (the same schedule: plain steps, a
step accumulated over two micro-batches with no_sync, a rank change), and the ranks with each
other. Processes are started once, with the session (tests/conftest.py: importing torch and
transformers costs seconds per process here); UNSLOTH_TEST_WORLD=4 runs the same checks on 4 processes.
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed_cases import (BENCH_ARGV, RANK_STEPS, STEPS, WORLD, _tiny_model, reference, reference_bf16,
                               reference_nf4)
from unsloth_compile.errors import UnslothCompileError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(multi_process_launches):
    try:  # started with the session (tests/conftest.py)
        return multi_process_launches["test_distributed.py"].results()
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def ref():
    return reference(WORLD)


# ----------------------------------------------------------------------------- tests


def _close(actual: dict, expected: dict, what: str) -> None:
    """Elementwise within 1e-4 of the value or of the tensor's largest element: fp32 rounding of
    a different summation order (gloo's all-reduce, the fused op) after a few steps (measured:
    4e-5 of the largest gradient after the rank change, 5e-6 in eager DDP), far below what a
    missing or doubled contribution of a rank would give."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4 * scale + 1e-8,
                                   msg=lambda m, name=name: f"{what}, {name}: {m}")


def _same_on_every_rank(runs, case: str, key: str) -> None:
    """Bitwise: the ranks hold the same values, not merely close ones."""
    def flat(tree, prefix="") -> dict:  # dicts and lists (one entry per step) of tensors
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        out = {}
        for k, v in items:
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, (dict, list)) else {f"{prefix}{k}": v})
        return out

    first = flat(runs[0][case][key])
    assert first, f"{case} {key}: nothing recorded"
    for rank, run in enumerate(runs[1:], 1):
        other = flat(run[case][key])
        assert other.keys() == first.keys()
        for name, value in other.items():
            assert torch.equal(value, first[name]), f"{case} {key}: {name} differs on rank {rank}"


def _lora_sites() -> int:
    import helpers

    return helpers.count_lora_layers(_tiny_model())  # what one process fuses (tests/passes/test_lora_pass_models.py)


def _check_steps(run: dict, ref: dict, n: int, what: str) -> None:
    assert len(run["losses"]) >= n
    torch.testing.assert_close(torch.tensor(run["losses"][:n]), torch.tensor(ref["losses"][:n]), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what} losses: {m}")
    for step in range(n):
        _close(run["grads"][step], ref["grads"][step], f"{what} step {step} grads")


def test_ddp_matches_one_process_on_the_whole_batch(runs, ref):
    """Compiled model under DDP (several reducer buckets; the accumulated step under no_sync):
    loss, every LoRA gradient, parameters and AdamW state as one eager process; every site
    fused although the buckets are small (Dynamo's DDP split is off); ranks identical."""
    for run in runs:
        ddp = run["ddp"]
        assert ddp["counters"]["lora_linear.fused"] == _lora_sites() == 14
        assert ddp["counters"].get("lora_linear.refused", 0) == 0
        _check_steps(ddp, ref, len(STEPS), "ddp")
    for key in ("params", "adam", "params_after_decisions", "adam_after_decisions"):
        _same_on_every_rank(runs, "ddp", key)


def test_ddp_buffers_are_not_rebroadcast_unless_a_module_keeps_running_statistics(runs):
    from unsloth_compile.distributed.ddp import _buffers_change_in_forward

    assert runs[0]["ddp"]["broadcast_buffers"] == [False, False]  # the Llama's buffers are constants
    assert _buffers_change_in_forward(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    assert not _buffers_change_in_forward(torch.nn.BatchNorm1d(3, track_running_stats=False))
    assert not _buffers_change_in_forward(_tiny_model())


def test_ddp_with_a_4bit_base_matches_one_process(runs):
    """compile_ddp(precision="nf4"): the LoRA bases with K a multiple of 64 stored in NF4 (the
    down projections, K = 96, stay dense and are reported), every site fused; loss, every LoRA
    gradient and the parameters after the steps as one eager process over the same 4-bit bases
    on the whole batch; the 4-bit buffers not broadcast at each step; ranks identical."""
    ref = reference_nf4(WORLD)
    for run in runs:
        r = run["ddp-nf4"]
        assert r["nf4_bases"] == 12 and r["broadcast_buffers"] is False
        assert r["counters"]["lora_linear.fused"] == _lora_sites() == 14, r["counters"]
        assert r["counters"]["nf4_linear.fused"] == 12 and r["counters"]["nf4_linear.refused"] == 2, r["counters"]
        _check_steps(r, ref, len(STEPS), "ddp-nf4")
        _close(r["params"], ref["params"], "ddp-nf4 params")
    _same_on_every_rank(runs, "ddp-nf4", "params")


def test_ddp_half_precision_gradient_compression(runs, ref):
    """gradient_compression="fp16": the losses and gradients as one process within the rounding
    of each bucket's mean, but not equal to the fp32 all-reduce's (the hook ran); the same
    gradients on every rank; the hook registered again on the rebuilt wrapper. "bf16" on a
    build without NCCL, and a bad value, are refused with the way out."""
    from unsloth_compile.distributed import compile_ddp

    for run in runs:
        r = run["ddp-fp16"]
        assert r["hooks"] == [1, 1] and r["rebuilt_compression"] == "fp16"
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"][:len(STEPS)]),
                                   rtol=1e-3, atol=1e-4)
        for step in range(len(STEPS)):
            got, exact, fp32 = r["grads"][step], ref["grads"][step], run["ddp"]["grads"][step]
            for name in exact:
                rel = float((got[name] - exact[name]).norm() / exact[name].norm())
                assert rel < 1e-2, f"step {step}, {name}: relative error {rel:.2e}"
            assert any(not torch.equal(got[n], fp32[n]) for n in exact), f"step {step}: bitwise the fp32 all-reduce"
        if torch.version.cuda is None:
            assert "gradient_compression='bf16' cannot run here" in r["bf16_error"] and "'fp16'" in r["bf16_error"]
    _same_on_every_rank(runs, "ddp-fp16", "grads")  # every rank applied the same half-precision mean
    with pytest.raises(ValueError, match="gradient_compression='int8'; one of 'none', 'bf16', 'fp16'"):
        compile_ddp(torch.nn.Linear(2, 2), gradient_compression="int8")


def test_ddp_rank_change_is_identical_on_every_rank(runs, ref):
    """DistributedRankController: a grow with a different seed on each rank gives rank 0's new
    rows everywhere (the rebuilt DDP broadcasts them); the step after it, the parameters and the
    migrated AdamW state equal one process that grew with rank 0's seed. Loss-decay decisions
    are taken on the mean loss: rank 0 alone would have grown, every rank shrinks."""
    ddp = runs[0]["ddp"]
    total = len(STEPS) + len(RANK_STEPS)
    _check_steps(ddp, ref, total, "ddp with rank change")
    assert all(g.shape[0] == 8 for n, g in ddp["grads"][-1].items() if "lora_A" in n)
    _close(ddp["params"], ref["params"], "ddp params after the rank change")
    for name, state in ref["adam"].items():
        _close(ddp["adam"][name], state, f"ddp AdamW state of {name}")
    for run in runs:
        assert run["ddp"]["loss_decay_ranks"] == [[8], [1], [3]]
        assert "replaced after a LoRA rank change" in run["ddp"]["stale_error"]


@pytest.mark.parametrize("frozen", ["shard", "replicate"])
def test_fsdp2_matches_one_process(runs, ref, frozen):
    """FSDP2 with per-block compilation, frozen base sharded or replicated: every site fused,
    loss and LoRA gradients (the accumulated step under set_requires_gradient_sync(False)) and
    parameters after the steps as one eager process; what is a DTensor shard is what the
    choice says, and CUDA graphs are left to the backend only with the base replicated;
    resizing a sharded adapter in place is refused with the way out (ShardedRankController)."""
    case = f"fsdp-{frozen}"
    initial = {n: p.detach() for n, p in _tiny_model().named_parameters() if not p.requires_grad}
    for run in runs:
        r = run[case]
        assert r["counters"]["lora_linear.fused"] == _lora_sites()
        assert r["counters"].get("lora_linear.refused", 0) == 0
        _check_steps(r, ref, len(STEPS), case)
        _close(r["params"], ref["params_before_rank"], f"{case} params")
        for name, state in ref["adam_before_rank"].items():
            _close(r["adam"][name], state, f"{case} AdamW state of {name}")
        assert r["frozen"] and all(torch.equal(v, initial[n]) for n, v in r["frozen"].items())
        assert r["kinds"]["trainable_dtensor"]
        assert set(r["kinds"]["frozen_dtensor"]) == {frozen == "shard"}
        # the LM head and loss after the blocks compiled too: the CE pass saw them (kept: the
        # model returns its logits), as on one process
        assert r["counters"].get("linear_cross_entropy.kept", 0) >= 1, r["counters"]
        # CUDA graphs: the backend's default (None) only where FSDP2 re-gathers no base weight
        assert r["block_cudagraphs"] == [None if frozen == "replicate" else False]
        assert "sharded by FSDP2" in r["set_rank_error"] and "ShardedRankController" in r["set_rank_error"]
        assert "is for DDP" in r["controller_error"] and "ShardedRankController" in r["controller_error"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fsdp2_mixed_precision_is_as_close_as_bf16_on_one_process(runs, ref):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on an fp32 model: every site
    fused (in bf16), loss and gradients no further from the fp32 result than one process
    computing in bf16 is (twice its error, plus bf16's rounding of the 2-rank mean)."""
    yard = reference_bf16(WORLD)
    r = runs[0]["fsdp-mp"]
    assert r["counters"]["lora_linear.fused"] == _lora_sites()
    loss_err = abs(r["losses"][0] - ref["losses"][0])
    assert loss_err <= 2 * abs(yard["losses"][0] - ref["losses"][0]) + 1e-2
    for name, g in ref["grads"][0].items():
        err, base = _rel_err(r["grads"][0][name], g), _rel_err(yard["grads"][0][name], g)
        assert err <= 2 * base + 1e-2, f"{name}: relative error {err:.3g} vs bf16 one-process {base:.3g}"


def test_ddp_graph_split_cuts_lora_sites_and_warns(runs):
    """What compile_ddp avoids: with Dynamo's DDP split on and small buckets, bucket boundaries
    cut LoRA linears (fewer fused, halves refused), and a warning names the cause and the fix."""
    r = runs[0]["ddp-split"]
    assert r["graphs"] > 1
    assert r["counters"]["lora_linear.fused"] < _lora_sites() and r["counters"]["lora_linear.refused"] > 0
    assert len(r["warnings"]) == 1 and "compile_ddp" in r["warnings"][0] and "optimize_ddp" in r["warnings"][0]


def test_bench_dist_on_gloo(runs, tmp_path):
    """`python -m unsloth_compile.bench dist`'s processes on gloo (tiny preset): one row per
    variant, `single` on one process, tokens/s per GPU and scaling efficiency from the slowest
    rank's step times, every site fused, the same first loss (same init, rank 0's batch); a
    variant without results is reported as failed, not dropped."""
    from unsloth_compile.bench import distributed as bench

    cfg = bench.config(BENCH_ARGV + ["--nproc", str(WORLD)])
    data = bench.collect(cfg, runs[0]["bench"]["dir"])
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["single", "fsdp-shard"]
    single, fsdp = rows["single"], rows["fsdp-shard"]
    assert single["status"] == fsdp["status"] == "ok", (single.get("error"), fsdp.get("error"))
    assert (single["world"], fsdp["world"]) == (1, WORLD)
    assert len(fsdp["step_times_s"]) == 2 and fsdp["step_time_s"] > 0
    assert fsdp["tokens_per_s_per_gpu"] == pytest.approx(16 / fsdp["step_time_s"])
    assert fsdp["tokens_per_s"] == pytest.approx(WORLD * fsdp["tokens_per_s_per_gpu"])
    assert fsdp["scaling_efficiency"] == pytest.approx(fsdp["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"])
    assert fsdp["target"] == 0.9 and fsdp["verdict"].endswith("(CPU run: not a claim)")
    assert fsdp["setup_peak_bytes"] is None and fsdp["mem_kind"] == "cpu_rss_delta_sampled"  # no CPU peak claimed
    assert single["fusion"]["fused"] == fsdp["fusion"]["fused"] == 14 and fsdp["fusion"]["refused"] == 0
    assert fsdp["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    text = bench.render_markdown(data)
    assert f"| fsdp-shard | {WORLD} | ok |" in text and "| single | 1 | ok |" in text

    saved = tmp_path / "dist.json"
    saved.write_text(json.dumps(data))
    cfg2 = dict(cfg, variants=["fsdp-shard"])  # a later run without the baseline: reuses the saved one
    rows2 = {r["variant"]: r for r in bench.collect(cfg2, runs[0]["bench"]["dir"], baseline=str(saved))["results"]}
    assert rows2["single"]["baseline_from"] == str(saved)
    assert rows2["fsdp-shard"]["scaling_efficiency"] == pytest.approx(fsdp["scaling_efficiency"])

    cfg["variants"] = ["single", "ddp", "fsdp-shard"]
    data = bench.collect(cfg, runs[0]["bench"]["dir"], error="RuntimeError: rank 1 died")
    ddp = {r["variant"]: r for r in data["results"]}["ddp"]
    assert ddp["status"] == "failed" and ddp["error"] == "RuntimeError: rank 1 died"
    assert f"| ddp | {WORLD} | failed |" in bench.render_markdown(data)


# ----------------------------------------------------------------------------- without processes


def test_example_runs_fsdp_with_accumulation_and_saves_the_adapter(monkeypatch, tmp_path, capsys):
    """examples/train_distributed.py in this process as a 1-process gloo group (torchrun's
    environment): FSDP2 with the base sharded, 2 micro-batches per step, a grow to rank 8 at step 1
    (ShardedRankController: the model rebuilt and sharded again), the adapter gathered and saved
    with PEFT, which loads it back at rank 8."""
    from peft import PeftModel

    from helpers import load_example, one_process_torchrun_env

    example = load_example("train_distributed")
    one_process_torchrun_env(monkeypatch)
    save = tmp_path / "adapter"
    assert example.main(["--device", "cpu", "--preset", "tiny", "--mode", "fsdp", "--frozen", "shard", "--steps", "2",
                         "--accumulate", "2", "--batch", "1", "--seq", "16", "--inner", "aot_eager",
                         "--grow-at", "1:8", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "step 1: loss" in out and "adapters identical on every rank: yes" in out
    import torch.distributed as dist

    assert not dist.is_initialized()
    from unsloth_compile.bench.distributed import DIST_PRESETS
    from unsloth_compile.bench.e2e import build_model

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(build_model(DIST_PRESETS["tiny"], torch.device("cpu"), torch.float32), save)
    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(trained) == 28 and any(float(p.abs().sum()) > 0 for n, p in trained.items() if "lora_B" in n)
    assert {p.shape[0] for n, p in trained.items() if "lora_A" in n} == {8}


def test_clear_errors_without_a_process_group():
    from unsloth_compile.distributed import DistributedRankController, compile_ddp, no_sync, shard_lora_model

    model = _tiny_model()
    with pytest.raises(ValueError, match="frozen='both'.*'replicate'.*'shard'"):
        shard_lora_model(model, frozen="both")
    with pytest.raises(UnslothCompileError, match="init_process_group"):
        shard_lora_model(model)
    with pytest.raises(UnslothCompileError, match="init_process_group"):
        compile_ddp(model)
    with pytest.raises(UnslothCompileError, match="expected a DDP or fully_shard model"):
        with no_sync(model):
            pass
    with pytest.raises(UnslothCompileError, match="expected the DDP wrapper"):
        DistributedRankController(model)


def test_find_blocks():
    from unsloth_compile.distributed import find_blocks

    model = _tiny_model()
    layers = list(model.base_model.model.model.layers)
    assert find_blocks(model) == layers  # LlamaDecoderLayer is in transformers' _no_split_modules
    assert find_blocks(model, ["base_model.model.model.layers.1"]) == layers[1:]
    with pytest.raises(ValueError, match="no module named 'layers.9'"):
        find_blocks(model, ["layers.9"])
    with pytest.raises(ValueError, match="pass blocks="):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


# a recompile limit below Dynamo's default of 8, and more blocks than it: the same failure with
# fewer compiles
DEEP_RECOMPILE_LIMIT, DEEP_BLOCKS = 3, 4


def _deep_block_compile_graphs(disable_cache: bool) -> tuple[int, int]:
    """(graphs the backend compiled, LoRA sites it fused) for one step of a PEFT Llama with more
    blocks than the recompile limit, its blocks compiled one by one, with the KV cache on as
    transformers configs it."""
    import transformers as tf

    import helpers
    from unsloth_compile.distributed.fsdp import _disable_kv_cache, compile_blocks, find_blocks
    from unsloth_compile.report import collect_reports

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=helpers.VOCAB, num_hidden_layers=DEEP_BLOCKS, use_cache=True)
    model = helpers.peft_wrap(tf.LlamaForCausalLM(cfg))
    if disable_cache:
        _disable_kv_cache(model)
        assert model.config.use_cache is False
    compile_blocks(find_blocks(model), {"inner": "aot_eager", "summary": False})
    with collect_reports() as report, torch._dynamo.config.patch(recompile_limit=DEEP_RECOMPILE_LIMIT):
        model(**helpers.batch_for("llama", batch=2, seq=7, seed=0)).loss.backward()
    assert not report.refused
    return report.graphs, len(report.fused)


def test_per_block_compile_of_a_deep_model_compiles_once_with_the_kv_cache_off():
    """More blocks than Dynamo's recompile limit: with transformers' KV cache on, each block
    recompiles on the cache's per-layer state and the blocks past the limit run eager, unfused;
    shard_lora_model turns the cache off first. The blocks then share two graphs (the first
    block's input needs no gradient, the others' do)."""
    graphs, fused = _deep_block_compile_graphs(disable_cache=True)
    assert graphs <= 2 and fused == 7 * graphs
    graphs_with_cache, _ = _deep_block_compile_graphs(disable_cache=False)
    assert graphs_with_cache >= DEEP_RECOMPILE_LIMIT  # what turning the cache off avoids: a graph per block


def test_block_cudagraphs_default_yields_to_the_callers_choice():
    from unsloth_compile.distributed.fsdp import block_cudagraphs

    assert block_cudagraphs(None, False) == {"cudagraphs": False}
    assert block_cudagraphs({"inner": "aot_eager"}, None) == {"inner": "aot_eager"}
    assert block_cudagraphs({"cudagraphs": True}, False) == {"cudagraphs": True}
    assert block_cudagraphs({"cudagraphs": False}, None) == {"cudagraphs": False}


def test_the_module_around_the_blocks_is_found_for_the_head_compile():
    from torch import nn

    from unsloth_compile.distributed.fsdp import _stack_and_owner, find_blocks

    model = _tiny_model()
    assert _stack_and_owner(model, find_blocks(model)) == ("base_model.model.model", "base_model.model")
    layers = model.base_model.model.model.layers
    assert _stack_and_owner(model, [layers[0], model.base_model.model.lm_head]) is None  # two containers
    bare = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert _stack_and_owner(bare, list(bare)) is None  # the blocks' container is the model: nothing around it


def test_fsdp_graphs_replay_only_with_the_base_replicated_and_resharded_after_forward():
    from unsloth_compile.distributed import fsdp_graphs_replay

    assert fsdp_graphs_replay("replicate", None) and fsdp_graphs_replay("replicate", True)
    assert not fsdp_graphs_replay("replicate", False)  # measured: re-recorded at every step
    assert not fsdp_graphs_replay("shard", None) and not fsdp_graphs_replay("shard", True)


@pytest.mark.parametrize("frozen", ["replicate", "shard"])
def test_fsdp2_rank_change_rebuilds_the_model_identically_on_every_rank(runs, ref, frozen):
    """ShardedRankController under FSDP2: the steps before the change as one process, then a grow
    to rank 8 (new rows drawn from a different seed on each rank: rank 0's kept), one more step;
    loss, gradients, parameters and AdamW state after it as one eager process that grew with
    rank 0's seed; the ranks bitwise identical; every site fused again in the rebuilt model; the
    model and optimizer are new objects, sharded again, and the frozen base is unchanged."""
    case = f"fsdp-rank-{frozen}"
    n = len(STEPS) + len(RANK_STEPS)
    for run in runs:
        r = run[case]
        _check_steps(r, ref, n, case)
        _close(r["params"], ref["params"], f"{case} params after the rank change")
        for name, state in ref["adam"].items():
            _close(r["adam"][name], state, f"{case} AdamW state of {name}")
        assert r["ranks"] == [8] and r["new_objects"] == [True, True] and r["sharded_again"]
        # the rebuilt blocks compile anew at rank 8 (a graph per distinct block graph): every
        # site fused, none refused
        assert r["fused_after"] >= _lora_sites() and r["refused_after"] == 0 and r["frozen_unchanged"]
    _same_on_every_rank(runs, case, "params")
    _same_on_every_rank(runs, case, "adam")
