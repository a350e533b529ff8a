"""What the per-layer CUDA benchmarks (sparse24, nf4-kernel) share, on CPU: a variant's row from
timing.timed_row (times, check, skipped or error, never raised), output.layer_table and
output.write_layer_results, and layer_args' checks."""

from __future__ import annotations

import argparse
import json

import pytest

from unsloth_compile.bench import layer_args, output, timing


@pytest.fixture
def fake_clock(monkeypatch):
    monkeypatch.setattr(timing, "graph_ms", lambda step: 1.5)
    monkeypatch.setattr(timing, "eager_ms", lambda step: 2.5)


def test_timed_row_times_and_checks_the_step(fake_clock, capsys):
    step = lambda: 3  # noqa: E731
    row = timing.timed_row({"variant": "v"}, lambda: step, lambda s: {"out": s()}, "err")
    assert row == {"variant": "v", "gpu_ms": 1.5, "ms": 2.5, "err": {"out": 3}}
    assert json.loads(capsys.readouterr().out) == row


def test_timed_row_records_a_failure_instead_of_raising(fake_clock, capsys):
    def missing():
        raise ImportError("no bitsandbytes")

    def broken():
        raise RuntimeError("out of resources")

    assert timing.timed_row({}, missing, skip=(ImportError,)) == {"skipped": "ImportError: no bitsandbytes"}
    assert timing.timed_row({}, missing) == {"error": "ImportError: no bitsandbytes"}
    row = timing.timed_row({}, lambda: broken, lambda s: {"out": s()}, "err")  # the check runs the step
    assert row == {"gpu_ms": 1.5, "ms": 2.5, "error": "RuntimeError: out of resources"}
    assert "Traceback" in capsys.readouterr().err


def test_layer_table_and_results(tmp_path, capsys):
    env = {"device": "GPU X", "date": "2026-01-01", "versions": {"torch": "2.13", "triton": "3.6"},
           "argv": ["--tokens", "64"]}
    text = output.layer_table("T", "python -m x", env, "legend", ["a", "b"], [["1", "2"]], versions_extra=", bnb 1")
    assert text == ("# T (GPU X, 2026-01-01; torch 2.13, triton 3.6, bnb 1)\n\n`python -m x --tokens 64`\n\n"
                    "legend\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    rows = [{"variant": "a", "gpu_ms": 1.0}]
    assert output.write_layer_results(tmp_path / "out", "t", env, rows, text) == 0
    assert json.loads((tmp_path / "out" / "t.json").read_text()) == {"environment": env, "rows": rows}
    assert (tmp_path / "out" / "t.md").read_text() == text and text in capsys.readouterr().out
    assert output.write_layer_results(tmp_path, "t", env, rows + [{"error": "E"}], text) == 1


def test_layer_args():
    def parse(argv):
        p = layer_args.layer_parser("prog", "doc", ["llama-8b.mlp.up"])
        p.add_argument("--things", default="a,b")
        return layer_args.parse_layer_args(p, argv, {"--things": ("a", "b")})

    args = parse(["--tokens", "64"])
    assert (args.layers, args.tokens, args.rank, args.things) == ("llama-8b.mlp.up", 64, 16, "a,b")
    for bad in (["--things", "a,c"], ["--layers", "nope"], ["--rank", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
    assert isinstance(parse([]), argparse.Namespace)
