import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# Without CUDA the Triton kernels run in the interpreter. Triton reads TRITON_INTERPRET when a
# kernel is decorated (and when triton.language decorates its own helpers), so it is set here,
# before anything imports Triton: `import unsloth_compile` does.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import unsloth_compile  # noqa: E402,F401  registers the backend and the ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters, and a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_summary():
    """The process-wide summary ledger forgotten before and after the test."""
    from unsloth_compile import summary

    summary.reset()
    yield
    summary.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
