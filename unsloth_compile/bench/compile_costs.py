"""What compiling cost in one `bench profile` variant: the frames Dynamo compiled (recompiles and
their reasons among them), the kernel choices the package made by timing, and, under
`--compile-profile`, where each warm-up step's time went among the compiler's phases.

    frames          torch._dynamo.utils.get_compilation_metrics(): one entry per frame compile,
                    with its compile id (frame/compile of that frame), the code's name, the
                    recompile reason (the first guard that failed) and its seconds
    timed choices   kernels/timed_choice.py's CHOICES: each choice made since the variant began
                    (problem key, the chosen candidate, every candidate's median ms) and the row
                    buckets (ROW_BUCKETS: M's power of two -> the bucket whose timings it reuses)
    phases          cProfile over one step: the cumulative time of each of COMPILER_FUNCTIONS,
                    i.e. of a phase and everything it called (the phases nest: Dynamo's frame
                    compile holds the backend, which holds AOTAutograd, which holds Inductor)
"""

from __future__ import annotations

import cProfile
import pstats
from typing import Optional

from . import output

# (phase, the file's path ending, the function's name): the compiler's functions whose
# cumulative time says what a compiling step was spent on. A name that a torch or Triton
# version lacks costs nothing: its phase reads 0.
COMPILER_FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("dynamo frame compile", "torch/_dynamo/convert_frame.py", "_compile"),
    ("unsloth backend", "unsloth_compile/backend.py", "unsloth"),
    ("unsloth passes", "passes/pipeline.py", "run_passes"),
    ("aot_autograd", "torch/_functorch/aot_autograd.py", "aot_module_simplified"),
    ("inductor compile_fx", "torch/_inductor/compile_fx.py", "compile_fx"),
    ("inductor compile_fx_inner", "torch/_inductor/compile_fx.py", "compile_fx_inner"),
    ("inductor forward compiler", "torch/_inductor/compile_fx.py", "fw_compiler_base"),
    ("inductor backward compiler", "torch/_inductor/compile_fx.py", "bw_compiler"),
    ("inductor async compile wait", "torch/_inductor/async_compile.py", "wait"),
    ("inductor code cache load", "torch/_inductor/codecache.py", "load_by_key_path"),
    ("inductor autotuning", "torch/_inductor/runtime/triton_heuristics.py", "benchmark_all_configs"),
    ("triton compile", "triton/compiler/compiler.py", "compile"),
    ("triton do_bench", "triton/testing.py", "do_bench"),
    ("unsloth timed choices", "kernels/timed_choice.py", "fastest"),
    ("cuda graph record", "torch/_inductor/cudagraph_trees.py", "record_function"),
)


def compiler_phases_ms(profiler: cProfile.Profile) -> dict[str, float]:
    """Each of COMPILER_FUNCTIONS' cumulative ms in the `profiler`'s run (0.0 where not called)."""
    stats = pstats.Stats(profiler).stats
    phases = {}
    for phase, path, function in COMPILER_FUNCTIONS:
        seconds = sum(cumulative for (filename, _, name), (_, _, _, cumulative, _) in stats.items()
                      if name == function and filename.replace("\\", "/").endswith(path))
        phases[phase] = 1e3 * seconds
    return phases


def start_compile_records() -> None:
    """Forget the frames compiled so far: `frames_compiled()` then lists this variant's only."""
    from torch._dynamo.utils import clear_compilation_metrics

    clear_compilation_metrics()


def frames_compiled() -> list[dict]:
    """The frames Dynamo compiled since `start_compile_records()`: compile id, code name,
    recompile reason (None for a frame's first compile), seconds. Dynamo keeps the last
    DEFAULT_COMPILATION_METRICS_LIMIT of them."""
    from torch._dynamo.utils import get_compilation_metrics

    frames = []
    for metrics in get_compilation_metrics():
        if getattr(metrics, "is_runtime", False):  # runtime autotuning, recorded alongside
            continue
        reason = getattr(metrics, "recompile_reason", None)
        seconds = getattr(metrics, "entire_frame_compile_time_s", None)
        frames.append({"compile_id": str(getattr(metrics, "compile_id", None)), "code": getattr(metrics, "co_name", None),
                       "recompile_reason": reason and str(reason)[:300],
                       "seconds": None if seconds is None else round(float(seconds), 3),
                       "failed": getattr(metrics, "fail_type", None)})
    return frames


def _timed_choice_state() -> Optional[tuple[dict, dict]]:
    """kernels/timed_choice.py's CHOICES and ROW_BUCKETS; None where Triton (which that module
    imports) is missing."""
    try:
        from ..kernels.timed_choice import CHOICES, ROW_BUCKETS
    except ImportError:
        return None
    return CHOICES, ROW_BUCKETS


def timed_choices_seen() -> dict[str, set]:
    """The problem keys of every timed choice made so far, per kind: what `timed_choices_since`
    leaves out."""
    state = _timed_choice_state()
    return {} if state is None else {kind: set(table) for kind, table in state[0].items()}


def timed_choices_since(seen: dict[str, set]) -> dict:
    """The timed choices made since `seen` was taken (per kind: problem, chosen, each candidate's
    median ms), how many earlier ones exist, and the row buckets."""
    state = _timed_choice_state()
    if state is None:
        return {"made": {}, "earlier": 0, "row_buckets": {}, "note": "triton is not installed"}
    choices, buckets = state
    made = {kind: [{"problem": repr(key), "chosen": chosen,
                    "ms": {name: (None if ms == float("inf") else round(ms, 4)) for name, ms in times.items()}}
                   for key, (chosen, times) in table.items() if key not in seen.get(kind, ())]
            for kind, table in choices.items()}
    return {"made": made, "earlier": sum(len(keys) for keys in seen.values()),
            "row_buckets": {str(rows): bucket for rows, bucket in sorted(buckets.items())}}


def count_made(choices: dict) -> int:
    return sum(len(listed) for listed in choices["made"].values())


def batch_shape(batch: dict) -> list[int]:
    return list(batch["input_ids"].shape)


def markdown_lines(name: str, result: dict) -> list[str]:
    """The compile costs of one profiled variant (`result`: `bench profile`'s), for its page."""
    if "compiles" not in result:
        return []
    compiles, choices = result["compiles"], result["timed_choices"]
    lines = ["", f"### {name}: compiles, real tokens and timed choices", "",
             f"- profiled steps: batch shapes {result.get('batch_shapes')}, real (non-pad) tokens "
             f"{result.get('real_tokens_per_step')}, {output.fmt(result.get('real_tokens_per_s'), ',.0f')} real "
             "tokens/s over their wall time",
             f"- Dynamo: {compiles['dynamo_graphs']} graphs, {len(compiles['frames'])} frame compiles, "
             f"{compiles['recompiles']} recompiles",
             f"- timed kernel choices made: {count_made(choices)} (earlier in the process: {choices['earlier']}); "
             f"row buckets {choices['row_buckets']}"]
    lines += [f"  - recompile {f['compile_id']} of {f['code']} ({output.fmt(f['seconds'], '.2f')} s): "
              f"{output.first_line(f['recompile_reason'], 160)}" for f in compiles["frames"] if f["recompile_reason"]]
    lines += [f"  - {kind}: {c['problem'][:100]} -> {c['chosen']}" for kind, listed in choices["made"].items()
              for c in listed]
    warmup = result.get("warmup_steps") or []
    if warmup:
        profiled = "phases_ms" in warmup[0]
        # a phase no step reached (Inductor's under aot_eager, CUDA graphs on a CPU) has no column
        phases = [k for k in warmup[0].get("phases_ms", {}) if any(w["phases_ms"][k] > 0 for w in warmup)]
        lines += ["", "warm-up steps" + (" under cProfile, cumulative ms of the compiler's phases (they nest; "
                                         "phases no step reached left out)" if profiled else "") + ":", ""]
        lines.append(output.markdown_table(
            ["step", "batch", "real tokens", "wall s", "graphs", "timed choices"] + phases,
            [[i, "x".join(map(str, w["batch_shape"])), w["real_tokens"], output.fmt(w["wall_s"], ".2f"),
              w["dynamo_graphs"], w["timed_choices"]] + [output.fmt(w["phases_ms"][k], ".0f") for k in phases]
             for i, w in enumerate(warmup)]))
    return lines


__all__ = ["COMPILER_FUNCTIONS", "compiler_phases_ms", "start_compile_records", "frames_compiled",
           "timed_choices_seen", "timed_choices_since", "count_made", "batch_shape",
           "markdown_lines"]
