"""LoRA fine-tuning with tensor or pipeline parallelism (and data parallelism across replicas),
the unsloth backend compiling each rank's part; started by torchrun. The mesh shape is given:

    torchrun --nproc_per_node 2 examples/train_parallel.py --tp 2                      # TP = 2
    torchrun --nproc_per_node 2 examples/train_parallel.py --tp 2 --sp --vocab-parallel   # TP = 2, less memory
    torchrun --nproc_per_node 2 examples/train_parallel.py --tp 2 --sp --vocab-parallel --regather   # and less
    torchrun --nproc_per_node 2 examples/train_parallel.py --pp 2 --schedule 1f1b      # PP = 2
    torchrun --nproc_per_node 4 examples/train_parallel.py --dp 2 --tp 2               # DP x TP
    torchrun --nproc_per_node 4 examples/train_parallel.py --dp 2 --pp 2 --microbatches 4
    torchrun --nproc_per_node 2 examples/train_parallel.py --tp 2 --device cpu --preset tiny --steps 3   # gloo

dp x tp x pp must equal the number of processes (TP and PP together are not supported). A
DeviceMesh of shape (dp, tp) or (dp, pp) is built; each DP replica reads its own `--batch` rows
per step, and the replicas' LoRA gradients are averaged after backward
(unsloth_compile.distributed.tensor_parallel.all_reduce_gradients).
- TP (unsloth_compile.distributed.tensor_parallel.tensor_parallel): q/k/v/gate/up column-wise,
  o/down row-wise, the adapters sharded with their base; the model compiled in place, every LoRA linear fused on the
  local shards. `--sp` adds sequence parallelism (norms and the activations between the blocks
  sharded on the sequence; the embedding sharded on the vocabulary), `--vocab-parallel` a
  vocab-parallel LM head (logits sharded on the vocabulary, the loss under loss_parallel()),
  `--regather` (with `--sp`) keeps only the sequence shard of each block's input for backward and
  all-gathers it again there.
- PP (unsloth_compile.distributed.pipeline): the decoder layers split into `pp` stages, each compiled;
  GPipe or 1F1B over `--microbatches` microbatches of the replica's rows. Each rank compiles its
  stage's forward and backward before the first step (all at once; `--no-stage-warmup`: inside
  the first step, one stage after the other) and prints how long that took.
Prints the loss per step, then tokens/s (all replicas, timed steps after `--warmup`), per GPU,
and the peak GPU memory of each rank.
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
from unsloth_compile.distributed import init_from_torchrun
from unsloth_compile.report import Report, collect_reports


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--sp", action="store_true", help="TP: sequence parallelism (tensor_parallel(sequence_parallel=True))")
    p.add_argument("--vocab-parallel", action="store_true",
                   help="TP: LM head sharded on the vocabulary, loss under loss_parallel() (vocab_parallel_head=True)")
    p.add_argument("--regather", action="store_true",
                   help="TP with --sp: all-gather each block's input again in backward instead of keeping it "
                        "gathered (regather_in_backward=True)")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    p.add_argument("--microbatches", type=int, default=2, help="PP: microbatches per step (divides --batch)")
    p.add_argument("--stage-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="PP: compile each stage's forward and backward on a dummy microbatch before the first "
                        "step, all ranks at once (pipeline_stage(warmup=...)); off: the first step compiles "
                        "the stages one after the other")
    p.add_argument("--preset", default="llama-1b", choices=sorted(n for n, q in DIST_PRESETS.items() if q.family == "llama"))
    p.add_argument("--batch", type=int, help="rows per replica and step (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="auto: inductor on CUDA, aot_eager on CPU")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args, device: torch.device) -> torch.nn.Module:
    preset = DIST_PRESETS[args.preset]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(preset, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.pp > 1 and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # the head and the embeddings live on different stages: one frozen copy each
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    return add_lora(model, preset)  # r=16 on the seven projections, fp32 adapters


def make_mesh(args, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if args.tp > 1 and args.pp > 1:
        raise SystemExit("--tp and --pp together are not supported; use one of them (with --dp)")
    if args.pp > 1 and (args.sp or args.vocab_parallel):
        raise SystemExit("--sp and --vocab-parallel shard a tensor-parallel model: use them with --tp, not --pp")
    if args.regather and not args.sp:
        raise SystemExit("--regather all-gathers the sequence shards of --sp again in backward: add --sp")
    inner, name = (args.pp, "pp") if args.pp > 1 else (args.tp, "tp")
    if args.dp * inner != world:
        raise SystemExit(f"dp x {name} = {args.dp} x {inner} != {world} processes")
    return init_device_mesh(device.type, (args.dp, inner), mesh_dim_names=("dp", name)), name


def main(argv=None) -> int:
    args = parse_args(argv)
    device, own_group = init_from_torchrun(args.device)
    try:
        return train(args, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def train(args, device: torch.device) -> int:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from unsloth_compile.distributed.tensor_parallel import all_reduce_gradients, tensor_parallel
    from unsloth_compile.distributed.pipeline import pipeline_schedule, pipeline_stage

    preset = DIST_PRESETS[args.preset]
    rows, seq = args.batch or preset.batch, args.seq or preset.seq
    mesh, kind = make_mesh(args, device)
    dp_group, dp_rank = mesh["dp"].get_group(), mesh["dp"].get_local_rank()
    options = {"inner": args.inner if args.inner != "auto" else ("inductor" if device.type == "cuda" else "aot_eager"),
               "summary": False}
    model = build(args, device)
    stage = schedule = None
    stage_report = Report()
    if kind == "pp":
        stage_index = mesh["pp"].get_local_rank()
        if rows % args.microbatches:
            raise SystemExit(f"--microbatches {args.microbatches} does not divide --batch {rows}")
        if args.stage_warmup:
            print(f"rank {dist.get_rank()}, stage {stage_index}: compiling forward+backward on a dummy microbatch",
                  flush=True)
        with collect_reports() as stage_report:  # the warm-up compiles the stage here
            stage, module = pipeline_stage(model, stage_index, args.pp, device,
                                           microbatch=(rows // args.microbatches, seq), group=mesh["pp"].get_group(),
                                           options=options, warmup=args.stage_warmup)
        if module.warmup_seconds is not None:
            print(f"rank {dist.get_rank()}, stage {stage_index}: compiled forward+backward in "
                  f"{module.warmup_seconds:.1f} s", flush=True)
        schedule = pipeline_schedule(stage, args.microbatches, args.schedule)
        trained = module
    else:
        tensor_parallel(model, mesh["tp"], sequence_parallel=args.sp, vocab_parallel_head=args.vocab_parallel,
                        regather_in_backward=args.regather, options=options)
        trained = model
    # the vocab-parallel head's cross_entropy reduces over the vocabulary shards (forward and backward)
    loss_context = loss_parallel if args.vocab_parallel else contextlib.nullcontext
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 1 + 1000 * dp_rank)  # each replica its own rows
    first = last = True
    if stage is not None:
        first, last = stage.is_first, stage.is_last
    times = []
    with collect_reports() as report:
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=g).to(device)
            start = time.perf_counter()
            loss = torch.zeros((), device=device)
            if schedule is not None:
                losses = []
                schedule.step(*([ids] if first else []), target=ids if last else None, losses=losses)
                if last:
                    loss = torch.stack([x.detach().float() for x in losses]).mean()
            else:
                with loss_context():
                    out = trained(input_ids=ids, labels=ids)
                    out.loss.backward()
                loss = out.loss.detach().float()
                if isinstance(loss, DTensor):  # the vocab-parallel loss: replicated
                    loss = loss.to_local()
            if args.dp > 1:
                all_reduce_gradients(trained, dp_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            # TP: every rank of a replica holds its loss; PP: the last stage only (the others add zeros)
            dist.all_reduce(loss)
            if dist.get_rank() == 0:
                holders = args.dp * (args.tp if kind == "tp" else 1)
                print(f"step {step}: loss {loss.item() / holders:.4f}  ({times[-1] * 1e3:.1f} ms)", flush=True)
    counters = report.counters + stage_report.counters
    fused, refused = counters.get("lora_linear.fused", 0), counters.get("lora_linear.refused", 0)
    report_timing(args, device, times[args.warmup:], rows * seq, fused, refused, kind)
    return 0


def report_timing(args, device, times: list[float], tokens_per_replica: int, fused: int, refused: int, kind: str):
    """tokens/s from the slowest rank's mean step time; peak memory of every rank."""
    # on the device the process group's backend serves (nccl: CUDA tensors only)
    step = torch.tensor([sum(times) / max(len(times), 1)], dtype=torch.float64, device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (peak, fused, refused))
    if dist.get_rank() != 0:
        return
    world = dist.get_world_size()
    tokens_s = args.dp * tokens_per_replica / float(step) if times else float("nan")
    inner = args.pp if kind == "pp" else args.tp
    print(f"mesh dp={args.dp} x {kind}={inner} on {world} x {device.type}"
          + (f", {args.schedule}, {args.microbatches} microbatches" if kind == "pp" else "")
          + (", sequence parallel" if args.sp else "") + (", regathered in backward" if args.regather else "")
          + (", vocab-parallel head" if args.vocab_parallel else ""))
    print(f"{len(times)} timed steps: {float(step) * 1e3:.1f} ms/step, {tokens_s:,.0f} tokens/s, "
          f"{tokens_s / world:,.0f} tokens/s per GPU")
    print("peak memory per rank (GiB): " + ", ".join("n/a" if p != p else f"{p:.2f}" for p, _, _ in peaks))
    print("LoRA linears per rank: " + ", ".join(f"fused {f}/{f + r}" for _, f, r in peaks))


if __name__ == "__main__":
    raise SystemExit(main())
