"""unsloth_compile/ops/kernel_loader.py: when a frozen base's kernel module runs a call, when the
reference path does, and the error and the warnings (each once) the dense and NF4 bases give."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import unsloth_compile  # noqa: F401  registers the ops
from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.kernels import reference
from unsloth_compile.ops import base_dense, base_nf4
from unsloth_compile.ops.kernel_loader import KernelLoader

CUDA = torch.device("cuda")  # pick reads only the device's type: no GPU is needed here
MISSING = "unsloth_compile.kernels.no_such_kernel_module"


def _loader(module_name: str, kernels: str = "Toy kernels") -> KernelLoader:
    return KernelLoader(module_name=module_name, kernels=kernels,
                        unavailable="unsloth_compile: toy unavailable (%s); reference",
                        unsupported="unsloth_compile: toy refused: %s")


@pytest.fixture
def toy_module(monkeypatch):
    """A kernel module that takes inputs whose first argument is True."""
    module = types.ModuleType("toy_kernels_for_loader_test")
    module.supports = lambda ok, why="odd shape": (True, "") if ok else (False, why)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_reference_impl_and_other_devices_never_import():
    loader = _loader(MISSING)
    assert loader.pick("reference", CUDA, (True,)) is None
    assert loader.pick("triton", torch.device("cpu"), (True,)) is None  # no error: nothing was imported


def test_module_runs_what_it_supports(toy_module, caplog):
    loader = _loader(toy_module.__name__)
    assert loader.pick("auto", CUDA, (True,)) is toy_module
    assert loader.pick("triton", CUDA, (True,)) is toy_module
    assert _warnings(caplog) == []


def test_refused_inputs_warn_once_per_reason_or_raise_when_forced(toy_module, caplog):
    loader = _loader(toy_module.__name__)
    with caplog.at_level(logging.WARNING, logger="unsloth_compile"):
        for _ in range(3):
            assert loader.pick("auto", CUDA, (False,)) is None
        assert loader.pick("auto", CUDA, (False, "rank 300")) is None
    assert _warnings(caplog) == ["unsloth_compile: toy refused: odd shape", "unsloth_compile: toy refused: rank 300"]
    with pytest.raises(UnslothCompileError, match=r"kernels='triton' cannot run these inputs: odd shape; "
                                                  r"use kernels='auto' \(the reference op runs them\)"):
        loader.pick("triton", CUDA, (False,))


def test_missing_module_warns_once_or_raises_when_forced(caplog):
    loader = _loader(MISSING)
    with caplog.at_level(logging.WARNING, logger="unsloth_compile"):
        assert loader.pick("auto", CUDA, (True,)) is None
        assert loader.pick("auto", CUDA, (True,)) is None
    (warning,) = _warnings(caplog)
    assert warning.startswith("unsloth_compile: toy unavailable (ModuleNotFoundError: ")
    with pytest.raises(UnslothCompileError, match=r"options kernels='triton' but the Toy kernels cannot be loaded "
                                                  r"\(ModuleNotFoundError: .*\); install triton or use "
                                                  r"kernels='auto'/'reference'"):
        loader.pick("triton", CUDA, (True,))


def test_a_failed_import_is_tried_again(toy_module):
    loader = _loader("toy_kernels_not_there_yet")
    assert loader.module_or_reason()[0] is None
    sys.modules["toy_kernels_not_there_yet"] = toy_module
    try:
        assert loader.module_or_reason() == (toy_module, None)
    finally:
        del sys.modules["toy_kernels_not_there_yet"]


@pytest.mark.parametrize("loader, kernels, unavailable, unsupported", [
    (base_dense.TRITON, "Triton kernels", "unsloth_compile: Triton kernels unavailable (%s); using the reference ops",
     "unsloth_compile: lora_linear runs the reference op: %s"),
    (base_nf4.KERNELS, "NF4 kernels",
     "unsloth_compile: NF4 Triton kernels unavailable (%s); lora_linear_nf4 runs the dequantised reference",
     "unsloth_compile: lora_linear_nf4 runs the dequantised reference: %s"),
], ids=["dense", "nf4"])
def test_the_bases_messages(loader, kernels, unavailable, unsupported):
    assert (loader.kernels, loader.unavailable, loader.unsupported) == (kernels, unavailable, unsupported)


def test_the_bases_pick_their_kernel_modules():
    assert base_dense.TRITON.module_name == "unsloth_compile.kernels.lora.lora_linear_triton"
    assert base_nf4.KERNELS.module_name == "unsloth_compile.kernels.nf4.nf4_lora"
    x = torch.randn(2, 64)
    assert base_dense.pick_kernels("auto", [x, torch.randn(8, 64), torch.randn(4, 64), torch.randn(8, 4), None]) \
        is reference
    base = {"out_features": 8, "in_features": 64}
    assert base_nf4.pick_kernels("triton", base, x, torch.randn(4, 64), torch.randn(8, 4), None) is None
