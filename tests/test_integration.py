"""How users meet the backend: unsloth_compile.compile (in place, options validated first), the
Trainer callback, the one-line summary, and torch.export of a fused graph."""

import copy
import inspect
import logging
import math
import warnings

import pytest
import torch
from torch import nn

import unsloth_compile
from unsloth_compile.config import Config
from unsloth_compile.report import collect_reports
from helpers import VOCAB, HandLoRA, TwoLoRAsWithGraphBreak, batch_for, count_reference_lora_calls, peft_wrap, tiny_causal_lm

FAST = {"inner": "aot_eager"}


pytestmark = pytest.mark.usefixtures("fresh_summary")


class OneLoRA(nn.Module):
    """A LoRA layer below the root (compiling a LoRA layer itself as the root module makes the
    pass report a spurious graph fragment next to the fused site)."""

    def __init__(self):
        super().__init__()
        self.layer = HandLoRA()

    def forward(self, x):
        return self.layer(x)


class NoLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)


def _summary_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "unsloth_compile.summary"]


# ----------------------------------------------------------------------------- compile()


@pytest.mark.parametrize("call, message", [
    (lambda m: unsloth_compile.compile(m, options={"fuse_lroa": True}),
     r"unknown option\(s\) 'fuse_lroa'; valid options are inner, fuse_lora"),
    (lambda m: unsloth_compile.compile(m, inner="tvm"), r"inner='tvm' is not valid; choose one of 'inductor'"),
    (lambda m: unsloth_compile.compile(m, mode="fast"), r"mode='fast' is not valid"),
    (lambda m: unsloth_compile.compile(m, {"inner": "eager"}, inner="eager"), r"'inner' given both"),
])
def test_compile_rejects_bad_options_before_tracing(call, message):
    """UnslothCompileError (a ValueError) at the call, not BackendCompilerFailed at the first forward."""
    model = OneLoRA()
    with pytest.raises(ValueError, match=message) as raised:
        call(model)
    assert type(raised.value) is unsloth_compile.UnslothCompileError
    assert model._compiled_call_impl is None  # nothing was compiled


def test_compile_message_is_the_configs():
    with pytest.raises(ValueError) as from_config:
        Config.from_options({"kernels": "cuda"})
    with pytest.raises(ValueError) as from_compile:
        unsloth_compile.compile(OneLoRA(), kernels="cuda")
    assert str(from_compile.value) == str(from_config.value)


def test_compile_in_place_fuses_and_matches_eager():
    eager = peft_wrap(tiny_causal_lm("llama"))
    model = copy.deepcopy(eager)
    signature = inspect.signature(model.forward)
    # mode and options together: torch.compile refuses both, compile() forwards both
    assert unsloth_compile.compile(model, FAST, mode="max-autotune-no-cudagraphs") is model
    assert type(model) is type(eager) and inspect.signature(model.forward) == signature
    batch = batch_for("llama")
    with collect_reports() as report:
        loss = model(**batch).loss
    loss.backward()
    loss_e = eager(**batch).loss
    loss_e.backward()
    assert report.counters["lora_linear.fused"] == 14
    torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=1e-5)
    for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compile_unwraps_torch_compile_wrapper():
    model = OneLoRA()
    wrapped = torch.compile(model, backend="unsloth", options=FAST)
    assert unsloth_compile.compile(wrapped, FAST) is model
    with collect_reports() as report:
        model(torch.randn(3, 8))
    assert report.counters["lora_linear.fused"] == 1


# ----------------------------------------------------------------------------- Trainer


def _train(model, tmp_path, callbacks=(), steps=5):
    import transformers as tf

    ids = torch.randint(2, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "labels": ids}] * 8  # one sequence: the loss must go down
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                                learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                                save_strategy="no", disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.smoke
def test_trainer_callback_compiles_in_place_and_runs_fused_ops(tmp_path, monkeypatch):
    from unsloth_compile import UnslothCompileCallback

    model = peft_wrap(tiny_causal_lm("llama"))
    eager = copy.deepcopy(model)
    losses_eager = _train(eager, tmp_path / "eager")
    calls = count_reference_lora_calls(monkeypatch)
    with collect_reports() as report:
        losses = _train(model, tmp_path / "compiled", callbacks=[UnslothCompileCallback(FAST)])
    assert report.counters["lora_linear.fused"] == 14 and report.counters["lora_linear.refused"] == 0
    assert calls == {"forward": 5 * 14, "backward": 5 * 14}  # 14 fused sites, 5 steps
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    torch.testing.assert_close(losses, losses_eager, rtol=1e-4, atol=1e-4)


def test_trainer_callback_validates_options_when_built():
    from unsloth_compile import UnslothCompileCallback

    with pytest.raises(ValueError, match=r"unknown option\(s\) 'fuse_lroa'"):
        UnslothCompileCallback({"fuse_lroa": True})


# ----------------------------------------------------------------------------- summary


def test_summary_line_by_default_with_counts_once_per_model(caplog):
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj", "v_proj", "embed_tokens"])
    compiled = torch.compile(model, backend="unsloth", options=FAST)
    with caplog.at_level(logging.INFO, logger="unsloth_compile.summary"):
        for seq in (12, 13, 14):  # a recompile for new shapes adds no site: no new line
            compiled(**batch_for("llama", seq=seq)).loss.backward()
    assert _summary_lines(caplog) == [
        "unsloth_compile: fused 4/5 LoRA linears (1 graph); main reason (1 of 1 refused): "
        "LoRA on Embedding layers is not fused"]
    assert caplog.records[-1].levelno == logging.INFO


def test_summary_running_totals_across_graph_breaks_and_models(caplog):
    first, second = TwoLoRAsWithGraphBreak(), TwoLoRAsWithGraphBreak()
    with caplog.at_level(logging.INFO, logger="unsloth_compile.summary"):
        torch.compile(first, backend="unsloth", options=FAST)(torch.randn(3, 8))
        torch.compile(first, backend="unsloth", options=FAST)(torch.randn(3, 8))  # cached: no compile
        torch._dynamo.reset()
        torch.compile(first, backend="unsloth", options=FAST)(torch.randn(3, 8))  # same sites: silent
        torch._dynamo.reset()
        # another model of the same structure: its own totals, not 4/4
        torch.compile(second, backend="unsloth", options=FAST)(torch.randn(3, 8))
        # unsloth_compile.compile: a ledger per model
        unsloth_compile.compile(OneLoRA(), FAST)(torch.randn(3, 8))
    assert _summary_lines(caplog) == [
        "unsloth_compile: fused 1/1 LoRA linears (1 graph)",
        "unsloth_compile: fused 2/2 LoRA linears (2 graphs)",
        "unsloth_compile: fused 1/1 LoRA linears (1 graph)",
        "unsloth_compile: fused 2/2 LoRA linears (2 graphs)",
        "unsloth_compile: fused 1/1 LoRA linears (1 graph)",
    ]


def test_summary_warns_once_for_a_model_without_lora():
    model = unsloth_compile.compile(NoLoRA(), FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count what we emit, not what Python's filter lets through
        for rows in (2, 3, 5):
            model(torch.randn(rows, 4))
    ours = [w for w in caught if "unsloth_compile" in str(w.message)]
    assert len(ours) == 1 and "no LoRA linear found" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the line that called the model


def test_summary_is_about_lora_when_other_passes_report_sites():
    """A transformers model without adapters: the attention pass reports its SDPA calls, the
    summary still warns that no LoRA linear was found."""
    with pytest.warns(UserWarning, match="no LoRA linear found"):
        unsloth_compile.compile(tiny_causal_lm("llama"), FAST)(**batch_for("llama"))


def test_summary_warns_with_the_main_reason_when_nothing_fused():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["embed_tokens"])
    with pytest.warns(UserWarning, match=r"fused 0/1 LoRA linears \(1 graph\); main reason \(1 of 1 refused\): "
                                         r"LoRA on Embedding layers is not fused\. unsloth_compile.explain"):
        unsloth_compile.compile(model, FAST)(**batch_for("llama"))


def test_summary_option_false_silences_it(caplog):
    with caplog.at_level(logging.INFO, logger="unsloth_compile"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unsloth_compile.compile(NoLoRA(), FAST, summary=False)(torch.randn(2, 4))
        unsloth_compile.compile(OneLoRA(), FAST, summary=False)(torch.randn(2, 8))
    assert _summary_lines(caplog) == []
    assert not [w for w in caught if "unsloth_compile" in str(w.message)]
    assert any("unsloth_compile report" in r.getMessage() for r in caplog.records)  # option report still on


# ----------------------------------------------------------------------------- torch.export


def test_export_of_the_fused_graph(tmp_path):
    """docs/export.md's snippet: a Dynamo graph after fuse_lora_linears exports, saves and loads,
    with the op as one node."""
    from peft import LoraConfig, get_peft_model

    from unsloth_compile import Report, fuse_lora_linears

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = get_peft_model(MLP(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    x = torch.randn(8, 32)
    graphs = []

    def capture(gm, example_inputs):
        fuse_lora_linears(gm, Config(), Report())
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(x)
    gm, example_inputs = graphs[0]
    program = torch.export.export(gm, tuple(example_inputs))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.unsloth.lora_linear.default) == 2
    torch.export.save(program, tmp_path / "fused.pt2")
    (out,) = torch.export.load(tmp_path / "fused.pt2").module()(*example_inputs)
    torch.testing.assert_close(out, model(x))
