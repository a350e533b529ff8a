"""Where a distributed step's time goes: the llama-1b preset under DDP and FSDP2 (frozen base
replicated, with and without resharding after forward), 2 processes, one GPU each. Per variant:
the step wall time of every rank and GPU-side forward / backward / optimizer times (CUDA
events), then a torch.profiler of 2 steps on rank 0 (the top CUDA kernels
and the top CPU ops by self time) and the optimizer step timed alone.

    torchrun --nproc_per_node 2 scripts/profile_dist.py [--variants single,ddp-graphs,ddp,fsdp-replicate,...]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import unsloth_compile
from unsloth_compile.bench.distributed import DIST_PRESETS
from unsloth_compile.bench.e2e import add_lora, build_model, make_batches
from unsloth_compile.bench.variants import make_optimizer, train_step
from unsloth_compile.distributed import compile_ddp, shard_lora_model


def build(variant: str, device: torch.device):
    preset = DIST_PRESETS["llama-1b"]
    torch.manual_seed(0)
    model = add_lora(build_model(preset, device, torch.bfloat16), preset)
    model.train()
    options = {"summary": dist.get_rank() == 0}
    if variant == "single":  # every rank trains its own copy, no communication: the GPUs busy side by side
        step_fn = unsloth_compile.compile(model, options)
    elif variant in ("ddp", "ddp-graphs"):
        if variant == "ddp-graphs":
            options["cudagraphs"] = True
        step_fn = compile_ddp(model, options, device_ids=[device.index])
    else:
        shard_lora_model(model, frozen="replicate", options=options,
                         reshard_after_forward=False if variant.endswith("-keep") else None)
        step_fn = model
    return preset, model, step_fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="ddp,fsdp-replicate,fsdp-replicate-keep",
                        help="comma list of single (each rank alone), ddp, ddp-graphs, fsdp-replicate[-keep]")
    args = parser.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    device = torch.device("cuda", local)
    rank0 = dist.get_rank() == 0
    for variant in args.variants.split(","):
        preset, model, step_fn = build(variant, device)
        optimizer = make_optimizer(model.parameters(), 1e-4, device)
        batches = make_batches(preset, 8, 1000 * dist.get_rank(), device)
        times, phases = [], []
        for batch in batches[:6]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            loss = step_fn(**batch).loss
            events[1].record()
            loss.backward()  # under DDP: returns once the reducer's all-reduces are queued and waited on
            events[2].record()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            events[3].record()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            phases.append([events[i].elapsed_time(events[i + 1]) for i in range(3)])
        mid = [sorted(p[i] for p in phases[2:])[len(phases[2:]) // 2] for i in range(3)]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, [round(t * 1e3, 1) for t in times[2:]] + [round(m, 1) for m in mid])
        if rank0:
            for r, row in enumerate(every):
                print(f"{variant} rank {r}: steps ms {row[:-3]}; GPU-side medians: forward {row[-3]} ms, "
                      f"backward (+ DDP all-reduce) {row[-2]} ms, optimizer {row[-1]} ms")
        # the optimizer step alone (gradients of the last backward kept)
        loss = step_fn(**batches[6]).loss
        loss.backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        opt_ms = (time.perf_counter() - t0) * 1e3
        optimizer.zero_grad(set_to_none=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for batch in batches[6:8]:
                train_step(step_fn, batch, optimizer)
            torch.cuda.synchronize()
        if rank0:
            print(f"\n===== {variant}: steps ms {[round(t * 1e3, 1) for t in times]}, optimizer.step alone "
                  f"{opt_ms:.1f} ms, params {sum(1 for p in model.parameters() if p.requires_grad)} trainable")
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
            print(averages.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70))
        del model, step_fn, optimizer
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
