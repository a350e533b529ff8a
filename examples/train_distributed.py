"""LoRA fine-tuning on several GPUs with the unsloth backend: DDP or FSDP2, started by torchrun.

    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --frozen replicate
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --frozen shard --mp --preset llama-8b
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp --accumulate 4 --grow-at 5:32
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --grow-at 5:32
    torchrun --nproc_per_node 2 examples/train_distributed.py --device cpu --preset tiny --steps 3   # gloo, CPU

One process per GPU (any number, 1 included). What each mode does (unsloth_compile/distributed/):
- ddp: the whole model on every GPU, compiled in place; the LoRA gradients are all-reduced.
- fsdp --frozen replicate: fully_shard on each decoder layer and the root, each layer compiled;
  the frozen base stays whole on every GPU, the adapters, their gradients and AdamW state are
  sharded (only the adapters are communicated).
- fsdp --frozen shard: everything sharded; the frozen base is all-gathered layer by layer in
  forward and again in backward (for a base that does not fit on one GPU).
The model is a random-init Llama of a benchmark preset (`--preset`), or `--model NAME_OR_PATH`
(transformers `from_pretrained`); the batches are random tokens, different on every rank.
`--accumulate K` accumulates K micro-batches per optimizer step, the first K-1 without
gradient communication (`unsloth_compile.distributed.no_sync`). `--grow-at STEP:R` sets every
adapter to rank R before that step, identically on every rank: DistributedRankController under
DDP (the wrapper rebuilt), ShardedRankController under FSDP2 (the model rebuilt from `build`,
sharded and compiled again, AdamW state carried over). `--save DIR` writes the adapter with
PEFT's save_pretrained (gathered under FSDP2).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.distributed as dist

import unsloth_compile  # noqa: F401  registers the backend
from unsloth_compile.bench.distributed import DIST_PRESETS
from unsloth_compile.bench.e2e import add_lora, build_model
from unsloth_compile.distributed import (DistributedRankController, ShardedRankController, compile_ddp,
                                         init_from_torchrun, no_sync, shard_lora_model, trainable_state_dict)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--frozen", default="replicate", choices=["replicate", "shard"], help="FSDP2: the frozen base")
    p.add_argument("--mp", action="store_true", help="FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    p.add_argument("--preset", default="llama-1b", choices=sorted(n for n, q in DIST_PRESETS.items() if q.family == "llama"))
    p.add_argument("--model", help="a transformers causal LM to load instead of the preset's random init")
    p.add_argument("--batch", type=int, help="rows per GPU and micro-batch (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grow-at", help="STEP:R: every adapter to rank R before optimizer step STEP")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="auto: inductor on CUDA, aot_eager on CPU")
    p.add_argument("--save", help="directory for the adapter (rank 0 writes it)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args, device: torch.device) -> torch.nn.Module:
    preset = DIST_PRESETS[args.preset]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)  # the same initial adapters on every rank (FSDP2 does not broadcast)
    if args.model:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    else:
        base = build_model(preset, device, dtype)
    return add_lora(base, preset)  # r=16 on the seven projections, fp32 adapters


def backend_options(args, device: torch.device) -> dict:
    return {"inner": args.inner if args.inner != "auto" else ("inductor" if device.type == "cuda" else "aot_eager")}


def shard_kwargs(args, device: torch.device) -> dict:
    """shard_lora_model's arguments (also what ShardedRankController shards a rebuilt model with)."""
    policy = None
    if args.mp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return {"frozen": args.frozen, "options": backend_options(args, device), "mp_policy": policy}


def wrap(args, model: torch.nn.Module, device: torch.device):
    """The callable to train: the DDP wrapper, or the model sharded in place."""
    if args.mode == "ddp":
        return compile_ddp(model, backend_options(args, device),
                           device_ids=[device.index] if device.type == "cuda" else None)
    return shard_lora_model(model, **shard_kwargs(args, device))


def batches(args, device: torch.device, vocab: int, rank: int):
    preset = DIST_PRESETS[args.preset]
    g = torch.Generator().manual_seed(args.seed + 1 + 1000 * rank)  # each rank its own data
    shape = (args.batch or preset.batch, args.seq or preset.seq)
    while True:
        ids = torch.randint(0, vocab, shape, generator=g).to(device)
        yield {"input_ids": ids, "labels": ids}


def main(argv=None) -> int:
    args = parse_args(argv)
    device, own_group = init_from_torchrun(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build(args, device)
        trained = wrap(args, model, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        controller = None
        if args.grow_at:
            grow_step, grow_rank = map(int, args.grow_at.split(":"))
            if args.mode == "ddp":
                controller = DistributedRankController(trained, optimizer, policy="manual")
            else:
                controller = ShardedRankController(
                    trained, optimizer, "manual", build=lambda: build(args, device), shard=shard_kwargs(args, device),
                    make_optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr))
        data = batches(args, device, model.config.vocab_size, rank)
        tokens, start = 0, time.perf_counter()
        for step in range(args.steps):
            if controller is not None and step == grow_step:
                controller.set_rank(grow_rank)
                if args.mode == "ddp":
                    trained = controller.ddp  # the rebuilt DDP wrapper
                else:  # the rebuilt sharded model and its optimizer
                    trained = model = controller.model
                    optimizer = controller.optimizer
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.accumulate):
                batch = next(data)
                last = micro == args.accumulate - 1
                with no_sync(trained) if not last else contextlib.nullcontext():
                    loss = trained(**batch).loss / args.accumulate
                    loss.backward()
                loss_sum += loss.detach().float()
                tokens += batch["input_ids"].numel()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.all_reduce(loss_sum)
            if rank == 0:
                print(f"step {step}: loss {loss_sum.item() / world:.4f}", flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        state = trainable_state_dict(trained)  # whole adapters on every rank (gathered under FSDP2)
        checksum = sum(float(t.double().sum()) for t in state.values())
        sums = [None] * world
        dist.all_gather_object(sums, checksum)
        if rank == 0:
            print(f"{args.mode}{'' if args.mode == 'ddp' else ' frozen=' + args.frozen} on {world} x {device.type}: "
                  f"{tokens / elapsed:,.0f} tokens/s per process (compilation included); adapters identical on "
                  f"every rank: {'yes' if len(set(sums)) == 1 else 'NO'}")
            if args.save:
                model.save_pretrained(args.save, state_dict=state)
                print(f"adapter saved to {args.save}")
        return 0
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
