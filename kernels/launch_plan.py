"""Launch plans: a Triton kernel compiled and tuned for one problem, launched directly on
later calls of that problem. The one place the project relies on Triton internals
(`CompiledKernel[grid](*args)` and the specialisation rules of `JITFunction`), so that a
Triton upgrade that changes them is fixed here.

Why: the autotuner's key building and JITFunction.run's argument binding cost 0.1-0.2 ms of
Python per launch on the H200 host (cProfile, docs/bench/kernel_notes.md), as much as the
whole low-rank term's GPU time. Used by kernels/lora_gemm.py.
"""

from __future__ import annotations

from torch import Tensor

import triton


def specialization(values) -> tuple:
    """What Triton specialises a kernel on besides constexprs: each pointer's element type and
    16-byte alignment, and ints that are 1 or multiples of 16. Two calls with equal
    specialisations and equal constexprs run the same compiled kernel."""
    bits = []
    for value in values:
        if isinstance(value, Tensor):
            bits.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            bits.append((value == 1, value % 16 == 0))
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
