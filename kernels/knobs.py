"""The kernels' knobs: which path the CUDA kernels take, forced for a benchmark's breakdown or
for bisecting a regression. Not user options (those are `unsloth_compile.Config`): the
defaults are what users get, and each is decided per problem by timing where it says "auto".

Every knob's default comes from an environment variable, read once when this module is
imported; the kernels read the knobs through `current()` when they launch, never copy them
at import. For a block of code:

    from unsloth_compile.kernels import knobs
    with knobs.patch(main_gemm="cublas", thin="cublas"):
        ...                                   # every LoRA GEMM on cuBLAS

Timed choices and compiled-kernel plans are keyed on the knobs that shape their candidates
(main_loop, autotune, persistent): a patch never reuses a decision taken under other knobs.
Nothing of the project is imported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import UnslothCompileError

_AUTO_TRITON_CUBLAS = ("auto", "triton", "cublas")


def _env_choice(name: str, default: str):
    return field(default_factory=lambda: os.environ.get(name, default), metadata={"env": name})


def _env_flag(name: str):
    """On unless the variable is "0" (the variables' meaning since they were added)."""
    return field(default_factory=lambda: os.environ.get(name, "1") != "0", metadata={"env": name})


def _env_flag_off(name: str):
    """Off unless the variable is "1": a path not yet measured on a GPU."""
    return field(default_factory=lambda: os.environ.get(name, "0") == "1", metadata={"env": name})


@dataclass(frozen=True)
class KernelKnobs:
    # kernels/lora/lora_linear_triton.py: Y = X W^T + s H B^T (and dX) as one Triton GEMM with the
    # low-rank term in its epilogue ("triton") or as two cuBLAS calls ("cublas"); "auto": per
    # problem, whichever was faster when timed on its first call.
    main_gemm: str = _env_choice("UNSLOTH_LORA_MAIN_GEMM", "auto")
    # The rank-sized GEMMs H, G, dA, dB: kernels/lora/lowrank_thin.py ("triton") or cuBLAS
    # ("cublas"); "auto": timed per problem like main_gemm.
    thin: str = _env_choice("UNSLOTH_LORA_THIN", "auto")
    # Backward's G = dY B and dB = s dY^T H from one pass over dY (rows_thin_pair, r <= 64)
    # as a candidate; False: always from two thin GEMMs.
    thin_pair: bool = _env_flag("UNSLOTH_LORA_THIN_PAIR")
    # kernels/lora/lora_gemm.py's main loop: "auto" times TMA descriptors against pointer loads
    # where TMA can run (sm_90+, 16-byte aligned strides; always TMA in the interpreter when
    # the strides allow it); "pointer": never TMA.
    main_loop: str = _env_choice("UNSLOTH_LORA_MAIN_LOOP", "auto")
    # Autotune the Triton GEMM over its tile configurations; False: the first tile only, no
    # tuning (fast correctness runs on a GPU).
    autotune: bool = _env_flag("UNSLOTH_LORA_AUTOTUNE")
    # The TMA GEMM's persistent flavour (one program per SM looping over tiles) among the
    # autotuned configurations; False: one program per tile only.
    persistent: bool = _env_flag("UNSLOTH_LORA_PERSISTENT")
    # Which compressed layout a 2:4 sparse weight on CUDA gets (kernels/sparse24.py):
    # "auto" (cuSPARSELt where torch has it, else CUTLASS), "cusparselt" or "cutlass".
    sparse24_gemm: str = _env_choice("UNSLOTH_SPARSE24_GEMM", "auto")
    # cuSPARSELt's algorithm per 2:4 problem: chosen by torch._cslt_sparse_mm_search on the
    # problem's first call (True), or its default algorithm 0 (False).
    sparse24_search: bool = _env_flag("UNSLOTH_SPARSE24_SEARCH")
    # The un-tuned Triton kernels (thin GEMMs, fp8 quantisation) launched through their
    # compiled kernel after the first call of a specialisation (kernels/launch_plan.launch),
    # skipping Triton's per-launch argument binding; False: always through the JITFunction.
    # Off until a GPU run has checked it bit for bit and measured the host time it saves.
    direct_launch: bool = _env_flag_off("UNSLOTH_DIRECT_LAUNCH")

    def __post_init__(self):
        allowed = {"main_gemm": _AUTO_TRITON_CUBLAS, "thin": _AUTO_TRITON_CUBLAS, "main_loop": ("auto", "pointer"),
                   "sparse24_gemm": ("auto", "cusparselt", "cutlass")}
        for knob in dataclasses.fields(self):
            value = getattr(self, knob.name)
            choices = allowed.get(knob.name, (True, False))
            if value not in choices or type(value) is not type(choices[0]):
                raise UnslothCompileError(f"unsloth_compile kernel knob {knob.name}={value!r} (environment variable "
                                          f"{knob.metadata['env']}): choose {', '.join(map(repr, choices))}, or unset "
                                          "the variable")


_current = KernelKnobs()


def current() -> KernelKnobs:
    """The knobs in force now."""
    return _current


@contextlib.contextmanager
def patch(**changes) -> Iterator[KernelKnobs]:
    """The knobs with `changes` applied while the block runs (also a decorator); an unknown
    knob or a value outside its choices raises ValueError before anything changes."""
    global _current
    names = [knob.name for knob in dataclasses.fields(KernelKnobs)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise UnslothCompileError(f"unsloth_compile.kernels.knobs.patch: unknown kernel knob(s) {', '.join(unknown)}; "
                                  f"the knobs are {', '.join(names)}")
    saved = _current
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved
