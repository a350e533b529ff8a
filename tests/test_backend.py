"""The backend's contract: registration, options, inner compilers, report and logging."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import unsloth_compile
from unsloth_compile.config import Config, Inner
from helpers import batch_for, peft_wrap, tiny_causal_lm, train_and_compare


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("unsloth") == "unsloth_compile.backend:unsloth"


def test_backend_by_name_without_importing_the_package():
    """A fresh interpreter that never imports unsloth_compile: Dynamo finds the entry point."""
    code = textwrap.dedent("""
        import sys, torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = torch.nn.Linear(8, 8).requires_grad_(False)
                self.A = torch.nn.Linear(8, 2, bias=False); self.B = torch.nn.Linear(2, 8, bias=False)
            def forward(self, x):
                return self.base(x) + self.B(self.A(x)) * 0.5
        m = M()
        assert "unsloth_compile" not in sys.modules
        y = torch.compile(m, backend="unsloth", options={"inner": "eager"})(torch.randn(3, 8))
        torch.testing.assert_close(y, m(torch.randn(3, 8)) * 0 + y)
        assert "unsloth_compile" in sys.modules
        print("fused:", torch.ops.unsloth.lora_linear.default is not None)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused: True" in out.stdout


def test_unknown_option_names_the_valid_ones():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception, match=r"unknown option\(s\) 'fuse_lroa'.*valid options are inner, fuse_lora"):
        torch.compile(model, backend="unsloth", options={"fuse_lroa": True})(torch.randn(2, 4))


@pytest.mark.parametrize("options, message", [
    ({"inner": "tvm"}, r"inner='tvm' is not valid; choose one of 'inductor', 'aot_eager', 'eager'"),
    ({"kernels": "cuda"}, r"kernels='cuda' is not valid"),
    ({"fuse_lora": "yes"}, r"fuse_lora='yes' must be True or False"),
])
def test_bad_values_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options(options)


def test_config_is_frozen_hashable_and_parses_mode():
    cfg = Config.from_options({"inner": "aot_eager"}, mode="max-autotune")
    assert cfg.inner is Inner.AOT_EAGER and cfg.mode == "max-autotune"
    assert hash(cfg) == hash(Config.from_options({"inner": "aot_eager"}, mode="max-autotune"))
    with pytest.raises(Exception):
        cfg.inner = Inner.EAGER
    with pytest.raises(ValueError, match="mode='fast'"):
        Config.from_options({}, mode="fast")


def test_mode_is_forwarded_by_torch_compile():
    seen = {}
    real = unsloth_compile.backend._inner_compile

    def spy(gm, example_inputs, cfg, report=None):
        seen["mode"] = cfg.mode
        return gm.forward

    unsloth_compile.backend._inner_compile = spy
    try:
        torch.compile(torch.nn.Linear(4, 4), backend="unsloth", mode="max-autotune-no-cudagraphs")(torch.randn(2, 4))
    finally:
        unsloth_compile.backend._inner_compile = real
    assert seen["mode"] == "max-autotune-no-cudagraphs"


def test_fuse_lora_false_leaves_graph_alone():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"])
    result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=1,
                               options={"inner": "aot_eager", "fuse_lora": False})
    # the cross-entropy site is reported as kept (the model returns its logits): nothing changed
    assert not [s for s in result.report.sites if s.pattern == "lora_linear"] and not result.report.fused
    assert result.report.graphs == 1


def test_real_inductor_on_cpu_matches_eager():
    """The default inner compiler: Inductor compiles the rest of the graph around our op."""
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model.base_model.model.config.num_hidden_layers = 1
    model.base_model.model.model.layers = model.base_model.model.model.layers[:1]
    result = train_and_compare(model, lambda s: batch_for("llama", seed=s), steps=2,
                               options={}, rtol=1e-4, atol=1e-4)
    assert result.report.counters["lora_linear.fused"] == 3


def test_explain_returns_report_and_logs(caplog):
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj", "embed_tokens"])
    with caplog.at_level(logging.INFO, logger="unsloth_compile"):
        report = unsloth_compile.explain(model, **batch_for("llama"))
    assert len(report.fused) == 2 and len(report.refused) == 1
    lora_counters = {k: v for k, v in report.counters.items() if k.startswith("lora_linear.")}
    assert lora_counters == {"lora_linear.fused": 2, "lora_linear.refused": 1, "lora_linear.adapters": 2,
                             "lora_linear.residual_folded": 0}
    text = str(report)
    assert "base_model.model.model.layers.0.self_attn.q_proj" in text and "fused" in text
    assert "LoRA on Embedding layers is not fused" in text
    assert any("unsloth_compile report" in r.getMessage() for r in caplog.records)


def test_report_option_false_silences_the_log(caplog):
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"])
    with caplog.at_level(logging.INFO, logger="unsloth_compile"):
        report = unsloth_compile.explain(model, **batch_for("llama"), options={"report": False})
    assert len(report.fused) == 2  # explain still collects the report
    assert not any("unsloth_compile report" in r.getMessage() for r in caplog.records)


def test_explain_does_not_disturb_the_callers_rng_or_parameters():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"], lora_dropout=0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    unsloth_compile.explain(model, **batch_for("llama"))
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_root_lora_module_reports_no_spurious_leftover():
    """A compiled module that is itself the LoRA layer: its fused site is the whole report (the
    fused op's inputs, A.t() and B.t() among them, read adapter parameters and were once
    reported as an unrecognised fragment)."""

    class RootLoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(8, 6)
            self.base.weight.requires_grad_(False)
            self.A = torch.nn.Parameter(torch.randn(8, 2))
            self.B = torch.nn.Parameter(torch.randn(2, 6))

        def forward(self, x):
            return self.base(x) + x @ self.A @ self.B * 0.5

    report = unsloth_compile.explain(RootLoRA(), torch.randn(3, 8))
    assert len(report.fused) == 1 and report.refused == [], str(report)
