"""One training step, taken apart: GPU time by kernel family, host time, GPU idle time.

    python -m unsloth_compile.bench profile --preset llama-1b --variant peft-eager --variant unsloth
    python -m unsloth_compile.bench profile --preset tiny                      # CPU smoke run
    python -m unsloth_compile.bench profile --preset llama-1b --lengths uniform:256-2048 \
        --variants peft-eager,peft+unsloth,peft+unsloth@packed --compile-profile

For each variant the model is built and warmed up exactly as `bench e2e` does (compilation in
the warm-up), on the batches `bench e2e` would feed it (`--lengths`, `--layouts`, NAME@packed
variants, BERT `--spellings`: bench/e2e.py's options), then `--steps` steps run under
`torch.profiler`. Per step:
- wall time: from the step's first Python line to the end of its last kernel (synchronised);
- host time: until the step's Python returned (every launch issued), before the synchronise;
- GPU busy: the union of the kernels' intervals (overlapping kernels counted once);
- GPU idle: wall time minus GPU busy (launch gaps, host-bound stretches, synchronisations);
- GPU time by family: kernel durations summed per family (`FAMILIES`), plus the ten
  costliest kernels by name and the costliest few of each family (what "copies" are, say);
- GPU idle by phase: each stretch where no kernel ran is charged to the step phase (forward,
  backward, optimizer, zero_grad, synchronize) whose Python was running when the next kernel
  started, i.e. the phase the GPU was waiting for; the longest stretches are listed with the
  kernels on either side;
- each profiled step's own wall time (a re-recorded CUDA graph or a recompile shows as one
  slow step, not as a higher mean only);
- Dynamo/Inductor counters that decide whether CUDA graphs ran (`cudagraph_skips`,
  recompiles, graph breaks), taken over the whole run.
- causal LM presets: the roofline by kernel family (bench/roofline.py, finer families:
  bench/kernel_families.py): each family's time, the FLOPs and bytes of its work by formula, the
  TFLOPS and GB/s that gives, and its distance to the card's roofline; written beside the
  profile as roofline-NAME.json and .md, with the step's MFU by the LoRA FLOP count.
- each profiled step's batch shape and real (non-pad) tokens, and real tokens/s over their wall time;
- what compiling cost (bench/compile_costs.py), over the variant's whole run: the graphs Dynamo
  compiled, each frame compile with its recompile reason, the kernel choices made by timing; per
  warm-up step, its batch, wall time, graphs compiled and choices timed.
The output files are named after the preset, the lengths, the layouts and the spelling where
they are not the defaults (profile-tiny-uniform8-64-padded-packed.json), so that runs of other
batches do not overwrite each other. Batches that vary in length or are packed get no roofline
(its formulas count full rows); the page says so.
`--host-profile`: one more step under cProfile after the profiled ones; the Python functions
with the most own time (`host_functions`), i.e. where the host time of a host-bound step goes.
`--compile-profile`: every warm-up step under cProfile, with the cumulative time of the
compiler's phases (compile_costs.COMPILER_FUNCTIONS: Dynamo, the passes, AOTAutograd, Inductor,
Triton compiles, autotuning, timed choices, CUDA-graph recording) and the costliest functions.
On CPU there are no device kernels: the table then holds wall and host time only.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import pstats
import re
import time
from pathlib import Path

import torch

from . import compile_costs, output
from .batch_layouts import real_tokens
from .e2e import (FIXED_LENGTHS, PRESETS, add_batch_arguments, build_model, check_real_data, dynamo_graphs,
                  is_real_data, prepare_model, run_name, spelled_mask, spellings_to_run, variant_batches)
from .lengths import LengthSpec
from .roofline import step_roofline, write_roofline
from .variants import (Variant, compile_for, device_name, environment, make_optimizer, parse_variant, resolve_device,
                       resolve_inner, run_isolated, synchronize, train_step)

# First match wins, so the specific families come before the generic ones ("triton_" is any
# Inductor kernel, but an Inductor softmax inside attention is attention).
FAMILIES: tuple[tuple[str, re.Pattern], ...] = (
    ("lora", re.compile(r"_lora_gemm|_rows_times_thin|_thin_t_times_rows|_rows_thin_pair|lowrank")),
    ("attention", re.compile(r"flash|fmha|attention|attn|cudnn_?sdpa|sdpa|softmax|_efficient_|"
                             r"cutlass.*(fwd|bwd).*(sm80|sm90)?_kernel", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|_fused_adam|foreach", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|sm90_|sm80_|ampere_|magma", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy|cat_|CatArray|transpose|fill", re.I)),
    ("fused elementwise", re.compile(r"^triton_|elementwise|reduce|vectorized", re.I)),
)


def family_of(kernel_name: str) -> str:
    for family, pattern in FAMILIES:
        if pattern.search(kernel_name):
            return family
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end_so_far = 0.0, None
    for start, end in sorted(intervals):
        if end_so_far is None or start > end_so_far:
            total += end - start
            end_so_far = end
        elif end > end_so_far:
            total += end - end_so_far
            end_so_far = end
    return total


@dataclasses.dataclass
class StepTimes:
    wall_s: float
    host_s: float


def _device_kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every device kernel (and memcpy/memset) the profiler saw."""
    kernels = []
    for event in prof.events():
        # record_function ranges (ours, the optimizer's) also appear on the GPU timeline as
        # annotations spanning their kernels: not kernels, and they would hide idle time
        annotation = getattr(event, "is_user_annotation", False) or event.name.startswith(("phase:", "step:"))
        if event.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            kernels.append((event.name, float(event.time_range.start), float(event.time_range.end)))
    return kernels


def _cpu_ranges(prof, prefix: str) -> list[tuple[str, float, float]]:
    """(name without prefix, start_us, end_us) of the CPU record_function ranges named prefix*."""
    return [(event.name[len(prefix):], float(event.time_range.start), float(event.time_range.end))
            for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith(prefix)]


def phased_train_step(step_fn, batch: dict, optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """`variants.train_step` with each phase in a named profiler range (`phase:forward`, ...),
    then the synchronise in its own; returns the host time (s) until every launch was issued."""
    from torch.profiler import record_function

    t0 = time.perf_counter()
    train_step(step_fn, batch, optimizer, phase=lambda name: record_function(f"phase:{name}"))
    host_s = time.perf_counter() - t0
    with record_function("phase:synchronize"):
        synchronize(device)
    return host_s


def idle_by_phase(kernels: list[tuple[str, float, float]], phases: list[tuple[str, float, float]],
                  steps: list[tuple[float, float]], longest: int = 8) -> dict:
    """Charge every GPU-idle stretch inside a step to the phase whose CPU range holds the start of
    the kernel that ended the stretch (the launch the GPU waited for); a step's lead-in (its
    first Python line to its first kernel) counts too. `phases` and `steps` are CPU ranges
    (name, start_us, end_us) / (start_us, end_us) on the profiler's clock, which kernels share."""
    ordered = sorted(kernels, key=lambda k: k[1])
    by_phase: dict[str, float] = collections.Counter()
    stretches = []

    def phase_at(t: float) -> str:
        for name, start, end in phases:
            if start <= t < end:
                return name
        return "between phases"

    for step_start, step_end in steps:
        inside = [k for k in ordered if step_start <= k[1] < step_end]
        busy_until, previous = step_start, "step start"
        for name, start, end in inside:
            if start > busy_until:
                gap = start - busy_until
                phase = phase_at(start)
                by_phase[phase] += gap
                stretches.append({"idle_us": gap, "phase": phase, "after": previous[:90], "before": name[:90]})
            if end > busy_until:
                busy_until, previous = end, name
    n = max(len(steps), 1)
    stretches.sort(key=lambda s: -s["idle_us"])
    host_by_phase: dict[str, float] = collections.Counter()
    for name, start, end in phases:
        host_by_phase[name] += end - start
    return {"idle_ms_by_phase": {k: v / 1e3 / n for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "host_ms_by_phase": {k: v / 1e3 / n for k, v in host_by_phase.items()},
            "longest_idle": stretches[:longest]}


def summarise(kernels: list[tuple[str, float, float]], steps: list[StepTimes], top: int = 10,
              per_family: int = 4) -> dict:
    n = len(steps)
    by_family: dict[str, float] = collections.Counter()
    by_name: dict[str, list] = {}
    for name, start, end in kernels:
        by_family[family_of(name)] += end - start
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    wall_ms = 1e3 * sum(s.wall_s for s in steps) / n
    host_ms = 1e3 * sum(s.host_s for s in steps) / n
    busy_ms = union_us([(s, e) for _, s, e in kernels]) / 1e3 / n if kernels else None
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    costliest = ranked[:top]
    family_tops: dict[str, list] = {}
    for name, (t, c) in ranked:
        listed = family_tops.setdefault(family_of(name), [])
        if len(listed) < per_family:
            listed.append({"name": name[:160], "ms_per_step": t / 1e3 / n, "calls_per_step": c / n})
    return {
        "steps": n, "wall_ms": wall_ms, "host_ms": host_ms,
        "gpu_busy_ms": busy_ms, "gpu_idle_ms": None if busy_ms is None else max(wall_ms - busy_ms, 0.0),
        "gpu_ms_by_family": {k: v / 1e3 / n for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "kernels_per_step": len(kernels) / n,
        "step_wall_ms": [round(1e3 * s.wall_s, 2) for s in steps],
        "top_kernels": [{"name": name[:160], "ms_per_step": t / 1e3 / n, "calls_per_step": c / n,
                         "family": family_of(name)} for name, (t, c) in costliest],
        "top_kernels_by_family": family_tops,
    }


def host_functions(profiler: cProfile.Profile, limit: int = 25, key: str = "own_ms") -> list[dict]:
    """The `limit` Python functions with the most own (or `key="cumulative_ms"`) time in a
    cProfile run, with their calls."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename if filename.startswith("~") else f"{'/'.join(Path(filename).parts[-2:])}:{line}"
        rows.append({"function": f"{where}({name})", "calls": calls, "own_ms": 1e3 * own,
                     "cumulative_ms": 1e3 * cumulative})
    return sorted(rows, key=lambda r: -r[key])[:limit]


def compile_counters() -> dict:
    """Counters that say whether CUDA graphs ran and how often Dynamo compiled: Inductor's
    `cudagraph_skips` (a graph run without CUDA graphs, with the reason logged under
    TORCH_LOGS=perf_hints), Dynamo's unique graphs, recompiles and graph breaks."""
    from torch._dynamo.utils import counters

    picked = {}
    for group in ("inductor", "stats", "graph_break", "recompiles"):
        for key, value in counters.get(group, {}).items():
            if group in ("graph_break", "recompiles") or "cudagraph" in key or key in ("unique_graphs", "calls_captured"):
                picked[f"{group}.{str(key)[:80]}"] = value
    return picked


def profile_variant(preset, variant: Variant, device, dtype, steps: int, warmup: int, seed: int, lr: float,
                    spelling: str = "full", lengths: LengthSpec = FIXED_LENGTHS, host_profile: bool = False,
                    compile_profile: bool = False, top: int = 10) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()
    compile_costs.start_compile_records()
    choices_seen = compile_costs.timed_choices_seen()
    torch.manual_seed(seed)
    model = prepare_model(build_model(preset, device, dtype), variant, preset)
    if variant.options.get("fuse_cross_entropy") is True and preset.family == "llama":
        from ..training_outputs import loss_only

        loss_only(model)  # as bench e2e does: without logits in the output the CE pass fuses
    model.train()
    step_fn = compile_for(model, variant)
    optimizer = make_optimizer(model.parameters(), lr, device)
    batches = variant_batches(preset, variant, lengths, spelling, warmup + steps + 2 * int(host_profile), seed,
                              device)
    graphs_before = dynamo_graphs()

    def one_step(batch) -> StepTimes:
        synchronize(device)
        t0 = time.perf_counter()
        train_step(step_fn, batch, optimizer)
        t_host = time.perf_counter()
        synchronize(device)
        return StepTimes(time.perf_counter() - t0, t_host - t0)

    warmup_steps = [warmup_step(one_step, batch, compile_profile) for batch in batches[:warmup]]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    timed = []
    profiled = batches[warmup:warmup + steps]
    with torch.profiler.profile(activities=activities) as prof:
        for batch in profiled:
            synchronize(device)
            t0 = time.perf_counter()
            with torch.profiler.record_function("step:"):
                host_s = phased_train_step(step_fn, batch, optimizer, device)
            timed.append(StepTimes(time.perf_counter() - t0, host_s))
    kernels = _device_kernels(prof)
    summary = summarise(kernels, timed, top)
    summary.update(idle_by_phase(kernels, _cpu_ranges(prof, "phase:"),
                                 [(start, end) for _, start, end in _cpu_ranges(prof, "step:")]))
    tokens = [real_tokens(batch) for batch in profiled]
    summary.update(batch_shapes=[compile_costs.batch_shape(b) for b in profiled], real_tokens_per_step=tokens,
                   real_tokens_per_s=sum(tokens) / sum(t.wall_s for t in timed) if timed else None)
    if preset.family == "llama" and is_real_data(lengths, variant):
        summary["roofline_note"] = ROOFLINE_SKIPPED
    elif preset.family == "llama":  # the roofline by kernel family (bench/roofline.py)
        summary.update(step_roofline(preset, variant.kind, model, dtype, kernels, len(timed), summary["wall_ms"],
                                     summary["gpu_idle_ms"], device_name(device)))
    if host_profile:
        summary.update(profile_host(one_step, step_fn, batches[-2:], optimizer, device))
    frames = compile_costs.frames_compiled()
    summary["compiles"] = {"dynamo_graphs": dynamo_graphs() - graphs_before, "frames": frames,
                           "recompiles": sum(f["recompile_reason"] is not None for f in frames)}
    summary["timed_choices"] = compile_costs.timed_choices_since(choices_seen)
    summary["warmup_steps"] = warmup_steps
    summary["counters"] = compile_counters()
    summary["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    summary["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    return summary


# The roofline's formulas count preset.batch x preset.seq tokens, every sequence of seq tokens.
ROOFLINE_SKIPPED = ("skipped: the roofline's FLOPs and bytes assume every row holds the preset's seq tokens; "
                    "this run's batches vary in length or are packed")


def warmup_step(one_step, batch: dict, compile_profile: bool) -> dict:
    """One warm-up step: its batch's shape and real tokens, wall time, the graphs Dynamo compiled
    and the kernel choices timed during it; with `compile_profile`, under cProfile, with the
    cumulative ms of the compiler's phases (bench/compile_costs.py) and the costliest functions."""
    graphs, seen = dynamo_graphs(), compile_costs.timed_choices_seen()
    profiler = cProfile.Profile() if compile_profile else None
    if profiler is not None:
        profiler.enable()
    try:
        times = one_step(batch)
    finally:
        if profiler is not None:
            profiler.disable()
    record = {"batch_shape": compile_costs.batch_shape(batch), "real_tokens": real_tokens(batch),
              "wall_s": times.wall_s, "dynamo_graphs": dynamo_graphs() - graphs,
              "timed_choices": compile_costs.count_made(compile_costs.timed_choices_since(seen))}
    if profiler is not None:
        record["phases_ms"] = compile_costs.compiler_phases_ms(profiler)
        record["top_cumulative"] = host_functions(profiler, 15, key="cumulative_ms")
    return record


def profile_host(one_step, step_fn, batches: list[dict], optimizer, device) -> dict:
    """`--host-profile`: one step under cProfile (functions by own time), then the forward of one
    more alone from an idle GPU (by cumulative time: what the step's lead-in, its first Python
    line to its first kernel, is made of)."""
    profiler = cProfile.Profile()
    profiler.enable()
    step = dataclasses.asdict(one_step(batches[0]))
    profiler.disable()
    found = {"host_profile_step": step, "host_functions": host_functions(profiler)}
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    loss = step_fn(**batches[1]).loss
    profiler.disable()
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    found["host_functions_forward"] = host_functions(profiler, 40, key="cumulative_ms")
    return found


def default_variants(inner: str) -> list[Variant]:
    compiled = "inductor" if inner == "inductor" else "aot_eager"
    return [Variant("peft-eager", "eager", role="peft-eager"),
            Variant(f"peft+{compiled}", compiled, role="peft-compile"),
            Variant("peft+unsloth", "unsloth", {"inner": inner}, role="unsloth")]


def render_markdown(data: dict) -> str:
    lines = output.header_lines(f"profile: {data['preset']} on {data['env']['device']}", data["env"])
    lines += [f"- {data['warmup']} warm-up steps (compilation included), then {data['steps']} profiled steps; "
              f"per-step means; attention mask: {data['attention_mask']}",
              f"- batches: {data.get('rows')} rows, lengths {data.get('lengths_description')}, layouts "
              f"{', '.join(data.get('layouts', ['padded']))}" + (f", spelling {data['spelling']}"
                                                                 if data.get("spelling") else ""),
              "- host: the step's Python until it returned (all launches issued); GPU busy: union of kernel "
              "intervals; idle: wall - busy"]
    if data.get("real_data"):
        lines.append(f"- roofline: {ROOFLINE_SKIPPED}")
    lines.append("")
    families = sorted({f for r in data["results"] if r["status"] == "ok" for f in r["gpu_ms_by_family"]})
    rows = []
    for r in data["results"]:
        if r["status"] != "ok":
            rows.append([r["variant"]["name"], "FAILED: " + output.first_line(r.get("error", ""))] + ["-"] * (4 + len(families)))
            continue
        rows.append([r["variant"]["name"], output.fmt(r["wall_ms"], ".1f"), output.fmt(r["host_ms"], ".1f"),
                     output.fmt(r["gpu_busy_ms"], ".1f"), output.fmt(r["gpu_idle_ms"], ".1f"),
                     output.fmt(r["kernels_per_step"], ".0f")]
                    + [output.fmt(r["gpu_ms_by_family"].get(f), ".1f") for f in families])
    lines.append(output.markdown_table(["variant", "wall ms", "host ms", "GPU busy ms", "GPU idle ms", "kernels"]
                                       + [f"{f} ms" for f in families], rows))
    for r in data["results"]:
        if r["status"] == "ok" and r["top_kernels"]:
            lines += ["", f"### {r['variant']['name']}: costliest kernels", ""]
            lines.append(output.markdown_table(
                ["kernel", "family", "ms/step", "calls/step"],
                [[k["name"][:100], k["family"], output.fmt(k["ms_per_step"], ".2f"), output.fmt(k["calls_per_step"], ".0f")]
                 for k in r["top_kernels"]]))
        if r["status"] == "ok" and r.get("idle_ms_by_phase"):
            lines += ["", f"### {r['variant']['name']}: GPU idle by the phase it waited for (ms/step)", ""]
            lines.append(output.markdown_table(
                list(r["idle_ms_by_phase"]), [[output.fmt(v, ".2f") for v in r["idle_ms_by_phase"].values()]]))
            lines += ["", "host (CPU) ms per phase: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r.get("host_ms_by_phase", {}).items()), "", "longest idle stretches:", ""]
            lines.append(output.markdown_table(
                ["idle us", "phase", "after kernel", "before kernel"],
                [[output.fmt(g["idle_us"], ".0f"), g["phase"], g["after"][:60], g["before"][:60]]
                 for g in r["longest_idle"]]))
        if r["status"] == "ok" and r.get("top_kernels_by_family"):
            lines += ["", f"### {r['variant']['name']}: costliest kernels of each family", ""]
            lines.append(output.markdown_table(
                ["family", "kernel", "ms/step", "calls/step"],
                [[family, k["name"][:90], output.fmt(k["ms_per_step"], ".2f"), output.fmt(k["calls_per_step"], ".0f")]
                 for family, listed in r["top_kernels_by_family"].items() for k in listed]))
        if r["status"] == "ok":
            lines += ["", f"per-step wall ms: {r.get('step_wall_ms')}; counters: {r.get('counters')}"]
            lines += compile_costs.markdown_lines(r["variant"]["name"], r)
        if r["status"] == "ok" and r.get("host_functions"):
            step = r["host_profile_step"]
            lines += ["", f"### {r['variant']['name']}: host functions of one step under cProfile "
                      f"(host {1e3 * step['host_s']:.1f} ms with the profiler's own overhead)", ""]
            lines.append(output.markdown_table(
                ["function", "calls", "own ms", "cumulative ms"],
                [[f["function"][-110:], f["calls"], output.fmt(f["own_ms"], ".1f"), output.fmt(f["cumulative_ms"], ".1f")]
                 for f in r["host_functions"]]))
            lines += ["", "the forward of one more step alone, by cumulative time (the call path down to what costs):", ""]
            lines.append(output.markdown_table(
                ["function", "calls", "own ms", "cumulative ms"],
                [[f["function"][-110:], f["calls"], output.fmt(f["own_ms"], ".2f"), output.fmt(f["cumulative_ms"], ".2f")]
                 for f in r.get("host_functions_forward", [])]))
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps, compilation included")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"])
    p.add_argument("--variants", help="comma list of default variants (peft-eager, peft+inductor, peft+unsloth); "
                                       "a name ending in @padded or @packed runs on that layout only")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[:k=v,...]",
                   help="an extra variant, e.g. ro=unsloth:mode=reduce-overhead (repeatable); NAME@packed runs "
                        "it on packed batches only")
    add_batch_arguments(p, "profile")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="BERT presets: batches without attention_mask (the same as --spellings types)")
    p.add_argument("--host-profile", action="store_true",
                   help="one more step under cProfile: the Python functions with the most own time")
    p.add_argument("--compile-profile", action="store_true",
                   help="every warm-up step under cProfile: the cumulative time of the compiler's phases "
                        "(Dynamo, the passes, AOTAutograd, Inductor, autotuning, timed choices) per step")
    p.add_argument("--top", type=int, default=10, help="costliest kernels listed per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="docs/bench")


def run(args) -> list[dict]:
    """One profile per batch spelling asked for (BERT presets), else one."""
    return [run_one(args, spelling)
            for spelling in spellings_to_run(args, ["types"] if args.no_attention_mask else ["full"])]


def run_one(args, spelling: str) -> dict:
    from .e2e import DTYPES
    from .variants import select_variants

    preset = PRESETS[args.preset]
    device = resolve_device(args.device)
    inner = resolve_inner(args.inner, device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = getattr(args, "lengths", FIXED_LENGTHS)
    variants = select_variants(default_variants(inner), args.variants, args.variant, inner,
                               layouts=getattr(args, "layouts", ["padded"]))
    real_data = check_real_data(preset, lengths, variants)
    layouts = list(dict.fromkeys(v.layout for v in variants))
    # the layouts join the name: a packed-only profile must not overwrite a padded one
    name = run_name(preset, spelling, lengths) + ("" if layouts == ["padded"] else "-" + "-".join(layouts))
    env = environment(device)
    data = {"bench": "profile", "preset": preset.name, "name": name, "steps": args.steps, "warmup": args.warmup,
            "dtype": str(dtype), "attention_mask": spelled_mask(spelling) if preset.family != "llama"
            else "none (causal LM)", "spelling": spelling if preset.family != "llama" else None,
            "lengths": str(lengths), "lengths_description": lengths.describe(preset.seq), "layouts": layouts,
            "rows": preset.batch, "real_data": real_data, "compile_profile": bool(getattr(args, "compile_profile", False)),
            "env": env, "results": []}
    stem = Path(args.out) / f"profile-{name}"
    for variant in variants:
        print(f"  profile {variant.name:<20} {variant.describe()} ...", flush=True)
        result = run_isolated(lambda: profile_variant(preset, variant, device, dtype, args.steps, args.warmup,
                                                      args.seed, args.lr, spelling=spelling, lengths=lengths,
                                                      host_profile=args.host_profile,
                                                      compile_profile=data["compile_profile"], top=args.top), device)
        result["variant"] = variant.to_json()
        data["results"].append(result)
        output.write_json(stem.with_suffix(".json"), data)
        stem.with_suffix(".md").write_text(render_markdown(data))
        written = []
        if preset.family == "llama" and not real_data:
            written = write_roofline(data, preset, stem.with_name(f"roofline-{name}"))
    print(render_markdown(data))
    print(f"wrote {', '.join([f'{stem}.json', f'{stem}.md', *written])}")
    return data


__all__ = ["add_arguments", "run", "family_of", "union_us", "summarise", "idle_by_phase", "parse_variant"]
