"""Where a distributed step's time goes: the llama-1b preset under DDP and FSDP2 (frozen base
replicated, with and without resharding after forward), 2 processes, one GPU each. Per variant:
the step wall time of rank 0, then a torch.profiler of 2 steps on rank 0 (the top CUDA kernels
and the top CPU ops by self time) and the optimizer step timed alone.

    torchrun --nproc_per_node 2 scripts/profile_dist.py [--variants ddp,fsdp-replicate,fsdp-replicate-keep]
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
    if variant == "ddp":
        step_fn = compile_ddp(model, options, device_ids=[device.index])
    else:
        shard_lora_model(model, frozen="replicate", options=options,
                         reshard_after_forward=False if variant.endswith("-keep") else None)
        step_fn = model
    return preset, model, step_fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="ddp,fsdp-replicate,fsdp-replicate-keep")
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
        times = []
        for batch in batches[:6]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(step_fn, batch, optimizer)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
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
