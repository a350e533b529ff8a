"""Launch plans: a Triton kernel compiled and tuned for one problem, launched directly on
later calls of that problem. The one place the project relies on Triton internals
(`CompiledKernel[grid](*args)` and the specialisation rules of `JITFunction`), so that a
Triton upgrade that changes them is fixed here.

Why: the autotuner's key building and JITFunction.run's argument binding cost as much Python
per launch as the whole low-rank term's GPU time (docs/bench/design-choices.md#bf16-lora-gemm).
Used by kernels/lora/lora_gemm.py (`Plan`, per tuned problem) and by
the un-tuned kernels' hosts (`launch`: lora/lowrank_thin.py, fp8/fp8_quantize.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton


def specialization(values) -> tuple:
    """What Triton specialises a kernel on besides constexprs: each pointer's element type and
    16-byte alignment, and ints that are 1, multiples of 16, or beyond int32 (then passed as
    int64). Two calls with equal specialisations and equal constexprs run the same compiled
    kernel."""
    bits = []
    for value in values:
        if isinstance(value, Tensor):
            bits.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            bits.append((value == 1, value % 16 == 0, -2**31 <= value < 2**31))
        elif isinstance(value, bool):
            bits.append(value)
    return tuple(bits)


def jit_function(tuned) -> triton.runtime.JITFunction:
    """The JITFunction under autotune/heuristics wrappers (for its parameter order)."""
    fn = tuned
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


class Plan:
    """The compiled kernel and tuned configuration of one problem, found once through the
    autotuner (`tuned`, right after it launched): later calls pass the same arguments by
    name and launch the compiled kernel with no autotuner or argument binding in between."""

    __slots__ = ("kernel", "config", "arg_names")

    def __init__(self, kernel, tuned):
        self.kernel = kernel
        self.config = dict(tuned.best_config.kwargs)
        self.arg_names = jit_function(tuned).arg_names

    def launch(self, named: dict, programs: int) -> None:
        """Run the kernel over `programs` programs with the arguments in `named` (name ->
        value; the configuration's meta-parameters are added to it)."""
        named.update(self.config)
        # CompiledKernel[grid] takes the full 3-D grid (JITFunction.run pads it, we do not).
        self.kernel[(programs, 1, 1)](*[named[name] for name in self.arg_names])


# Direct launches of un-tuned kernels (the thin GEMMs, fp8 quantisation): the compiled kernel of
# each (kernel, device, launch options, constexprs, specialisation), from its first launch.
_DIRECT: dict = {}


def launch(kernel, grid: tuple[int, ...], *, num_warps: int, num_stages: int, **named) -> None:
    """`kernel[grid](**named, num_warps=..., num_stages=...)`; after the first call of a
    specialisation, the compiled kernel is launched directly (JITFunction.run's argument
    binding and cache lookup skipped). The interpreter (CPU) and the knob direct_launch=False
    always take `kernel[grid]`."""
    from . import knobs
    from .launch_args import interpreting

    if interpreting() or not knobs.current().direct_launch:
        kernel[grid](**named, num_warps=num_warps, num_stages=num_stages)
        return
    fn = jit_function(kernel)
    params = fn.params
    key = (fn, torch.cuda.current_device(), num_warps, num_stages,
           tuple(named[p.name] for p in params if p.is_constexpr),
           specialization(named[p.name] for p in params if not p.is_constexpr))
    compiled = _DIRECT.get(key)
    if compiled is None:
        _DIRECT[key] = kernel[grid](**named, num_warps=num_warps, num_stages=num_stages)
        return
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*[named[name] for name in fn.arg_names])
