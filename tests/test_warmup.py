"""The warm-up is visible: one line when a model starts compiling, one when the warm-up is over
(wall seconds, graphs, LoRA linears fused), on the `unsloth_compile.warmup` logger, shown
without logging configured; option summary=False silences both (unsloth_compile/summary.py)."""

import logging
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import unsloth_compile

from helpers import TwoLoRAsWithGraphBreak

FAST = {"inner": "aot_eager"}
DONE = re.compile(r"^unsloth_compile: warm-up done in (\d+\.\d) s \(first step, compiles included\): "
                  r"(\d+) graphs?, fused (\d+)/(\d+) LoRA linears$")


pytestmark = pytest.mark.usefixtures("fresh_summary")


class TwoGraphs(TwoLoRAsWithGraphBreak):
    """The class name the lines print."""


def _warmup_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "unsloth_compile.warmup"]


def _step(model, rows=3):
    model(torch.randn(rows, 8)).pow(2).mean().backward()


def test_compiling_then_done_with_seconds_graphs_and_sites(caplog):
    model = TwoGraphs()
    compiled = torch.compile(model, backend="unsloth", options=FAST)
    with caplog.at_level(logging.INFO, logger="unsloth_compile.warmup"):
        _step(compiled)
        after_first = _warmup_lines(caplog)
        for _ in range(3):
            _step(compiled)
    assert after_first == ["unsloth_compile: compiling TwoGraphs: the first step is slow while its graphs "
                           "compile (a line follows when it is done)"]
    lines = _warmup_lines(caplog)
    assert len(lines) == 2 and lines[0] == after_first[0], lines
    seconds, graphs, fused, total = DONE.match(lines[1]).groups()
    assert float(seconds) > 0 and (graphs, fused, total) == ("2", "2", "2")
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "unsloth_compile.warmup")


def test_each_model_has_its_warmup(caplog):
    """Models compiled one after the other (Dynamo reset between: a model of the same class
    would otherwise reuse the first one's graphs, and nothing would compile)."""
    with caplog.at_level(logging.INFO, logger="unsloth_compile.warmup"):
        for model in (TwoGraphs(), TwoGraphs()):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="unsloth", options=FAST)
            _step(compiled)
            _step(compiled)
        torch._dynamo.reset()
        own = unsloth_compile.compile(TwoGraphs(), FAST)  # a ledger of its own
        _step(own)
        _step(own)
    lines = _warmup_lines(caplog)
    assert [line.split(":")[1].split()[0] for line in lines] == ["compiling", "warm-up"] * 3, lines


def test_each_compile_after_the_warmup_is_reported_once(caplog):
    """Compiles are bounded and reported: the second shape compiles dynamic graphs (one pair of
    lines), the third reuses them (no line)."""
    compiled = torch.compile(TwoGraphs(), backend="unsloth", options=FAST)
    with caplog.at_level(logging.INFO, logger="unsloth_compile.warmup"):
        _step(compiled)
        _step(compiled)
        _step(compiled, rows=5)  # new shapes: recompiles, dynamic
        _step(compiled, rows=5)
        _step(compiled, rows=7)  # served by the dynamic graphs
        _step(compiled, rows=9)
    lines = _warmup_lines(caplog)
    assert len(lines) == 4, lines
    assert lines[2] == ("unsloth_compile: compiling TwoGraphs again (compile 1 after the warm-up: new input shapes "
                        "or another code path): this step is slow (a line follows when it is done)")
    assert re.fullmatch(r"unsloth_compile: compile 1 after the warm-up done in \d+\.\d s: 2 graphs, "
                        r"fused 2/2 LoRA linears", lines[3]), lines[3]


def test_summary_false_silences_the_warmup(caplog):
    with caplog.at_level(logging.INFO, logger="unsloth_compile"):
        compiled = torch.compile(TwoGraphs(), backend="unsloth", options={**FAST, "summary": False})
        _step(compiled)
        _step(compiled)
    assert _warmup_lines(caplog) == []


def test_summary_and_warmup_are_visible_without_logging_configured():
    code = textwrap.dedent("""
        import torch, unsloth_compile
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = torch.nn.Linear(8, 8).requires_grad_(False)
                self.lora_A = torch.nn.Linear(8, 2, bias=False); self.lora_B = torch.nn.Linear(2, 8, bias=False)
            def forward(self, x):
                return self.base(x) + self.lora_B(self.lora_A(x)) * 0.5
        class Outer(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.layer = M()
            def forward(self, x):
                return self.layer(x)
        model = unsloth_compile.compile(Outer(), inner="eager")
        for _ in range(2):
            model(torch.randn(3, 8)).sum().backward()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("unsloth_compile:")]
    assert lines[0].startswith("unsloth_compile: compiling Outer: "), out.stderr[-3000:]
    assert lines[1] == "unsloth_compile: fused 1/1 LoRA linears (1 graph)"
    assert DONE.match(lines[2]) and DONE.match(lines[2]).groups()[1:] == ("1", "1", "1"), lines
    assert len(lines) == 3 and "Warning" not in out.stderr, out.stderr[-3000:]
    assert "unsloth_compile report" not in out.stderr  # the table stays at INFO on "unsloth_compile"
