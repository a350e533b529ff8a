"""kernels/launch_plan.launch: an un-tuned kernel's compiled kernel launched directly after the
first call of its specialisation. On the GPU this replaces Triton's per-launch binding; here a
stand-in kernel records which path each call took (the interpreter never takes the direct one)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from unsloth_compile.kernels import knobs, launch_plan  # noqa: E402


def _kernel_source(x_ptr, out_ptr, n, stride, FLAG, BLOCK):  # parameters only: never compiled here
    pass


class _Compiled:
    """A CompiledKernel stand-in: kernel[grid](*args) records the positional launch."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Kernel:
    """A @triton.jit stand-in: the JITFunction (for parameter names and constexprs) under `.fn`,
    kernel[grid](**named) records the call and returns a compiled kernel, as JITFunction.run does."""

    def __init__(self):
        self.fn = triton.runtime.JITFunction(_kernel_source)
        self.fn.params[4].is_constexpr = self.fn.params[5].is_constexpr = True
        self.log = []

    def __getitem__(self, grid):
        def run(**named):
            self.log.append(("jit", grid, named))
            return _Compiled(self.log)
        return run


@pytest.fixture
def direct(monkeypatch):
    """launch() outside the interpreter, with a device index, and an empty cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch_plan, "_DIRECT", {})
    with knobs.patch(direct_launch=True):
        yield


def _args(x, n=32, flag=True, block=64):
    return dict(x_ptr=x, out_ptr=x, n=n, stride=16, FLAG=flag, BLOCK=block)


def test_second_call_of_a_specialisation_launches_the_compiled_kernel(direct):
    kernel, x = _Kernel(), torch.zeros(64)
    launch_plan.launch(kernel, (3,), num_warps=4, num_stages=2, **_args(x))
    launch_plan.launch(kernel, (5, 2), num_warps=4, num_stages=2, **_args(x, n=48))  # 48: still % 16 == 0
    (first, first_grid, named), (second, grid, args) = kernel.log
    assert first == "jit" and first_grid == (3,) and named["num_warps"] == 4 and named["num_stages"] == 2
    assert second == "direct" and grid == (5, 2, 1)  # the full 3-D grid the compiled kernel takes
    assert args == (x, x, 48, 16, True, 64)  # every argument in the kernel's order, constexprs included


@pytest.mark.parametrize("change", ["constexpr", "one", "not16", "int64", "misaligned", "dtype", "warps"])
def test_another_specialisation_compiles_through_the_jit_function(direct, change):
    kernel, x = _Kernel(), torch.zeros(64)
    launch_plan.launch(kernel, (1,), num_warps=4, num_stages=2, **_args(x))
    args, warps = _args(x), 4
    if change == "constexpr":
        args["BLOCK"] = 128
    elif change in ("one", "not16", "int64"):
        args["n"] = {"one": 1, "not16": 40, "int64": 2**31 + 16}[change]
    elif change == "misaligned":
        args["x_ptr"] = x[1:]  # 4 bytes off a 16-byte boundary
    elif change == "dtype":
        args["x_ptr"] = x.half()
    else:
        warps = 8
    launch_plan.launch(kernel, (1,), num_warps=warps, num_stages=2, **args)
    assert [entry[0] for entry in kernel.log] == ["jit", "jit"]


def test_interpreter_and_the_knob_always_take_the_jit_function(direct, monkeypatch):
    kernel, x = _Kernel(), torch.zeros(64)
    with knobs.patch(direct_launch=False):
        for _ in range(2):
            launch_plan.launch(kernel, (1,), num_warps=4, num_stages=2, **_args(x))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for _ in range(2):
        launch_plan.launch(kernel, (1,), num_warps=4, num_stages=2, **_args(x))
    assert [entry[0] for entry in kernel.log] == ["jit"] * 4
    assert launch_plan._DIRECT == {}
