"""`python -m unsloth_compile.bench dist`: a preset trained on N processes (one GPU each) under
DDP and FSDP2, against the same model on one GPU.

    python -m unsloth_compile.bench dist --preset llama-1b --nproc 2          # 2 GPUs
    python -m unsloth_compile.bench dist --preset llama-8b --nproc 2 --variants fsdp-shard,fsdp-replicate
    python -m unsloth_compile.bench dist --preset tiny --nproc 2 --device cpu  # gloo smoke run, CPU
    python -m unsloth_compile.bench dist --preset llama-1b --variants fsdp-shard,fsdp-replicate \
        --baseline docs/bench/dist-llama-1b-2xcuda-single+ddp.json                # split over two runs

Variants (unsloth_compile.distributed):
    single           one process, the model compiled in place: the baseline (rank 0 runs it
                     while the other ranks wait in a barrier)
    ddp              compile_ddp: model replicated, LoRA gradients all-reduced (CUDA graphs on
                     for static shapes, buffers not re-broadcast at each forward: its defaults)
    ddp-bf16grad     the same, the gradients all-reduced in bf16 (gradient_compression="bf16")
    ddp-nographs     the same with options cudagraphs=False
    ddp-bcast        the same with broadcast_buffers=True (DDP's own default)
    ddp-1bucket      the same with bucket_cap_mb=1024: one all-reduce for every LoRA gradient
    fsdp-shard       shard_lora_model(frozen="shard"): every parameter sharded, blocks and the
                     head + loss after them compiled (CUDA graphs off: its default)
    fsdp-replicate   shard_lora_model(frozen="replicate"): frozen base replicated, adapters,
                     their gradients and optimizer state sharded, blocks and head compiled
                     (CUDA graphs on for static shapes: its default)
    fsdp-replicate-nographs   the same with options cudagraphs=False
    fsdp-replicate-keep       the same with reshard_after_forward=False: the adapters gathered
                     once per step, kept unsharded from forward to backward; CUDA graphs off
                     (with them it re-recorded every step: 1451 ms on llama-1b, 2 x H200)
    fsdp-shard-nohead, fsdp-replicate-nohead   with compile_head=False: the LM head and loss
                     after the blocks left to eager

Every rank trains on its own batches of the preset's size (the per-GPU batch is the preset's),
so tokens/s per GPU is comparable with `single`. Per variant: the step time (each step's
slowest rank, median over the timed steps), tokens/s per GPU and in all, scaling efficiency
(tokens/s per GPU / single's), peak memory per GPU over the timed steps (CUDA max allocated,
the largest rank; the setup peak, the whole model on the GPU before sharding, is kept apart),
fused sites and the final loss. All processes are started once; the variants run one after the
other in them, a failed variant is reported with its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from . import output
from .e2e import PRESETS, Preset, add_lora, build_model, make_batches
from .variants import (MemoryMeter, describe_error, environment, free_memory, make_optimizer, parse_option_value,
                       synchronize, train_step)

VARIANTS = ("single", "ddp", "ddp-bf16grad", "ddp-nographs", "ddp-bcast", "ddp-1bucket", "fsdp-shard",
            "fsdp-replicate", "fsdp-replicate-nographs", "fsdp-replicate-keep", "fsdp-shard-nohead",
            "fsdp-replicate-nohead")
# The scaling efficiency each variant is held to on 2 GPUs (llama-1b): tokens/s per GPU over one GPU's
TARGETS = {**{v: 0.95 for v in VARIANTS if v.startswith("ddp")}, **{v: 0.9 for v in VARIANTS if v.startswith("fsdp")}}

DIST_PRESETS = dict(PRESETS)
# bench e2e's llama-8b at 2 x 2048 tokens, fewer steps
DIST_PRESETS["llama-8b"] = dataclasses.replace(
    PRESETS["llama-8b"], seq=2048, steps=6, warmup=2, targets=(),
    note="Llama-3-8B shapes, random init: the model that needs sharding (FSDP2 memory per GPU)")


# ----------------------------------------------------------------------------- one variant, one rank


def _build(variant: str, preset: Preset, device: torch.device, dtype: torch.dtype, options: dict, mp: bool):
    """(model, the callable that trains it) for this variant, on this rank."""
    import unsloth_compile
    from unsloth_compile.distributed import compile_ddp, shard_lora_model

    model = add_lora(build_model(preset, device, dtype), preset)
    model.train()
    if variant == "single":
        return model, unsloth_compile.compile(model, options)
    if variant.startswith("ddp"):
        if variant == "ddp-nographs":
            options = {**options, "cudagraphs": False}
        extra = {"ddp-bcast": {"broadcast_buffers": True}, "ddp-1bucket": {"bucket_cap_mb": 1024}}.get(variant, {})
        return model, compile_ddp(model, options, **extra, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_compression="bf16" if variant == "ddp-bf16grad" else "none")
    policy = None
    if mp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    frozen = variant.split("-")[1]
    if variant.endswith("-nographs"):
        options = {**options, "cudagraphs": False}
    shard_lora_model(model, frozen=frozen, options=options, mp_policy=policy,
                     reshard_after_forward=False if variant.endswith("-keep") else None,
                     compile_head=not variant.endswith("-nohead"))
    return model, model


def run_variant(variant: str, preset: Preset, device: torch.device, dtype: torch.dtype, cfg: dict,
                rank: int) -> dict:
    """Train `variant` on this rank; every rank of the variant must call it."""
    from ..report import collect_reports

    torch.manual_seed(cfg["seed"])  # the same initial model on every rank
    options = {**cfg["options"], "inner": cfg["inner"], "summary": rank == 0}
    model, step_fn = _build(variant, preset, device, dtype, options, cfg["mp"])
    optimizer = make_optimizer(model.parameters(), cfg["lr"], device)
    batches = make_batches(preset, cfg["warmup"] + cfg["steps"], cfg["seed"] + 1000 * rank, device)
    meter = MemoryMeter(device)
    # CUDA: the whole model before sharding, compilation not yet; CPU: no such figure
    setup_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    times, losses = [], []
    with collect_reports() as report:
        for step, batch in enumerate(batches):
            if step == cfg["warmup"] and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # steady state: compilation and setup excluded
            synchronize(device)
            t0 = time.perf_counter()
            loss = train_step(step_fn, batch, optimizer)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            meter.sample()
    return {"step_times_s": times[cfg["warmup"]:], "losses": losses, "peak_mem_bytes": meter.peak_bytes(),
            "setup_peak_bytes": setup_peak, "mem_kind": meter.kind,
            "fusion": {"graphs": report.graphs, "fused": len(report.fused), "refused": len(report.refused),
                       "counters": dict(report.counters)},
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _run_isolated(variant: str, preset: Preset, device: torch.device, dtype: torch.dtype, cfg: dict,
                  rank: int) -> dict:
    free_memory(device)
    try:
        result = run_variant(variant, preset, device, dtype, cfg, rank)
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001  reported, not raised: the next variant still runs
        result = {"status": "failed", "error": describe_error(error)}
    free_memory(device)
    return result


def run_all(cfg: dict, out_dir: str) -> None:
    """`cfg["variants"]` one after the other in the current process group (every rank calls
    it); rank 0 writes one JSON part per variant to `out_dir`."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["device"] == "cuda" else torch.device("cpu")
    preset = Preset(**cfg["preset"])
    dtype = getattr(torch, cfg["dtype"])
    for variant in cfg["variants"]:
        alone = variant == "single"
        result = _run_isolated(variant, preset, device, dtype, cfg, rank) if not alone or rank == 0 else None
        if alone:
            dist.barrier()  # the other ranks wait (and leave rank 0's GPU to it)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            part = {"variant": variant, "world": 1 if alone else world, "ranks": [r for r in gathered if r]}
            (Path(out_dir) / f"{VARIANTS.index(variant)}-{variant}.json").write_text(json.dumps(part))
    dist.barrier()


def _worker(local_rank: int, cfg: dict, port: int, out_dir: str) -> None:
    """One spawned process: its process group, then `run_all`."""
    import torch.distributed as dist

    import unsloth_compile  # noqa: F401  registers the backend

    world = cfg["nproc"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    if cfg["device"] == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cfg["device"] == "cuda" else "gloo", rank=local_rank, world_size=world,
                            timeout=datetime.timedelta(minutes=cfg["timeout_min"]))
    try:
        run_all(cfg, out_dir)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- merging


def summarize(part: dict, preset: Preset) -> dict:
    """One variant's row from its ranks' results."""
    ranks = part["ranks"]
    failed = [r for r in ranks if r["status"] != "ok"]
    row = {"variant": part["variant"], "world": part["world"]}
    if failed or not ranks:
        row.update(status="failed", error=failed[0]["error"] if failed else "no rank reported")
        return row
    per_step = [max(ts) for ts in zip(*(r["step_times_s"] for r in ranks))]  # the slowest rank sets the pace
    step = statistics.median(per_step)
    tokens = preset.batch * preset.seq
    peaks = [r["peak_mem_bytes"] for r in ranks]
    setup = [r["setup_peak_bytes"] for r in ranks if r["setup_peak_bytes"] is not None]
    row.update(status="ok", step_time_s=step, step_times_s=per_step, tokens_per_s_per_gpu=tokens / step,
               tokens_per_s=tokens * part["world"] / step, peak_mem_bytes=max(p or 0 for p in peaks),
               peak_mem_by_rank=peaks, setup_peak_bytes=max(setup, default=None),
               mem_kind=ranks[0]["mem_kind"], loss_final=ranks[0]["losses"][-1], losses=ranks[0]["losses"],
               fusion=ranks[0]["fusion"], trainable_params=ranks[0]["trainable_params"])
    return row


def add_efficiency(rows: list[dict], on_cuda: bool) -> None:
    single = next((r for r in rows if r["variant"] == "single" and r["status"] == "ok"), None)
    for r in rows:
        ok = single is not None and r["status"] == "ok"
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"] if ok else None
        target = TARGETS.get(r["variant"])
        if target is None or r["scaling_efficiency"] is None:
            r["verdict"] = None
        else:
            met = r["scaling_efficiency"] >= target
            r["verdict"] = ("met" if met else "NOT met") + ("" if on_cuda else " (CPU run: not a claim)")
        r["target"] = target


def render_markdown(data: dict) -> str:
    preset = data["preset"]
    gib = "peak GiB per GPU (CUDA max allocated, timed steps)" if data["mem_kind"] == "cuda_max_allocated" \
        else "RSS delta GiB (CPU, sampled, not peak)"
    lines = output.header_lines(f"dist: {preset['name']} on {data['nproc']} x {data['env']['device']}", data["env"])
    lines += [f"- model: {preset['note']}; {preset['config']}",
              f"- per GPU: batch {preset['batch']} x {preset['seq']} tokens, dtype {data['dtype']}, LoRA "
              f"r={preset['rank']} on {', '.join(preset['lora_targets'])}; inner {data['inner']}; "
              f"{'FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce)' if data['mp'] else 'no MixedPrecisionPolicy'}"
              f"{'; options ' + str(data['options']) if data.get('options') else ''}",
              f"- {data['warmup']} warm-up steps (compilation included), median over {data['steps']} timed steps "
              f"of the slowest rank's step time; scaling efficiency = tokens/s per GPU / single's", ""]
    rows = []
    for r in data["results"]:
        ok = r["status"] == "ok"
        fusion = r.get("fusion")

        def scaled(key: str, factor: float) -> Optional[float]:
            return r[key] * factor if ok and r.get(key) is not None else None

        rows.append([r["variant"] + (f" (from {Path(r['baseline_from']).name})" if r.get("baseline_from") else ""),
                     r["world"], r["status"], output.fmt(scaled("step_time_s", 1e3), ".1f"),
                     output.fmt(r.get("tokens_per_s_per_gpu"), ",.0f"), output.fmt(r.get("tokens_per_s"), ",.0f"),
                     output.fmt(r.get("scaling_efficiency"), ".3f"),
                     f">= {r['target']}: {r['verdict']}" if r.get("verdict") else "-",
                     output.fmt(scaled("peak_mem_bytes", 2**-30), ".2f"),
                     output.fmt(scaled("setup_peak_bytes", 2**-30), ".2f"),
                     output.fmt(r.get("loss_final"), ".4f"),
                     f"{fusion['fused']}/{fusion['refused']}" if fusion else "-", "" if ok else output.first_line(r.get("error", ""))])
    lines.append(output.markdown_table(
        ["variant", "GPUs", "status", "step ms", "tokens/s per GPU", "tokens/s", "scaling efficiency", "target",
         gib, "setup peak GiB", "final loss", "fused/refused (rank 0)", "error"], rows))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(n for n, q in DIST_PRESETS.items() if q.family == "llama"))
    p.add_argument("--nproc", type=int, help="processes, one GPU each (default: every visible GPU, 2 on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="base weights (auto: bf16 on CUDA)")
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"])
    p.add_argument("--mp", action="store_true", help="FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    p.add_argument("--steps", type=int, help="timed steps (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed steps, compilation included (default: the preset's)")
    p.add_argument("--batch", type=int, help="rows per GPU (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--timeout-min", type=float, default=30, help="collective timeout (a rank that fails hangs the rest)")
    p.add_argument("--out", default="docs/bench", help="output folder (JSON, markdown)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option for every variant (repeatable), e.g. cudagraphs=true")
    p.add_argument("--baseline", help="a dist JSON whose `single` row is the 1-GPU baseline when this run has none "
                                      "(variants split over runs, e.g. under a per-command time limit)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_options(pairs: list[str]) -> dict:
    """--option KEY=VALUE pairs -> backend options (values as the e2e bench's --variant reads them)."""
    from unsloth_compile.config import Config

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE, e.g. cudagraphs=true")
        options[key.strip()] = parse_option_value(value.strip())
    Config.from_options(options)  # a bad option fails here, not in every spawned process
    return options


def _config(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build")
    nproc = args.nproc or (torch.cuda.device_count() if device == "cuda" else 2)
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {nproc}: only {torch.cuda.device_count()} GPUs are visible")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    preset = DIST_PRESETS[args.preset]
    preset = dataclasses.replace(preset, batch=args.batch or preset.batch, seq=args.seq or preset.seq)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, "bfloat16" if device == "cuda" else "float32")
    inner = args.inner if args.inner != "auto" else ("inductor" if device == "cuda" else "aot_eager")
    return {"preset": dataclasses.asdict(preset), "nproc": nproc, "variants": sorted(variants, key=VARIANTS.index),
            "device": device, "dtype": dtype, "inner": inner, "mp": args.mp, "seed": args.seed, "lr": args.lr,
            "steps": args.steps if args.steps is not None else preset.steps,
            "warmup": args.warmup if args.warmup is not None else preset.warmup, "timeout_min": args.timeout_min,
            "options": _parse_options(args.option)}


def collect(cfg: dict, out_dir: str, error: Optional[str] = None, baseline: Optional[str] = None) -> dict:
    """The table's data from the parts `run_all` wrote (a variant without a part: failed); the
    `single` row of the JSON `baseline` when this run has none (marked with its file)."""
    preset = Preset(**cfg["preset"])
    parts = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]
    rows = [summarize(part, preset) for part in parts if part["variant"] in cfg["variants"]]
    for missing in [v for v in cfg["variants"] if v not in {r["variant"] for r in rows}]:
        rows.append({"variant": missing, "world": cfg["nproc"], "status": "failed",
                     "error": error or "no result (a process died)"})
    if baseline and "single" not in cfg["variants"]:
        old = json.loads(Path(baseline).read_text())
        if old["preset"] != json.loads(json.dumps(cfg["preset"])):  # JSON has lists for tuples
            raise SystemExit(f"--baseline {baseline}: another preset or batch ({old['preset']['name']})")
        rows += [dict(r, baseline_from=str(baseline)) for r in old["results"] if r["variant"] == "single"]
    rows.sort(key=lambda r: VARIANTS.index(r["variant"]))
    add_efficiency(rows, cfg["device"] == "cuda")
    return dict(cfg, bench="dist", env=environment(torch.device(cfg["device"])), results=rows,
                mem_kind="cuda_max_allocated" if cfg["device"] == "cuda" else "cpu_rss_delta_sampled")


def config(argv: list[str]) -> dict:
    """The run's configuration from command-line arguments (what `run_all` takes)."""
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench dist")
    add_arguments(parser)
    return _config(parser.parse_args(argv))


def run(args) -> dict:
    import torch.multiprocessing as mp

    cfg = _config(args)
    preset = Preset(**cfg["preset"])
    print(f"dist {preset.name}: {cfg['nproc']} processes on {cfg['device']}, variants {', '.join(cfg['variants'])}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        error: Optional[str] = None
        try:
            mp.start_processes(_worker, args=(cfg, _free_port(), tmp), nprocs=cfg["nproc"], join=True,
                               start_method="spawn")
        except Exception as exc:  # noqa: BLE001  a crashed process: keep what the others wrote
            error = describe_error(exc)
        data = collect(cfg, tmp, error, args.baseline)
    # a run of some variants only is named after them, so that split runs do not overwrite each other
    some = "" if cfg["variants"] == list(VARIANTS) else "-" + "+".join(cfg["variants"])
    some += "".join(f"-{key}-{value}" for key, value in sorted(cfg["options"].items()))
    stem = Path(args.out) / f"dist-{preset.name}-{cfg['nproc']}x{cfg['device']}{some}"
    output.write_json(stem.with_suffix(".json"), data)
    stem.with_suffix(".md").write_text(render_markdown(data))
    print(render_markdown(data))
    print(f"wrote {stem}.json, {stem}.md")
    return data
