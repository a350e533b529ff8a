"""One training step, taken apart: GPU time by kernel family, host time, GPU idle time.

    python -m unsloth_compile.bench profile --preset llama-1b --variant peft-eager --variant unsloth
    python -m unsloth_compile.bench profile --preset tiny                      # CPU smoke run

For each variant the model is built and warmed up exactly as `bench e2e` does (compilation in
the warm-up), then `--steps` steps run under `torch.profiler`. Per step:
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
  profile as roofline-PRESET.json and .md, with the step's MFU by the LoRA FLOP count.
`--host-profile`: one more step under cProfile after the profiled ones; the Python functions
with the most own time (`host_functions`), i.e. where the host time of a host-bound step goes.
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

from . import output
from .e2e import PRESETS, build_model, make_batches, prepare_model
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
                    attention_mask: bool = True, host_profile: bool = False, top: int = 10) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(seed)
    model = prepare_model(build_model(preset, device, dtype), variant, preset)
    if variant.options.get("fuse_cross_entropy") is True and preset.family == "llama":
        from ..training_outputs import loss_only

        loss_only(model)  # as bench e2e does: without logits in the output the CE pass fuses
    model.train()
    step_fn = compile_for(model, variant)
    optimizer = make_optimizer(model.parameters(), lr, device)
    batches = make_batches(preset, warmup + steps + 2 * int(host_profile), seed, device,
                           spelling="full" if attention_mask else "types")

    def one_step(batch) -> StepTimes:
        synchronize(device)
        t0 = time.perf_counter()
        train_step(step_fn, batch, optimizer)
        t_host = time.perf_counter()
        synchronize(device)
        return StepTimes(time.perf_counter() - t0, t_host - t0)

    for batch in batches[:warmup]:
        one_step(batch)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    timed = []
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches[warmup:warmup + steps]:
            synchronize(device)
            t0 = time.perf_counter()
            with torch.profiler.record_function("step:"):
                host_s = phased_train_step(step_fn, batch, optimizer, device)
            timed.append(StepTimes(time.perf_counter() - t0, host_s))
    kernels = _device_kernels(prof)
    summary = summarise(kernels, timed, top)
    summary.update(idle_by_phase(kernels, _cpu_ranges(prof, "phase:"),
                                 [(start, end) for _, start, end in _cpu_ranges(prof, "step:")]))
    if preset.family == "llama":  # the roofline by kernel family (bench/roofline.py)
        summary.update(step_roofline(preset, variant.kind, model, dtype, kernels, len(timed), summary["wall_ms"],
                                     summary["gpu_idle_ms"], device_name(device)))
    if host_profile:
        profiler = cProfile.Profile()
        profiler.enable()
        summary["host_profile_step"] = dataclasses.asdict(one_step(batches[-2]))
        profiler.disable()
        summary["host_functions"] = host_functions(profiler)
        # the forward alone, from an idle GPU: what the step's lead-in (its first Python line to
        # its first kernel) is made of
        synchronize(device)
        profiler = cProfile.Profile()
        profiler.enable()
        loss = step_fn(**batches[-1]).loss
        profiler.disable()
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        summary["host_functions_forward"] = host_functions(profiler, 40, key="cumulative_ms")
    summary["counters"] = compile_counters()
    summary["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    summary["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    return summary


def default_variants(inner: str) -> list[Variant]:
    compiled = "inductor" if inner == "inductor" else "aot_eager"
    return [Variant("peft-eager", "eager", role="peft-eager"),
            Variant(f"peft+{compiled}", compiled, role="peft-compile"),
            Variant("peft+unsloth", "unsloth", {"inner": inner}, role="unsloth")]


def render_markdown(data: dict) -> str:
    lines = output.header_lines(f"profile: {data['preset']} on {data['env']['device']}", data["env"])
    lines += [f"- {data['warmup']} warm-up steps (compilation included), then {data['steps']} profiled steps; "
              f"per-step means; attention mask: {data['attention_mask']}",
              "- host: the step's Python until it returned (all launches issued); GPU busy: union of kernel "
              "intervals; idle: wall - busy", ""]
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
    p.add_argument("--variants", help="comma list of default variants (peft-eager, peft+inductor, peft+unsloth)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[:k=v,...]",
                   help="an extra variant, e.g. ro=unsloth:mode=reduce-overhead (repeatable)")
    p.add_argument("--no-attention-mask", action="store_true", help="BERT presets: batches without attention_mask")
    p.add_argument("--host-profile", action="store_true",
                   help="one more step under cProfile: the Python functions with the most own time")
    p.add_argument("--top", type=int, default=10, help="costliest kernels listed per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="docs/bench")


def run(args) -> dict:
    from .e2e import DTYPES
    from .variants import select_variants

    preset = PRESETS[args.preset]
    device = resolve_device(args.device)
    inner = resolve_inner(args.inner, device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    variants = select_variants(default_variants(inner), args.variants, args.variant, inner)
    env = environment(device)
    mask = not args.no_attention_mask
    data = {"bench": "profile", "preset": preset.name, "steps": args.steps, "warmup": args.warmup,
            "dtype": str(dtype), "attention_mask": mask if preset.family != "llama" else "none (causal LM)",
            "env": env, "results": []}
    suffix = "" if mask or preset.family == "llama" else "-nomask"
    stem = Path(args.out) / f"profile-{preset.name}{suffix}"
    for variant in variants:
        print(f"  profile {variant.name:<20} {variant.describe()} ...", flush=True)
        result = run_isolated(lambda: profile_variant(preset, variant, device, dtype, args.steps, args.warmup,
                                                      args.seed, args.lr, attention_mask=mask,
                                                      host_profile=args.host_profile, top=args.top), device)
        result["variant"] = variant.to_json()
        data["results"].append(result)
        output.write_json(stem.with_suffix(".json"), data)
        stem.with_suffix(".md").write_text(render_markdown(data))
        written = []
        if preset.family == "llama":
            written = write_roofline(data, preset, stem.with_name(f"roofline-{preset.name}"))
    print(render_markdown(data))
    print(f"wrote {', '.join([f'{stem}.json', f'{stem}.md', *written])}")
    return data


__all__ = ["add_arguments", "run", "family_of", "union_us", "summarise", "idle_by_phase", "parse_variant"]
