"""Gradient checkpointing: Dynamo puts each checkpointed region (transformers'
`gradient_checkpointing_enable()`, `use_reentrant` True, False or unset) into a
`tag_activation_checkpoint` higher-order op whose body is a GraphModule; the LoRA pass fuses
inside that body (passes/subgraphs.py), and AOTAutograd recomputes the fused op in backward.
A Python side effect inside the region (the `kernels` package's wrapper of transformers'
attention forwards) would make Dynamo run the region eagerly: unsloth_compile/checkpoint_tracing.py."""

import copy
import math
import operator
import re
import warnings

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.utils.checkpoint import checkpoint

import unsloth_compile
from helpers import (batch_for, count_lora_layers, dynamo_graphs, kernelized_checkpointed_model, peft_wrap,
                     tiny_causal_lm, train_and_compare)
from unsloth_compile import Config, Report, fuse_lora_linears
from unsloth_compile.report import collect_reports
from unsloth_compile.passes import subgraphs
from unsloth_compile.passes.pipeline import run_passes

LORA_OP = torch.ops.unsloth.lora_linear.default
CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint
PROJECTION_PATH = re.compile(r"(^|\.)layers\.[01]\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def checkpointed_llama(reentrant: bool | None, dropout: float, layers: int = 2, **lora_kwargs) -> nn.Module:
    """reentrant None: transformers' default (no kwargs)."""
    model = tiny_causal_lm("llama", layers=layers)
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = peft_wrap(model, lora_dropout=dropout, **lora_kwargs)
    model.train()  # checkpointing is only active in training mode
    return model


def capture(model, batch) -> list[GraphModule]:
    return dynamo_graphs(model, **batch)


@pytest.mark.smoke
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("reentrant", [False, True])  # transformers' default (None): the Trainer test
def test_checkpointed_peft_llama_fuses_every_site_and_trains_like_eager(reentrant, dropout):
    model = checkpointed_llama(reentrant, dropout, layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=3)
    report = result.report
    said = [str(w.message) for w in caught if "unsloth_compile" in str(w.message)]
    assert not said, said  # neither "no LoRA linear found" nor "ran outside every compiled graph"
    assert report.counters["lora_linear.fused"] == count_lora_layers(model) == 7, str(report)
    assert report.counters["lora_linear.refused"] == 0, str(report)
    # Reported at the LoRA layer inside the body, not at the checkpointed decoder layer.
    for site in report.fused:
        assert PROJECTION_PATH.search(site.module), site.module
    assert len({s.module for s in report.fused}) == 7
    if dropout:
        assert all(s.details["dropout_as_mask"] and "dropout as mask" in s.reason for s in report.fused)


def test_explain_reports_sites_inside_checkpointed_layers():
    """Every site inside the checkpointed layers is found and reported at its LoRA layer, none as
    an unrecognised LoRA form of the decoder layer."""
    report = unsloth_compile.explain(checkpointed_llama(True, 0.0, layers=1), **batch_for("llama"))
    assert report.counters["lora_linear.fused"] == 7 and not report.refused, str(report)
    assert "LlamaDecoderLayer" not in str(report)


def _record_aot_graphs(forward_graphs, backward_graphs, dynamo_graphs):
    """A backend: our passes, then aot_eager with compilers that keep AOT's forward and
    backward graphs (min-cut partitioner, as aot_eager and Inductor use)."""
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._dynamo.backends.registry import lookup_backend

    def keep(store):
        def compiler(gm, example_inputs):
            store.append(gm)
            return boxed_nop(gm, example_inputs)
        return compiler

    def backend(gm, example_inputs):
        gm, _ = run_passes(gm, example_inputs, Config())
        dynamo_graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs, fw_compiler=keep(forward_graphs),
                                           bw_compiler=keep(backward_graphs))

    return backend


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_op_sits_in_the_checkpoint_body_and_is_recomputed_in_backward(reentrant):
    model = checkpointed_llama(reentrant, 0.1, layers=1)
    forward_graphs, backward_graphs, dynamo_graphs = [], [], []
    compiled = torch.compile(model, backend=_record_aot_graphs(forward_graphs, backward_graphs, dynamo_graphs))
    compiled(**batch_for("llama")).loss.backward()

    (gm,) = [g for g in dynamo_graphs if any(n.target is CHECKPOINT_HOP for n in g.graph.nodes)]
    hops = [n for n in gm.graph.nodes if n.target is CHECKPOINT_HOP]
    assert len(hops) == 1 and all(h.kwargs.get("use_reentrant") is reentrant for h in hops)
    assert not any(n.target is LORA_OP for n in gm.graph.nodes)  # all of them inside the bodies
    for hop in hops:
        body = subgraphs.rewritten_body(gm, hop)
        ops = [n for n in body.graph.nodes if n.target is LORA_OP]
        assert len(ops) == 7 and body.code.count("torch.ops.unsloth.lora_linear.default") == 7
        assert all("example_value" in n.meta for n in ops)
        masks = [op.args[13].args[0] for op in ops]  # getitem(native_dropout(x), 1)
        assert all(m.target is torch.native_dropout for m in masks)
        assert not any(n.target is torch.nn.functional.dropout for n in body.graph.nodes)

    (fw,) = [g for g in forward_graphs if LORA_OP in {n.target for n in g.graph.nodes}]
    (bw,) = [g for g in backward_graphs if LORA_OP in {n.target for n in g.graph.nodes}]
    assert sum(n.target is LORA_OP for n in fw.graph.nodes) == 7
    # Backward runs the fused forward again (the checkpoint's recomputation) ...
    recomputed = [n for n in bw.graph.nodes if n.target is LORA_OP]
    assert len(recomputed) == 7
    assert sum(n.target is torch.ops.unsloth.lora_linear_backward.default for n in bw.graph.nodes) == 7
    # ... with each dropout mask redrawn from the RNG state the forward saved.
    replay = torch._prims.rng_prims.run_with_rng_state
    for op in recomputed:
        mask = op.args[13]
        assert mask.target is operator.getitem and mask.args[0].target is replay, mask.format_node()
        assert mask.args[0].args[1] is torch.ops.aten.native_dropout.default


def test_trainable_base_weight_inside_a_checkpoint_body_is_refused():
    """The frozen-base check reads requires_grad from the body's placeholders."""
    model = checkpointed_llama(False, 0.0, layers=1)
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    report = Report()
    for gm in capture(model, batch_for("llama")):
        fuse_lora_linears(gm, Config(), report)
    assert report.counters["lora_linear.fused"] == 6
    (refused,) = report.refused
    assert refused.module.endswith("layers.0.self_attn.q_proj") and "trainable base weight" in refused.reason


class LoRA(nn.Module):
    def __init__(self, k, n, r, dropout=0.0):
        super().__init__()
        self.base = nn.Linear(k, n)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(k, r, bias=False)
        self.lora_B = nn.Linear(r, n, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * 0.5


class NestedCheckpoints(nn.Module):
    """A checkpoint inside a checkpoint: a body inside a body."""

    def __init__(self, dropout):
        super().__init__()
        self.outer = LoRA(8, 8, 2, dropout)
        self.inner = LoRA(8, 8, 2, dropout)

    def block(self, x):
        return checkpoint(self.inner, torch.relu(self.outer(x)), use_reentrant=False)

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def _rows(step):
    return (torch.randn(3, 8, generator=torch.Generator().manual_seed(step)),)


def test_nested_checkpoints_fuse_at_every_depth():
    (gm,) = capture_args(NestedCheckpoints(0.0), _rows(0))
    modules = subgraphs.graph_modules(gm)
    assert len(modules) == 3 and modules[0] is gm  # root first, then the bodies, depth first
    result = train_and_compare(NestedCheckpoints(0.3), _rows, steps=2)
    assert result.report.counters["lora_linear.fused"] == 2
    assert {s.module for s in result.report.fused} == {"outer", "inner"}


def capture_args(model, args) -> list[GraphModule]:
    return dynamo_graphs(model, *args)


class BranchedLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LoRA(8, 8, 2)
        self.b = LoRA(8, 8, 2)

    def forward(self, x):
        return torch.cond(x.sum() > 0, self.a, self.b, (x,))


def test_lora_inside_a_body_the_pass_leaves_alone_is_reported_by_name():
    (gm,) = capture_args(BranchedLoRA(), _rows(0))
    report = Report()
    fuse_lora_linears(gm, Config(), report)
    assert report.counters["lora_linear.fused"] == 0
    (site,) = report.refused
    assert "torch.ops.higher_order.cond" in site.reason and "does not rewrite" in site.reason


def test_a_body_used_other_than_as_a_rewritable_hop_body_is_left_alone():
    plain = _root_calling_a_body(body_escapes=False)
    assert subgraphs.graph_modules(plain) == [plain, plain.body]
    escaping = _root_calling_a_body(body_escapes=True)
    assert subgraphs.graph_modules(escaping) == [escaping]


def _root_calling_a_body(body_escapes: bool) -> GraphModule:
    """wrap(body, x)[0], and the body module itself among the outputs when it escapes."""
    body_graph = Graph()
    body_graph.output((body_graph.placeholder("x"),))
    graph = Graph()
    x = graph.placeholder("x")
    getter = graph.get_attr("body")
    called = graph.call_function(torch.ops.higher_order.wrap, (getter, x))
    out = graph.call_function(operator.getitem, (called, 0))
    graph.output((out, getter) if body_escapes else (out,))
    return GraphModule({"body": GraphModule(nn.Module(), body_graph)}, graph)


def test_real_inductor_trains_a_checkpointed_model_with_dropout_like_eager():
    """Inductor on CPU (one layer, three projections: about 15 s). fallback_random: Inductor's
    own RNG would draw other dropout masks than eager; with torch's RNG, AOT's replay of the
    saved RNG state makes the recomputed masks those of the forward."""
    model = checkpointed_llama(False, 0.1, layers=1, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch._inductor.config.patch(fallback_random=True, fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=2,
                                   options={}, rtol=1e-4, atol=1e-4)
    assert result.report.counters["lora_linear.fused"] == 3
    assert all(s.details["dropout_as_mask"] for s in result.report.fused)


# ----------------------------------------------------------------------------- side effects in the region


def test_a_side_effect_in_the_checkpointed_region_does_not_stop_fusion():
    result = train_and_compare(kernelized_checkpointed_model(), _rows, steps=2)
    assert result.report.counters["lora_linear.fused"] == 2, str(result.report)


def test_the_kernels_wrapper_on_transformers_attention_is_traced_in_the_checkpoint_body():
    """transformers with `kernels` installed wraps LlamaAttention.forward; every projection of the
    checkpointed layers still fuses (explain: one forward)."""
    pytest.importorskip("kernels")
    from transformers.models.llama import modeling_llama

    if not hasattr(modeling_llama.LlamaAttention.forward, "__wrapped__"):
        pytest.skip("this transformers does not wrap LlamaAttention.forward with the kernels package")
    report = unsloth_compile.explain(checkpointed_llama(False, 0.0, layers=1), **batch_for("llama"))
    assert report.counters["lora_linear.fused"] == 7 and not report.refused, str(report)


def test_dynamo_settings_are_listed():
    from unsloth_compile import checkpoint_tracing

    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    assert any("skip_fwd_side_effects_in_bwd_under_checkpoint" in s for s in checkpoint_tracing.settings())


def test_transformers_warning_once_does_not_break_the_graph():
    import logging

    import transformers  # noqa: F401  loads transformers.utils.logging, which patches Logger.warning_once
    from unsloth_compile import checkpoint_tracing

    checkpoint_tracing.ignore_transformers_warning_once()
    logger = logging.getLogger("unsloth_compile.test")

    def fn(x):
        logger.warning_once("once")
        return x + 1

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(2))
    assert len(graphs) == 1


@pytest.mark.smoke
@pytest.mark.parametrize("reentrant", [None])  # transformers' default; both explicit forms: the test above
def test_trainer_with_gradient_checkpointing_and_the_callback_fuses_every_site(tmp_path, reentrant):
    """TrainingArguments(gradient_checkpointing=True): the Trainer enables checkpointing before
    on_train_begin, where the callback compiles; losses as the eager Trainer's."""
    import transformers as tf

    from unsloth_compile import UnslothCompileCallback

    def train(model, out, callbacks=()):
        ids = torch.randint(2, 96, (12,), generator=torch.Generator().manual_seed(0))
        kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
        args = tf.TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                                    learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                    save_strategy="no", disable_tqdm=True, gradient_checkpointing=True, **kwargs)
        trainer = tf.Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 6,
                             callbacks=list(callbacks))
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    model = peft_wrap(tiny_causal_lm("llama", layers=1))
    eager = copy.deepcopy(model)
    losses_eager = train(eager, tmp_path / "eager")
    with collect_reports() as report:
        losses = train(model, tmp_path / "compiled", callbacks=[UnslothCompileCallback({"inner": "aot_eager"})])
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # the Trainer turned it on
    assert report.counters["lora_linear.fused"] == count_lora_layers(model) == 7, str(report)
    assert report.counters["lora_linear.refused"] == 0, str(report)
    assert all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(losses, losses_eager, rtol=1e-4, atol=1e-4)


def test_dynamo_config_still_logs_with_the_ignored_logging_function():
    """torch 2.11 logs its config with sorted() over each set: the ignored logging functions must
    stay orderable (at most one function, which we add), or every compile logs a traceback."""
    import transformers  # noqa: F401  registers Logger.warning_once
    from unsloth_compile import checkpoint_tracing

    checkpoint_tracing.ignore_transformers_warning_once()
    ignored = checkpoint_tracing.ignored_logging_functions()
    ours = [f for f in ignored if getattr(f, "__name__", "") in ("warning_once", "info_once")]
    assert len(ours) == 1
    sorted(ours)  # what torch 2.11's config logging does


def test_warning_once_is_left_out_where_dynamo_cannot_log_it(monkeypatch, caplog):
    """torch 2.11 writes the ignored logging functions into its compile metrics as JSON, which
    transformers' lru_cache-wrapped warning_once is not (a traceback at every compile): there the
    function is taken out again and the reason logged."""
    import logging

    import transformers  # noqa: F401  registers Logger.warning_once
    from unsloth_compile import checkpoint_tracing

    ignored = checkpoint_tracing.ignored_logging_functions()
    function = logging.Logger.warning_once
    ignored.discard(function)
    monkeypatch.setattr(checkpoint_tracing, "_refused", set())
    monkeypatch.setattr(checkpoint_tracing, "_applied", {})

    def fails_on_functions():
        if function in ignored:
            raise TypeError("Object of type _lru_cache_wrapper is not JSON serializable")
        return "{}"

    monkeypatch.setattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", fails_on_functions)
    try:
        with caplog.at_level(logging.INFO, logger="unsloth_compile"):
            checkpoint_tracing.ignore_transformers_warning_once()
        assert function not in ignored and checkpoint_tracing.settings() == {}
        assert "warning_once is not added" in caplog.text
        fails_on_functions()  # the config logs again
    finally:
        monkeypatch.undo()
        checkpoint_tracing.ignore_transformers_warning_once()  # as the rest of the suite expects it
    assert function in ignored


def _compile_in_place(model, options: dict):
    return unsloth_compile.compile(model, summary=False, report=False, **options)


def test_the_input_grads_hook_stays_out_of_the_graph_under_non_reentrant_checkpointing():
    """transformers' checkpointing adds `make_inputs_require_grads` on the embeddings; compiled,
    its requires_grad_() would cut the graph at the embeddings (the causal mask and the loss then
    sit in other graphs than the attention and the head). Through unsloth_compile.compile the
    checkpointed PEFT Llama is one graph, with the causal attention rewritten inside the
    checkpoint bodies and the cross-entropy fused; training equals eager; outside a compiled graph
    the hook still runs and transformers can still remove it."""
    from unsloth_compile.input_grads_hook import input_grad_hooks
    from unsloth_compile.training_outputs import loss_only

    model = checkpointed_llama(False, 0.0)
    loss_only(model)
    assert input_grad_hooks(model), "transformers' checkpointing no longer adds the hook: the test proves nothing"
    with collect_reports() as hooks_report:
        result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=2, compile_fn=_compile_in_place,
                                   options={"inner": "aot_eager", "fuse_cross_entropy": True})
    report = result.report
    assert report.graphs == 1, str(report)
    assert report.counters["linear_cross_entropy.fused"] == 1, str(report)
    assert report.counters["attention.mask_causal"] == 2, str(report)  # one per layer, inside the bodies
    assert report.counters["lora_linear.fused"] == count_lora_layers(model), str(report)
    decisions = [s.decision for s in hooks_report.sites if s.pattern == "input_grads_hook"]
    assert decisions and set(decisions) == {"rewritten"}, decisions  # transformers and PEFT may each add one
    compiled = result.compiled
    embeddings = compiled.get_input_embeddings()
    assert embeddings(torch.tensor([[1, 2]])).requires_grad  # eager: the hook runs
    hooks = len(input_grad_hooks(compiled))
    compiled.base_model.model.disable_input_require_grads()  # its handle still finds the hook it registered
    assert len(input_grad_hooks(compiled)) == hooks - 1


def test_the_input_grads_hook_is_kept_under_reentrant_checkpointing_with_the_reason():
    from unsloth_compile.input_grads_hook import keep_out_of_graph

    model = checkpointed_llama(True, 0.0, layers=1)
    report = keep_out_of_graph(model)
    sites = [s for s in report.sites if s.pattern == "input_grads_hook"]
    assert sites, "transformers' checkpointing no longer adds the hook: the test proves nothing"
    for site in sites:
        assert site.decision == "kept" and "reentrant" in site.reason and "use_reentrant" in site.reason
    result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=2, compile_fn=_compile_in_place)
    assert result.report.counters["lora_linear.fused"] == count_lora_layers(model)
